"""The ``cam`` family's pass: one forward and one backward down to the CAM layers serve every CAM
method requested; each method weights the captured activations (see :mod:`attnexplain.methods.cam`)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import TYPE_CHECKING, Callable

import torch

from ..capture import capture_activations, frozen_parameters, replaced_output
from ..errors import MethodError
from ..layer_probe import layer_infos, map_layout
from ..layout import as_map, own_layout
from ..methods import METHODS, Method
from ..methods.attribution import NOISE_SEED, NOISY_COPIES, noisy_copies
from ..methods.cam import cam_map, finer_scores, hessian_products
from ..precision import as_float32, method_forwards
from ..running import model_as_called, scores_of
from ..targets import check_contrast, class_scores, resolve_targets
from .base import PassOutput, PassRun, fuse_maps, no_gradient, upsample
from .counting import expected_forwards
from .registry import register_pass

if TYPE_CHECKING:
    from ..loading import LoadedModel


#: CAM methods that need more than the layer's activation and its gradient (more forwards, a second
#: derivative, other classes' scores, noisy copies): they never share a forward between targets.
OWN_FORWARD = frozenset(
    {"scorecam", "sscam", "iscam", "ablationcam", "randomcam", "shapleycam", "finercam", "smoothgradcampp"}
)


def shares_forward(method: Method) -> bool:
    """Whether ``method``'s maps of several targets can come from one forward and one backward per
    target (``PassRun.also``): a CAM of the activation and its gradient alone."""
    return method.family == "cam" and method.name not in OWN_FORWARD


@register_pass("cam")
def cam_pass(run: PassRun, methods: list[Method]) -> PassOutput:
    maps = cam_maps(run, methods)
    return PassOutput(maps=maps, layers={name: list(run.layers) for name in maps})


def cam_maps(run: PassRun, methods: list[Method]) -> dict[str, torch.Tensor]:
    """Every method of ``methods`` (all of the cam family) on ``run``'s layers, fused across layers."""
    loaded, batch, layers, options = run.loaded, run.batch, run.layers, run.options
    module = loaded.module
    size = run.size
    captured: dict[str, torch.Tensor] = {}
    names = {m.name for m in methods}
    needs_gradient = any(m.needs_gradient for m in methods)
    extras: dict[str, list[torch.Tensor]] = {}
    with (
        frozen_parameters(module),
        capture_activations(module, layers, captured, _selector(loaded)),
        torch.set_grad_enabled(needs_gradient),
        _twice_differentiable() if "shapleycam" in names else nullcontext(),
    ):
        logits, targets = run.score(run.forward(batch))
        missing = [name for name in layers if name not in captured]
        if missing:
            raise MethodError(f"Layer {missing[0]!r} did not run during the forward pass.")
        activations = [captured[name] for name in layers]
        gradients: list[torch.Tensor | None] = [None] * len(layers)
        also = [resolve_targets(each, run.state["probabilities"], loaded.labels) for each in run.also]
        for each in also if "versus" in run.state else []:
            check_contrast(each, run.state["versus"], loaded.labels)
        also_gradients: list[list[torch.Tensor | None]] = [[None] * len(layers) for _ in also]
        if needs_gradient:
            # Images are independent, so the gradient of the sum is each image's own gradient.
            score = logits.gather(1, targets[:, None]).sum()
            if not score.requires_grad:
                raise MethodError(
                    no_gradient(
                        f"layer {layers[0]!r}", "--method eigencam or scorecam (gradient-free), or another --layer"
                    )
                )
            # Shapley-CAM differentiates the gradient again: keep its graph.
            gradients = list(
                torch.autograd.grad(
                    score,
                    activations,
                    allow_unused=True,
                    retain_graph=bool(names & {"finercam", "shapleycam"}) or bool(also),
                    create_graph="shapleycam" in names,
                )
            )
            for name, gradient in zip(layers, gradients):
                if gradient is None:
                    raise MethodError(f"The model's output does not depend on layer {name!r}.")
            for number, each in enumerate(also):  # the graph kept: one backward per further target
                chosen = logits.gather(1, each[:, None]).sum()
                also_gradients[number] = list(
                    torch.autograd.grad(chosen, activations, retain_graph=number < len(also) - 1)
                )
            if "shapleycam" in names:
                extras["shapleycam"] = hessian_products(gradients, activations)
                gradients = [gradient.detach() for gradient in gradients]
            if "finercam" in names:
                finer = finer_scores(logits, targets, options.finer_classes).sum()
                extras["finercam"] = list(torch.autograd.grad(finer, activations))
    # Laid out once the capture hooks are off: finding a layout may run a shapes-only probe.
    as_maps = [layer_map(loaded, name, activation, size, batch) for name, activation in zip(layers, activations)]
    if "smoothgradcampp" in names:
        extras["smoothgradcampp"] = _noisy_gradients(run, targets)
    forward = scores_of(loaded, size)
    results = {}
    for method in methods:
        per_layer = []
        per_layer_inputs = zip(layers, activations, gradients, as_maps)
        for index, (name, activation, gradient, layer_as_map) in enumerate(per_layer_inputs):
            layer_output = activation.detach()
            # The layer's values as float32 whatever precision the forward ran in: CAM weights and
            # sums are taken in float32.
            activation = layer_as_map(as_float32(layer_output))
            gradient = None if gradient is None else layer_as_map(as_float32(gradient))
            if method.name in ("scorecam", "sscam", "iscam"):
                settings = {"sscam": {"noise": options.mask_noise, "seed": NOISE_SEED}, "iscam": {}}.get(
                    method.name, {}
                )
                if method.name != "scorecam" and options.samples is not None:  # else its own default
                    settings["samples"] = options.samples
                counting = partial(expected_forwards, method, options, batch, activation.shape[1])
                with method_forwards(method), run.forwards.expecting(counting) as counted:
                    contributions = method.compute(
                        activation, counted(forward), batch, targets, batch_size=options.batch_size, **settings
                    )
            elif method.name == "ablationcam":
                clean = logits.detach().gather(1, targets[:, None])[:, 0]
                with_layer_output = _with_layer_output(loaded, name, size)
                if method.full_precision and layer_output.dtype != torch.float32:
                    # The clean score as the ablated ones are taken: the network above the layer in
                    # float32, from the layer's output as the reduced-precision forward computed it.
                    layer_output = as_float32(layer_output)
                    with method_forwards(method):
                        clean = with_layer_output(batch, layer_output).gather(1, targets[:, None])[:, 0]
                counting = partial(expected_forwards, method, options, batch, activation.shape[1])
                with method_forwards(method), run.forwards.expecting(counting) as counted:
                    contributions = method.compute(
                        activation,
                        layer_output,
                        layer_as_map,
                        counted(with_layer_output),
                        batch,
                        targets,
                        clean,
                        options.batch_size,
                    )
            elif method.name == "randomcam":
                contributions = method.compute(activation, seed=NOISE_SEED)
            elif method.name in ("shapleycam", "finercam"):
                extra = layer_as_map(as_float32(extras[method.name][index].detach()))
                contributions = method.compute(activation, gradient, extra)
            elif method.name == "smoothgradcampp":
                contributions = method.compute(activation, as_float32(extras[method.name][index]))
            else:  # the common contract, a plugin's CAM methods' too: (activation, gradient)
                contributions = method.compute(activation, gradient)
            per_layer.append(upsample(cam_map(contributions, options.eigen_smooth), size))
        results[method.name] = fuse_maps(per_layer)
    if also:
        run.state["also"] = [
            (each, _plain_maps(methods, activations, per_target, as_maps, size, options.eigen_smooth))
            for each, per_target in zip(also, also_gradients)
        ]
    return results


def _plain_maps(methods, activations, gradients, as_maps, size, eigen_smooth: bool) -> dict[str, torch.Tensor]:
    """Each of ``methods`` (all :func:`shares_forward`) from the layers' activations and one target's
    gradients, as the pass computes its own target's."""
    maps = {}
    for method in methods:
        per_layer = []
        for activation, gradient, layer_as_map in zip(activations, gradients, as_maps):
            activation = layer_as_map(as_float32(activation.detach()))
            gradient = None if gradient is None else layer_as_map(as_float32(gradient))
            per_layer.append(upsample(cam_map(method.compute(activation, gradient), eigen_smooth), size))
        maps[method.name] = fuse_maps(per_layer)
    return maps


def _twice_differentiable() -> AbstractContextManager[object]:
    """Scaled-dot-product attention on its math kernel: the fused kernels (flash and memory-efficient,
    which PyTorch picks on the CPU and the GPU) have no derivative of their backward, so Shapley-CAM's
    Hessian-vector product through an attention layer would fail. The math kernel is the same
    attention written in ordinary differentiable operations."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _selector(loaded: "LoadedModel") -> Callable[[str, object], torch.Tensor | None]:
    """The plugin's choice of the tensor a layer's output holds (a tuple's, a ``ModelOutput``'s)."""
    return lambda name, output: loaded.plugin.select_output(loaded.module, name, output)


def _with_layer_output(
    loaded: "LoadedModel", name: str, size: tuple[int, int]
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The model's (k, classes) scores on ``inputs`` with layer ``name``'s output replaced."""
    call = model_as_called(loaded, size)

    def run(inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), replaced_output(loaded.module, name, output):
            return class_scores(loaded, call(inputs))[0]

    return run


def _noisy_gradients(run: PassRun, targets: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, (samples, B, …) gradients of the target score on noisy copies of each image, laid
    out as maps (Smooth Grad-CAM++). The noise is SmoothGrad's: σ a share of each image's range,
    drawn per image from the same seeded generator."""
    loaded, layers, options = run.loaded, run.layers, run.options
    module = loaded.module
    samples = NOISY_COPIES if options.samples is None else options.samples
    noisy = noisy_copies(run.batch, samples, options.noise)  # (samples, B, 3, H, W)
    per_sample: list[list[torch.Tensor]] = [[] for _ in layers]
    counting = partial(expected_forwards, METHODS["smoothgradcampp"], options, run.batch)
    with run.forwards.expecting(counting) as counted:
        scores = counted(lambda copies: class_scores(loaded, run.forward(copies))[0])
        for copies in noisy:
            captured: dict[str, torch.Tensor] = {}
            with (
                frozen_parameters(module),
                capture_activations(module, layers, captured, _selector(loaded)),
                torch.enable_grad(),
            ):
                logits = scores(copies)
                chosen = logits.gather(1, targets[:, None]).sum()
                outputs = [captured[name] for name in layers]
                gradients = torch.autograd.grad(chosen, outputs)
            for index, (name, output, gradient) in enumerate(zip(layers, outputs, gradients)):
                per_sample[index].append(layer_map(loaded, name, output, run.size, copies)(as_float32(gradient)))
    return [torch.stack(gradients) for gradients in per_sample]


def layer_map(
    loaded: "LoadedModel", name: str, activation: torch.Tensor, size: tuple[int, int], batch: torch.Tensor | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The rearrangement that makes layer ``name``'s output a (B, C, H, W) map (the plugin's, for
    token sequences and channels-last layers), to apply alike to the output and its gradient. A 4-D
    output is read as the plugin or the evidence of the model's layers says
    (:mod:`attnexplain.layout`), never taken as (B, C, H, W) on its shape alone. ``batch``: the
    input the output came from, for a probe of the model's layers where one is needed (default:
    images of ``size``)."""
    size = (int(size[0]), int(size[1]))
    if loaded.plugin.layer_map(loaded.module, name, activation.detach(), size) is not None:
        return lambda tensor: loaded.plugin.layer_map(loaded.module, name, tensor, size)
    if activation.dim() != 4:
        raise MethodError(
            f"Layer {name!r} outputs shape {tuple(activation.shape)}, not a (batch, "
            f"channels, height, width) map, and plugin {loaded.plugin.name} does not "
            f"say how to lay it out; choose one that `attnexplain layers` lists."
        )
    # The plugin's word, the module's own definition or a reading that fits the input decide without
    # running the model again; else the probe's evidence (a probe's fake tensors can stay cached in
    # a model, a detector's anchors: it runs only where needed, never inside the capture hooks).
    shape, count = tuple(activation.shape), activation.shape[0]
    own = own_layout(loaded.module.get_submodule(name), activation)
    layout, reason = map_layout(loaded, name, shape, size, own, count)
    if layout is None:
        if batch is None:
            batch = torch.zeros(count, 3, *size, device=activation.device)
        inferred = next((info.layout for info in layer_infos(loaded, batch) if info.name == name), None)
        layout, reason = map_layout(loaded, name, shape, size, inferred, count)
    if layout is None:
        raise MethodError(f"{reason[0].upper()}{reason[1:]}; choose one that `attnexplain layers` lists.")
    return lambda tensor: as_map(layout, tensor)
