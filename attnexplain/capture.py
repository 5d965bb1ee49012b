"""Hooks that record what a model computes, always removed when the ``with`` block ends.

Capture once, compute many: a single forward pass records layer activations and attention
probabilities; methods are functions of what was recorded. Plugins record attention with the helpers
here (through :mod:`attnexplain.plugin_api`), and place window attention on the token map with
:func:`shifted_window_positions`.
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, MutableMapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from .errors import MethodError
from .layout import CHANNELS_FIRST, LAYOUTS, own_layout


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Switch off parameter gradients for the duration, then restore each flag as it was.

    With no parameter needing a gradient and an input that needs none, autograd records nothing
    before the captured layer: the backward pass then runs only from the score down to that layer.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise MethodError(
            f"The model has no layer named {name!r}; `attnexplain layers MODEL` lists the candidates."
        ) from None


@contextmanager
def capture_activations(
    model: nn.Module,
    names: list[str],
    sink: dict[str, torch.Tensor],
    select: Callable[[str, Any], torch.Tensor | None] | None = None,
) -> Iterator[None]:
    """Record each named layer's output as a tensor that gradients can be taken with respect to.

    The first captured layer becomes a leaf of the autograd graph (nothing before it is recorded);
    the hook hands the rest of the network a copy of what it records, so a later in-place operation
    (``relu(x, inplace=True)`` after the layer) neither fails nor changes the recorded values. A layer
    called several times is recorded at its last call.

    A layer whose module returns several tensors (a tuple, a ``ModelOutput``) is recorded through
    ``select(name, output)`` (the plugin's :meth:`~attnexplain.plugins.ModelPlugin.select_output`),
    which picks one of them; the rest of the network gets the output with that one replaced by the
    recorded tensor, so gradients are taken of the very tensor the model goes on with.
    """

    def make_hook(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            chosen = (
                output if isinstance(output, torch.Tensor) else select(name, output) if select is not None else None
            )
            if not isinstance(chosen, torch.Tensor):
                raise MethodError(
                    f"Layer {name!r} returns {type(output).__name__}, not a tensor, and "
                    f"its plugin does not say which of its parts to use; choose another "
                    f"layer with --layer."
                )
            # Downstream of another captured layer the output is already in the graph: keep it
            # there, so that gradients reach every captured layer.
            recorded = chosen if chosen.requires_grad else chosen.detach().requires_grad_(True)
            sink[name] = recorded
            return _with_part_replaced(name, output, chosen, recorded.clone())

        return hook

    with ExitStack() as stack:
        for name in names:
            handle = _submodule(model, name).register_forward_hook(make_hook(name))
            stack.callback(handle.remove)
        yield


def _with_part_replaced(name: str, output: Any, part: torch.Tensor, replacement: torch.Tensor) -> Any:
    """``output`` with its element ``part`` (the very tensor) replaced: the output itself when it is
    that tensor, else one element of a tuple, list or mapping (a ``ModelOutput`` is one)."""
    if output is part:
        return replacement
    if isinstance(output, (tuple, list)):
        for index, element in enumerate(output):
            if element is part:
                items = list(output)
                items[index] = replacement
                # A named tuple is rebuilt from its fields, a plain tuple or list from its items.
                return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)
    elif isinstance(output, MutableMapping):
        for key, element in output.items():
            if element is part:
                output[key] = replacement  # a ModelOutput keeps its attribute in step
                return output
    raise MethodError(
        f"The tensor chosen from layer {name!r}'s output is not one of its elements; "
        f"the plugin's select_output must return one of them as it is."
    )


@contextmanager
def replaced_output(model: nn.Module, name: str, output: torch.Tensor) -> Iterator[None]:
    """Layer ``name`` returns ``output`` instead of what it computes, in the block (what an ablation
    hands on to the rest of the network; its batch may differ from the input's)."""
    handle = _submodule(model, name).register_forward_hook(lambda module, args, computed: output)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def replaced_forward(module: nn.Module, wrapper) -> Iterator[None]:
    """Run ``wrapper(original_forward, *args, **kwargs)`` instead of ``module.forward`` in the block.

    One function sees the call's arguments (to change them) and its output (to record it), and
    can run the forward inside a context; the module's own forward hooks still fire around it.
    """
    had_own = "forward" in module.__dict__
    own: Any = module.__dict__.get("forward")
    original = module.forward
    module.forward = lambda *args, **kwargs: wrapper(original, *args, **kwargs)
    try:
        yield
    finally:
        if had_own:
            module.forward = own
        else:
            del module.forward


@contextmanager
def capture_multihead_attention(model: nn.Module, names: list[str], sink: MutableMapping[str, Any]) -> Iterator[None]:
    """Record the per-head attention probabilities (B, heads, T, T) of ``nn.MultiheadAttention`` modules.

    Callers often pass ``need_weights=False`` so that PyTorch can use its fused kernel, which never
    materialises the probabilities. The wrapper asks for them per head, which routes the call through
    the standard math path (same output up to float rounding). The weights it returns are a view of
    the softmax the output was computed from; :func:`attention_gradients` differentiates through it.
    """
    need_weights_position = 4  # forward(query, key, value, key_padding_mask, need_weights, ...)
    average_position = 6

    def make_wrapper(name: str):
        def wrapper(original, *args, **kwargs):
            args = list(args)
            for position, key, value in (
                (need_weights_position, "need_weights", True),
                (average_position, "average_attn_weights", False),
            ):
                if len(args) > position:
                    args[position] = value
                else:
                    kwargs[key] = value
            output = original(*args, **kwargs)
            sink[name] = output[1]
            return output

        return wrapper

    with ExitStack() as stack:
        for name in names:
            module = _submodule(model, name)
            if not isinstance(module, nn.MultiheadAttention):
                raise MethodError(
                    f"Layer {name!r} is a {type(module).__name__}, not a "
                    f"MultiheadAttention; its plugin must say how to capture it."
                )
            stack.enter_context(replaced_forward(module, make_wrapper(name)))
        yield


class _SoftmaxRecorder(TorchFunctionMode):
    """Keeps every ``torch.nn.functional.softmax`` result computed while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.results: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        if func is F.softmax:
            self.results.append(output)
        return output


@contextmanager
def capture_softmax(model: nn.Module, names: list[str], record) -> Iterator[None]:
    """Call ``record(name, module, args, probabilities)`` with the softmax each named module computes.

    For attention written as a function rather than as ``nn.MultiheadAttention`` (torchvision's
    Swin and MaxViT, many research models): the probabilities exist only inside the module's
    forward. A torch-function mode active during that forward alone sees the ``F.softmax`` call and
    keeps its result, the very tensor the output is computed from (so gradients can be taken with
    respect to it); nothing is recomputed and the output is unchanged. The module must compute
    exactly one softmax per call.
    """

    def make_wrapper(name: str):
        def wrapper(original, *args, **kwargs):
            recorder = _SoftmaxRecorder()
            with recorder:
                output = original(*args, **kwargs)
            if len(recorder.results) != 1:
                raise MethodError(
                    f"Layer {name!r} computed {len(recorder.results)} softmaxes in one "
                    f"call, not one; its plugin must say which holds the attention."
                )
            record(name, module_of[name], args, recorder.results[0])
            return output

        return wrapper

    module_of = {name: _submodule(model, name) for name in names}
    with ExitStack() as stack:
        for name, module in module_of.items():
            stack.enter_context(replaced_forward(module, make_wrapper(name)))
        yield


def shifted_window_positions(height: int, width: int, window: list[int], shift: list[int]) -> torch.Tensor:
    """(windows, tokens) positions of torchvision's ``shifted_window_attention`` on a height × width
    map: the same padding, cyclic shift and partition, applied to the positions instead of the
    features. For a :class:`~attnexplain.plugins.WindowedAttention` of any Swin-style model (window
    and shift as (rows, columns)); the model must pad at the bottom and right, roll by ``-shift``
    and cut windows row by row, as torchvision's and Hugging Face's Swin do."""
    pad_bottom = (window[0] - height % window[0]) % window[0]
    pad_right = (window[1] - width % window[1]) % window[1]
    positions = torch.arange(height * width).reshape(1, 1, height, width)
    positions = F.pad(positions, (0, pad_right, 0, pad_bottom), value=-1)[0, 0]
    padded_h, padded_w = positions.shape
    # The function drops the shift along a side that a single window covers.
    shift = [0 if window[0] >= padded_h else shift[0], 0 if window[1] >= padded_w else shift[1]]
    if any(shift):
        positions = torch.roll(positions, shifts=(-shift[0], -shift[1]), dims=(0, 1))
    positions = positions.reshape(padded_h // window[0], window[0], padded_w // window[1], window[1])
    return positions.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])


@contextmanager
def capture_channel_gates(
    model: nn.Module, names: list[str], sink: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> Iterator[None]:
    """Record squeeze-and-excitation gates: for each named block, (gates (B, C), input (B, C, H, W)).

    The block multiplies its input by ``scale_activation``'s output (the gate of each channel, in
    [0, 1]); both are recorded as the block computes them, nothing is recomputed.
    """
    inputs: dict[str, torch.Tensor] = {}

    def make_hooks(name: str):
        def keep_input(module: nn.Module, args: tuple) -> None:
            inputs[name] = args[0].detach()

        def keep_gates(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            sink[name] = (output.detach().flatten(1), inputs[name])

        return keep_input, keep_gates

    with ExitStack() as stack:
        for name in names:
            block = _submodule(model, name)
            gate = getattr(block, "scale_activation", None)
            if not isinstance(gate, nn.Module):
                raise MethodError(f"Layer {name!r} has no scale_activation; its plugin must say how to read its gates.")
            keep_input, keep_gates = make_hooks(name)
            stack.callback(block.register_forward_pre_hook(keep_input).remove)
            stack.callback(gate.register_forward_hook(keep_gates).remove)
        yield


def attention_gradients(
    score: torch.Tensor, attentions: list[torch.Tensor], retain_graph: bool = False
) -> list[torch.Tensor]:
    """∂score/∂attention for recorded attention probabilities.

    A recorded tensor may be a view (``nn.MultiheadAttention`` returns its probabilities reshaped
    after using them); the graph runs through the view's base, so the gradient is taken there and
    given the view's shape. ``retain_graph``: keep the graph for further gradients of other scores.
    """
    sources = []
    for attention in attentions:
        base = attention._base
        usable = base is not None and base.numel() == attention.numel() and base.requires_grad
        sources.append(base if base is not None and usable else attention)
    gradients = torch.autograd.grad(score, sources, allow_unused=True, retain_graph=retain_graph)
    if any(gradient is None for gradient in gradients):
        raise MethodError("The target score does not depend on every recorded attention layer.")
    return [gradient.reshape(attention.shape) for gradient, attention in zip(gradients, attentions)]


@dataclass(frozen=True)
class LayerInfo:
    """A named submodule and the shape of what it returned for a given input."""

    name: str
    kind: str  # class name
    shape: tuple[int, ...] | None  # None when the output is not a single tensor
    #: Whether the output changes with the input. A module applied to a constant (a relative
    #: position bias computed from a fixed table) gives a map that explains nothing.
    depends_on_input: bool = True
    #: What torch's own layers say of a 4-D output's layout (see :mod:`attnexplain.layout`), None
    #: where they say nothing.
    layout: str | None = None

    @property
    def is_spatial(self) -> bool:
        """A (batch, channels, height, width) map with more than one position."""
        return self.shape is not None and len(self.shape) == 4 and self.shape[2] * self.shape[3] > 1


#: A layer's output → the tensor of it to describe (a plugin's ``select_output``), or None.
Selector = Callable[[str, Any], "torch.Tensor | None"]
#: A layer's name → the layout its plugin says its 4-D output has (``layer_layout``), or None.
Layouts = Callable[[str], "str | None"]


def probe_layers(
    model: nn.Module,
    batch: torch.Tensor,
    *,
    forward_kwargs: dict[str, Any] | None = None,
    select: Selector | None = None,
    said: Layouts | None = None,
) -> list[LayerInfo]:
    """List every submodule, with its output shape, in the order its (last) call finished.

    Shapes are propagated on the meta device (no arithmetic: ~35 ms for ResNet-50 where a forward
    takes ~110 ms and fake tensors, whose dispatch is slow, 160-550 ms); a model that meta tensors
    cannot run through (tensors kept outside its parameters and buffers, data-dependent control
    flow) is probed with fake tensors, and failing those, with a real forward pass. The model is
    called with ``forward_kwargs``; an output that is not a tensor is described by the tensor
    ``select`` picks from it.

    Each 4-D output's layout is worked out as the forward runs (``LayerInfo.layout``): the plugin's
    word (``said``), else torch's definition of the layer (:func:`attnexplain.layout.own_layout`),
    else the layout of the tensor it hands on or, keeping its input's shape, of its input.

    Whether an output depends on the input is read off autograd (the input requires a gradient,
    the parameters do not), which the meta device tracks without computing anything. A model whose
    forward records no gradient at all (``torch.no_grad()`` inside) leaves it unknown: every layer
    then counts as depending on the input.
    """
    kwargs = forward_kwargs or {}
    with frozen_parameters(model):
        try:
            found = _probe(model, batch.to("meta"), kwargs, select, said, on_meta=True)
        except Exception:
            found = None
        if found is None:
            try:
                from torch._subclasses.fake_tensor import FakeTensorMode

                with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                    found = _probe(model, mode.from_tensor(batch), kwargs, select, said)
            except Exception:
                pass
        if found is None:
            try:
                found = _probe(model, batch, kwargs, select, said)
            except Exception:  # a forward that refuses inputs with gradients (.numpy() inside)
                found = _probe(model, batch, kwargs, select, said, track_input=False)
    if not any(info.depends_on_input for info in found):
        found = [dataclasses.replace(info, depends_on_input=True) for info in found]
    return found


def _probe(
    model: nn.Module,
    batch: torch.Tensor,
    kwargs: dict[str, Any] | None = None,
    select: Selector | None = None,
    said: Layouts | None = None,
    on_meta: bool = False,
    track_input: bool = True,
) -> list[LayerInfo]:
    finished: dict[str, LayerInfo] = {}
    # Layouts of the tensors seen so far, by identity (the tensors are kept, so ids stay theirs).
    layouts: dict[int, tuple[torch.Tensor, str]] = {}

    def plugin_says(name: str, tensor: torch.Tensor) -> str | None:
        try:
            answer = said(name) if said is not None and tensor.dim() == 4 else None
        except Exception:  # a plugin's answer on shapes alone: no word, not a failure
            return None
        return answer if answer in LAYOUTS else None

    def layout_of(name: str, module: nn.Module, args: Any, tensor: torch.Tensor) -> str | None:
        known = layouts.get(id(tensor))
        layout = plugin_says(name, tensor)
        if layout is None:
            layout = known[1] if known is not None and known[0] is tensor else own_layout(module, tensor)
        if layout is None and args and isinstance(args[0], torch.Tensor) and args[0].shape == tensor.shape:
            given = layouts.get(id(args[0]))  # a residual block keeps its input's shape and layout
            layout = given[1] if given is not None and given[0] is args[0] else None
        if layout is not None:
            layouts[id(tensor)] = (tensor, layout)
        return layout

    def make_hook(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            tensor = output
            if not isinstance(output, torch.Tensor) and select is not None:
                try:
                    tensor = select(name, output)
                except Exception:  # a plugin's answer on shapes alone: unknown, not a failure
                    tensor = None
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else None
            depends = isinstance(tensor, torch.Tensor) and tensor.requires_grad
            layout = layout_of(name, module, args, tensor) if isinstance(tensor, torch.Tensor) else None
            finished.pop(name, None)  # a module called again moves to its latest position
            finished[name] = LayerInfo(name, type(module).__name__, shape, depends, layout)

        return hook

    # A copy of an input that requires a gradient: the model may change its input in place.
    inputs = batch.detach().requires_grad_(True).clone() if track_input else batch
    layouts[id(inputs)] = (inputs, CHANNELS_FIRST)  # the images: (B, 3, H, W)
    with ExitStack() as stack, torch.set_grad_enabled(track_input):
        for name, module in model.named_modules():
            if name:  # the model itself is not a layer
                stack.callback(module.register_forward_hook(make_hook(name)).remove)
        if on_meta:  # the model's own tensors stay where they are; the call sees shapeless copies
            # Tied tensors are listed once: functional_call ties their other names to them.
            tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
            functional_call(
                model,
                {name: torch.empty_like(tensor, device="meta") for name, tensor in tensors.items()},
                (inputs,),
                kwargs or {},
            )
        else:
            model(inputs, **(kwargs or {}))
    return list(finished.values())
