"""The attnexplain plugin for :class:`~attnexplain_attention_cnn.model.AttentionPoolingCNN` and
:class:`~attnexplain_attention_cnn.cbam.CBAMCNN`.

Everything attnexplain needs to know about the model lives here; the core never names it. The
plugin is published under the ``attnexplain.plugins`` entry-point group (see pyproject.toml) as the
instance ``plugin`` at the bottom of this file.

torch and the model are imported inside the methods, so that discovering plugins (``attnexplain
plugins``, ``attnexplain --help``) does not pay for importing torch.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from attnexplain.plugin_api import (
    Captioning,
    CaptionSteps,
    CatalogEntry,
    MethodError,
    ModelPlugin,
    Preprocessing,
    SpatialAttention,
    TokenGrid,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from attnexplain.plugin_api import Method

#: The name of the CBAM model's own map (see :meth:`AttentionCNNPlugin.methods`).
CBAM_SPATIAL = "cbam_spatial"


def _model_classes():
    from .model import AttentionPoolingCNN, SoftAttentionPooling

    return AttentionPoolingCNN, SoftAttentionPooling


def _cbam_class():
    from .cbam import CBAMCNN

    return CBAMCNN


def _captioner_class():
    from .captioner import ShowAttendTell

    return ShowAttendTell


def _captioner(model: "nn.Module") -> bool:
    """Whether the model is (or derives from) our Show, Attend and Tell captioner."""
    return isinstance(model, _captioner_class())


def _ours(model: "nn.Module") -> bool:
    """Whether the model is (or derives from) our attention-pooling CNN. ``--plugin attention-cnn``
    can hand this plugin any model, so every method answers "don't know" for others instead of
    failing."""
    return isinstance(model, _model_classes()[0])


def _cbam(model: "nn.Module") -> bool:
    """Whether the model is (or derives from) our CBAM CNN."""
    return isinstance(model, _cbam_class())


class AttentionCNNPlugin(ModelPlugin):
    name = "attention-cnn"
    families = ("Show-Attend-Tell attention-pooling CNN", "CBAM CNN", "Show, Attend and Tell captioner")
    # No source_prefix: there are no published weights to build by name (``attention-cnn:...``);
    # models come from checkpoints that name ``arch: AttentionPoolingCNN``.

    def specificity(self, model: "nn.Module") -> int | None:
        model_class, _ = _model_classes()
        # 30: this exact class (a subclass may change the forward, so it is not claimed).
        return 30 if type(model) in (model_class, _cbam_class(), _captioner_class()) else None

    def builders(self) -> Mapping[str, Callable[..., "nn.Module"]]:
        model_class, _ = _model_classes()
        return {"AttentionPoolingCNN": model_class, "CBAMCNN": _cbam_class(), "ShowAttendTell": _captioner_class()}

    def catalog(self) -> list[CatalogEntry]:
        # 128: both models' default image_size (model.py imports torch, which a listing
        # must not pay for). No source_prefix: the name is what --arch and checkpoints use.
        return [
            CatalogEntry("AttentionPoolingCNN", "classification", 128, lambda: _model_classes()[0]()),
            CatalogEntry("CBAMCNN", "classification", 128, lambda: _cbam_class()()),
        ]

    def task(self, model: "nn.Module") -> str:
        return "captioning" if _captioner(model) else "classification"

    def captioning(self, model: "nn.Module") -> Captioning | None:
        """The captioner's greedy decoding, its teacher-forced log-probabilities, and its
        :class:`~attnexplain_attention_cnn.captioner.AdditiveAttention`, whose output is
        (context, α, e) at every step."""
        if not _captioner(model):
            return None
        import torch

        def generate(image: "torch.Tensor") -> list[int]:
            return model.generate(image)[0]

        def score(images: "torch.Tensor", words: "torch.Tensor") -> "torch.Tensor":
            logits, _alphas = model(images, words)
            return torch.log_softmax(logits, dim=-1)

        def read_attention(output: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
            _context, alpha, scores = output
            return alpha, scores

        def generate_recorded(image: "torch.Tensor") -> CaptionSteps:
            """The greedy caption, with each step's (α, e) and logits read by hooks on the
            attention and the output layer while it is written: one pass."""
            seen: dict[str, list["torch.Tensor"]] = {"attention": [], "scores": [], "logits": [], "grid": []}

            def keep_attention(_module: Any, _args: Any, output: Any) -> None:
                seen["attention"].append(output[1][0])
                seen["scores"].append(output[2][0])

            hooks = [
                model.attention.register_forward_hook(keep_attention),
                model.output.register_forward_hook(lambda _m, _a, out: seen["logits"].append(out[0])),
                model.encoder.register_forward_hook(lambda _m, _a, out: seen["grid"].append(out)),
            ]
            try:
                ids = model.generate(image)[0]
            finally:
                for hook in hooks:
                    hook.remove()
            steps = len(ids)
            log_probs = torch.log_softmax(torch.stack(seen["logits"][:steps]), dim=-1)
            return CaptionSteps(
                ids=ids,
                log_probabilities=log_probs.gather(1, torch.tensor(ids, device=log_probs.device)[:, None])[:, 0],
                attention=torch.stack(seen["attention"][:steps])[:, None, None, :],
                grid=(int(seen["grid"][0].shape[-2]), int(seen["grid"][0].shape[-1])),
                alignment_scores=torch.stack(seen["scores"][:steps])[:, None, None, :],
            )

        return Captioning(
            vocabulary=tuple(model.vocabulary),
            end=model.end,
            feature_layer=model.last_block,
            attention_module="attention",
            generate=generate,
            score=score,
            read_attention=read_attention,
            generate_recorded=generate_recorded,
            score_formula="additive alignment score e_ti = wᵀ tanh(W_a a_i + W_h h_{t-1}), any real; α = softmax(e)",
        )

    def default_method(self, model: "nn.Module") -> str | None:
        # The model's own learned attention first, Grad-CAM on its last block beside it.
        if _cbam(model):
            return f"{CBAM_SPATIAL},gradcam"
        return "attention,gradcam" if _ours(model) else None

    def default_layer(self, model: "nn.Module") -> str | None:
        # The backbone's last block: the feature map the attention pools over (CBAM: the last
        # stage, after its attention). The core's shape-based guess would find the same layer;
        # saying so is cheaper and explicit.
        if _cbam(model):
            return model.last_stage
        return model.last_block if _ours(model) or _captioner(model) else None

    def attention_modules(self, model: "nn.Module") -> list[str]:
        if _cbam(model):
            return model.spatial_gates
        _, attention_class = _model_classes()
        return [name for name, module in model.named_modules() if isinstance(module, attention_class)]

    def methods(self) -> list["Method"]:
        """``cbam_spatial``: the CBAM model's spatial attention, every stage's map resized to the
        input and averaged (each scaled to [0, 1] first; see
        :func:`attnexplain.methods.attention.spatial_attention`)."""
        from attnexplain.plugin_api import Method, spatial_attention

        return [
            Method(
                name=CBAM_SPATIAL,
                family="attention",
                needs_gradient=False,
                summary=(
                    "CBAM's learned spatial attention σ(conv7×7([mean; max])) of every stage, "
                    "each resized to the input, scaled to [0, 1] and averaged."
                ),
                applies_to="CNNs with CBAM blocks whose plugin records them (attention-cnn's CBAMCNN)",
                cost="1 forward",
                paper="Woo et al. 2018, CBAM: Convolutional Block Attention Module",
                compute=spatial_attention,
                scale="share of each stage's features let through (any class)",
            )
        ]

    def refuse_method(self, model: "nn.Module", method: str) -> str | None:
        if method in ("rollout", "chefer", "legrad") and _cbam(model):
            return (
                "CBAM's spatial attention is one map per stage on that stage's own grid, not "
                "attention between the same tokens from layer to layer, so it cannot be chained; "
                f"use --method {CBAM_SPATIAL}."
            )
        if method == CBAM_SPATIAL and not _cbam(model):
            return f"this {type(model).__name__} has no CBAM blocks; use --method attention."
        return None

    def token_grid(self, model: "nn.Module", input_size: tuple[int, int]) -> TokenGrid | None:
        # No class token: the keys are the feature map's positions in row-major order, and the one
        # query (the learned w) is query 0.
        if not _ours(model) or _cbam(model):
            return None
        height, width = model.feature_size(input_size)
        return TokenGrid(prefix_tokens=0, height=height, width=width, query=0)

    @contextmanager
    def capture_attention(self, model: "nn.Module", names: list[str], sink: dict[str, Any]) -> Iterator[None]:
        """Record α of each named :class:`SoftAttentionPooling` as (batch, 1 head, 1 query, keys);
        for the CBAM model, each named stage's spatial attention Ms as a
        :class:`~attnexplain.plugins.SpatialAttention` on that stage's own grid.

        The hooks only read outputs and return nothing, so the model's output is untouched. The
        recorded α is a view of the very ``alpha`` the context was computed from:
        :func:`attnexplain.capture.attention_gradients` follows the view to its base, so gradients
        with respect to it are real.
        """
        _, attention_class = _model_classes()
        from .cbam import SpatialGate

        def record_alpha(name: str):
            def hook(module: "nn.Module", args: Any, output: Any) -> None:
                _context, alpha = output
                sink[name] = alpha[:, None, None, :]

            return hook

        def record_spatial(name: str):
            def hook(module: "nn.Module", args: Any, output: "torch.Tensor") -> None:
                sink[name] = SpatialAttention(weights=output[:, 0], height=output.shape[-2], width=output.shape[-1])

            return hook

        with ExitStack() as stack:
            for name in names:
                try:
                    module = model.get_submodule(name)
                except AttributeError:
                    raise MethodError(f"The model has no layer named {name!r}.") from None
                if isinstance(module, SpatialGate):
                    handle = module.gate.register_forward_hook(record_spatial(name))
                elif isinstance(module, attention_class):
                    handle = module.register_forward_hook(record_alpha(name))
                else:
                    raise MethodError(
                        f"Layer {name!r} is a {type(module).__name__}, not a "
                        f"SoftAttentionPooling or CBAM SpatialGate; plugin {self.name} "
                        f"cannot record it."
                    )
                stack.callback(handle.remove)
            yield

    def preprocessing(self, model: "nn.Module") -> Preprocessing | None:
        # Used when a checkpoint says nothing about preprocessing (a plain module, a bare
        # state_dict): the size the model was trained at, ImageNet mean and std.
        if not (_ours(model) or _cbam(model) or _captioner(model)):
            return None
        return Preprocessing(size=(model.image_size, model.image_size), source="model image_size")


plugin = AttentionCNNPlugin()
