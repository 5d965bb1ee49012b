"""The attnexplain plugin for :class:`~attnexplain_attention_cnn.model.AttentionPoolingCNN`.

Everything attnexplain needs to know about the model lives here; the core never names it. The
plugin is published under the ``attnexplain.plugins`` entry-point group (see pyproject.toml) as the
instance ``plugin`` at the bottom of this file.

torch and the model are imported inside the methods, so that discovering plugins (``attnexplain
plugins``, ``attnexplain --help``) does not pay for importing torch.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from attnexplain.errors import MethodError
from attnexplain.plugins import CatalogEntry, ModelPlugin, TokenGrid
from attnexplain.preprocess import Preprocessing

if TYPE_CHECKING:
    import torch
    from torch import nn


def _model_classes():
    from .model import AttentionPoolingCNN, SoftAttentionPooling

    return AttentionPoolingCNN, SoftAttentionPooling


def _ours(model: "nn.Module") -> bool:
    """Whether the model is (or derives from) ours. ``--plugin attention-cnn`` can hand this plugin
    any model, so every method answers "don't know" for others instead of failing."""
    return isinstance(model, _model_classes()[0])


class AttentionCNNPlugin(ModelPlugin):
    name = "attention-cnn"
    families = ("Show-Attend-Tell attention-pooling CNN",)
    # No source_prefix: there are no published weights to build by name (``attention-cnn:...``);
    # models come from checkpoints that name ``arch: AttentionPoolingCNN``.

    def specificity(self, model: "nn.Module") -> int | None:
        model_class, _ = _model_classes()
        # 30: this exact class (a subclass may change the forward, so it is not claimed).
        return 30 if type(model) is model_class else None

    def builders(self) -> Mapping[str, Callable[..., "nn.Module"]]:
        model_class, _ = _model_classes()
        return {"AttentionPoolingCNN": model_class}

    def catalog(self) -> list[CatalogEntry]:
        # 128: AttentionPoolingCNN's default image_size (model.py imports torch, which a listing
        # must not pay for). No source_prefix: the name is what --arch and checkpoints use.
        return [CatalogEntry("AttentionPoolingCNN", "classification", 128,
                             lambda: _model_classes()[0]())]

    def default_method(self, model: "nn.Module") -> str | None:
        # The model's own learned attention first, Grad-CAM on its last block beside it.
        return "attention,gradcam" if _ours(model) else None

    def default_layer(self, model: "nn.Module") -> str | None:
        # The backbone's last block: the feature map the attention pools over. (The core's
        # shape-based guess would find the same layer; saying so is cheaper and explicit.)
        return model.last_block if _ours(model) else None

    def attention_modules(self, model: "nn.Module") -> list[str]:
        _, attention_class = _model_classes()
        return [name for name, module in model.named_modules() if isinstance(module, attention_class)]

    def token_grid(self, model: "nn.Module", input_size: tuple[int, int]) -> TokenGrid | None:
        # No class token: the keys are the feature map's positions in row-major order, and the one
        # query (the learned w) is query 0.
        if not _ours(model):
            return None
        height, width = model.feature_size(input_size)
        return TokenGrid(prefix_tokens=0, height=height, width=width, query=0)

    @contextmanager
    def capture_attention(self, model: "nn.Module", names: list[str],
                          sink: dict[str, "torch.Tensor"]) -> Iterator[None]:
        """Record α of each named :class:`SoftAttentionPooling` as (batch, 1 head, 1 query, keys).

        The hook only reads the module's output ``(context, alpha)`` and returns nothing, so the
        model's output is untouched. The recorded tensor is a view of the very ``alpha`` the
        context was computed from: :func:`attnexplain.capture.attention_gradients` follows the view
        to its base, so gradients with respect to it are real.
        """
        _, attention_class = _model_classes()

        def make_hook(name: str):
            def hook(module: "nn.Module", args: Any, output: Any) -> None:
                _context, alpha = output
                sink[name] = alpha[:, None, None, :]

            return hook

        with ExitStack() as stack:
            for name in names:
                try:
                    module = model.get_submodule(name)
                except AttributeError:
                    raise MethodError(f"The model has no layer named {name!r}.") from None
                if not isinstance(module, attention_class):
                    raise MethodError(f"Layer {name!r} is a {type(module).__name__}, not a "
                                      f"SoftAttentionPooling; plugin {self.name} cannot record it.")
                stack.callback(module.register_forward_hook(make_hook(name)).remove)
            yield

    def preprocessing(self, model: "nn.Module") -> Preprocessing | None:
        # Used when a checkpoint says nothing about preprocessing (a plain module, a bare
        # state_dict): the size the model was trained at, ImageNet mean and std.
        if not _ours(model):
            return None
        return Preprocessing(size=(model.image_size, model.image_size), source="model image_size")


plugin = AttentionCNNPlugin()
