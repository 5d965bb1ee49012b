"""The timm plugin: builders, preprocessing, CAM layers and attention capture for timm's models.

Registered under the entry-point group ``attnexplain.plugins`` as ``timm``. timm itself is imported
lazily (inside the methods), so that merely discovering this plugin costs nothing.

Attention: timm's ViT and DeiT blocks use :class:`timm.layers.Attention`, which calls the fused
``F.scaled_dot_product_attention`` when its ``fused_attn`` flag is set and never materialises the
attention probabilities. While capturing, the flag is switched off (and always restored), so that
the module takes its explicit path ``softmax(q·kᵀ·scale) → attn_drop → @ v``; a forward hook on
``attn_drop`` records its output, the very tensor ``@ v`` multiplies, so gradients with respect to it
(``chefer``) are those of the model.
"""

from __future__ import annotations

import difflib
import functools
import math
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from attnexplain.plugin_api import (
    CHANNELS_FIRST,
    CHANNELS_LAST,
    NOT_A_MAP,
    CatalogEntry,
    MethodError,
    ModelLoadError,
    ModelPlugin,
    NamedModel,
    Preprocessing,
    TokenGrid,
    TokenReadout,
    WindowedAttention,
    normalize_size,
    vit_cam_block,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

#: Modules of the model constructors whose ViTs are built with ``dynamic_img_size=True`` (see
#: :func:`create`). Both build :class:`timm.models.vision_transformer.VisionTransformer` (or its
#: distilled subclass), whose dynamic mode resamples the position embeddings to the input's grid.
DYNAMIC_SIZE_MODULES = ("timm.models.vision_transformer", "timm.models.deit")
#: Keyword arguments a builder refuses: they would download weights or read another file.
_REFUSED_KWARGS = ("pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay")
#: Interpolations attnexplain's tensor resize supports; timm's others fall back to bicubic.
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def create(name: str, **kwargs: Any) -> "nn.Module":
    """``timm.create_model(name, pretrained=False, **kwargs)``: random weights, never a download.

    ViTs and DeiTs are built with ``dynamic_img_size=True`` unless ``kwargs`` say otherwise: they
    then accept the input size ``--size`` asks for (position embeddings are resampled to the token
    grid; at the native size nothing changes). Parameters are the same, so state_dicts still fit.
    """
    import timm

    refused = [key for key in _REFUSED_KWARGS if key in kwargs]
    if refused:
        raise ValueError(
            f"{', '.join(refused)} cannot be set here: attnexplain builds timm models "
            f"with random weights and loads the checkpoint's own weights into them"
        )
    if _builds_vision_transformer(name):
        kwargs.setdefault("dynamic_img_size", True)
    return timm.create_model(name, pretrained=False, **kwargs)


def _builds_vision_transformer(name: str) -> bool:
    import timm.models

    try:
        entrypoint = timm.models.model_entrypoint(timm.models.get_arch_name(name))
    except Exception:  # unknown names fail later, in create_model, with timm's own message
        return False
    return getattr(entrypoint, "__module__", None) in DYNAMIC_SIZE_MODULES


def _is_timm(model: Any) -> bool:
    return type(model).__module__.startswith("timm.")


def _is_timm_attention(module: Any) -> bool:
    """timm's standard self-attention (``timm.layers.Attention``, or a subclass keeping its forward)."""
    if module is None or not type(module).__module__.startswith("timm."):
        return False
    from timm.layers import Attention

    return (
        isinstance(module, Attention)
        and type(module).forward is Attention.forward
        and hasattr(module, "attn_drop")
        and hasattr(module, "fused_attn")
    )


def _vision_transformer(model: Any) -> bool:
    if not _is_timm(model):
        return False
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def _vit_attention_names(model: Any) -> list[str]:
    """``blocks.N.attn`` of a timm ViT with a class token whose every block uses timm's Attention."""
    if not _vision_transformer(model) or getattr(model, "cls_token", None) is None:
        return []  # no class token (global average pooling): no query to roll attention out from
    names = []
    for index, block in model.blocks.named_children():
        if not _is_timm_attention(getattr(block, "attn", None)):
            return []  # rollout multiplies every layer: one unknown block makes it meaningless
        names.append(f"blocks.{index}.attn")
    return names


@contextmanager
def _unfused(module: Any) -> Iterator[None]:
    """``module.fused_attn = False`` for the duration, restored exactly (even on error)."""
    had_own = "fused_attn" in module.__dict__
    previous = module.__dict__.get("fused_attn")
    module.fused_attn = False
    try:
        yield
    finally:
        if had_own:
            module.fused_attn = previous
        else:
            del module.fused_attn


class TimmPlugin(ModelPlugin):
    name = "timm"
    families = (
        "every timm model by name (timm:NAME) and as --arch timm:NAME",
        "ViT, DeiT incl. distilled (attention rollout, chefer, attention)",
        "Swin (window attention: rollout, chefer, attention)",
        "ConvNeXt, ResNet and other timm CNNs (CAM family)",
        "Swin, MaxViT, MambaOut and other channels-last models (CAM on their maps)",
    )
    source_prefix = "timm"

    def specificity(self, model: Any) -> int | None:
        return 20 if _is_timm(model) else None

    def builders(self) -> Mapping[str, Callable[..., Any]]:
        import timm
        import torchvision

        names = set(timm.list_models()) | set(timm.list_pretrained())  # pretrained tags: their cfg
        # attnexplain asks its own plugins first, so a plain resnet50 here would be shadowed by
        # torchvision's anyway; offering names torchvision builds only prefixed keeps the listing
        # honest. "timm:NAME" always means timm's model.
        taken = set(torchvision.models.list_models())
        found: dict[str, Callable[..., Any]] = {}
        for name in sorted(names):
            build = functools.partial(create, name)
            found[f"timm:{name}"] = build
            if name not in taken:
                found[name] = build
        return found

    def catalog(self) -> list[CatalogEntry]:
        """Every timm architecture (``timm:NAME``), at the input size of its default pretrained
        configuration, read from timm's registry: listing builds no model."""
        import timm
        from timm.models import get_pretrained_cfg

        entries = []
        for name in timm.list_models():
            config = get_pretrained_cfg(name)
            size = int(max(config.input_size[-2:])) if config is not None and config.input_size else 224
            entries.append(CatalogEntry(name, "classification", size, functools.partial(create, name)))
        return entries

    def load_named(self, name: str, weights: str | None) -> NamedModel:
        import timm

        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ModelLoadError(f"timm has no model named {name!r}.{hint}")
        if weights is not None:
            # timm names weights by a tag after a dot (resnet50.a1_in1k): suggest that architecture.
            tagged = f"{name}.{weights}"
            arch = tagged if tagged in timm.list_pretrained() else name
            raise ModelLoadError(
                f"Pretrained timm weights ({weights!r}) cannot be fetched here: timm downloads them "
                f"from the Hugging Face Hub, which attnexplain never does. Use a local checkpoint "
                f"instead: torch.save(model.state_dict(), 'model.pt') (or the hub's model.safetensors) "
                f"and run `attnexplain run model.pt IMAGE --arch timm:{arch}`; or write timm:{name} "
                f"for random weights."
            )
        try:
            module = create(name)
        except Exception as error:
            text = " ".join(str(error).split()) or type(error).__name__
            raise ModelLoadError(f"Building timm model {name} failed: {text}") from None
        return NamedModel(module=module, architecture=name, weights=None, preprocessing=self.preprocessing(module))

    def default_layer(self, model: Any) -> str | None:
        if _vit_attention_names(model):
            # A class-token ViT: its blocks' (B, tokens, C) outputs are laid out on the token grid
            # (ModelPlugin.layer_map). Explain a block's input, its first norm: the block at half
            # depth, the torchvision plugin's rule (see attnexplain.plugins.vit_cam_block).
            return f"blocks.{vit_cam_block(len(model.blocks))}.norm1"
        if _is_timm(model) and type(model).__name__ == "ConvNeXt" and len(model.stages):
            # After the last stage come norm_pre (an Identity, which the generic choice would name)
            # and the head, whose pooled (B, C, 1, 1) maps are not spatial.
            return f"stages.{len(model.stages) - 1}"
        # ResNet & co: the generic choice (layer4) is the usual one. Swin, MaxViT, MambaOut and the
        # other channels-last families: the last map the core can read, laid out by layer_layout
        # (Swin: its final norm, 7x7 at 224); ViTs without a class token: the patch projection,
        # their one map (their blocks' tokens have no grid here).
        return None

    def layer_layout(self, model: Any, layer: str) -> str | None:
        """timm's own conventions, where torch's layers say nothing (see attnexplain.layout).

        Models that declare ``output_fmt = "NHWC"`` (Swin v1/v2, MambaOut, Sequencer, Hiera-SAM2,
        ...) output channels-last features from every stage ``feature_info`` names; timm names its
        channels-last modules ``...Cl`` (MaxViT's ``PartitionAttentionCl``, ``AttentionCl``) and its
        channels-first layers ``...2d...`` (``LayerNorm2d``, ``BatchNormAct2d``, ``Conv2dSame``); its
        own ``LayerNorm``/``RmsNorm``/``SimpleNorm`` (with a forward of their own, so torch's
        definition does not apply) normalise the last dimension, the channels of a 4-D map.
        """
        if not _is_timm(model):
            return None
        if layer.rpartition(".")[2] in _ATTENTION_INTERNALS:
            # Probabilities (B, heads, tokens, tokens) and their talking-heads mixes (CaiT): square
            # like a map when there is one window, but rows of tokens, not of the image.
            return NOT_A_MAP
        if getattr(model, "output_fmt", None) == "NHWC" and layer in _feature_modules(model):
            return CHANNELS_LAST
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            return None
        kind = type(module)
        if not kind.__module__.startswith("timm."):
            return None
        if kind.__name__.endswith("Cl"):
            return CHANNELS_LAST
        if "2d" in kind.__name__ or kind.__name__ in ("GroupNorm", "GroupNorm1"):
            return CHANNELS_FIRST  # LayerNorm2d, LayerNorm2dFp32, BatchNormAct2d, Conv2dSame, ...
        if kind.__name__ in _LAST_DIMENSION_NORMS:
            return CHANNELS_LAST
        return None

    def attention_modules(self, model: Any) -> list[str]:
        return _vit_attention_names(model) or _swin_attention_names(model)

    def token_grid(self, model: Any, input_size: tuple[int, int]) -> TokenGrid | None:
        if not _vit_attention_names(model):
            return None
        patch_embed = model.patch_embed
        if getattr(model, "dynamic_img_size", False) and hasattr(patch_embed, "dynamic_feat_size"):
            height, width = patch_embed.dynamic_feat_size(tuple(input_size))
        else:
            fixed = tuple(getattr(patch_embed, "img_size", None) or ())
            if fixed and getattr(patch_embed, "strict_img_size", False) and fixed != tuple(input_size):
                raise MethodError(
                    f"This timm ViT only accepts {fixed[0]}x{fixed[1]} inputs, not "
                    f"{input_size[0]}x{input_size[1]}: drop --size, or build it with "
                    f"dynamic_img_size=True."
                )
            grid = getattr(patch_embed, "grid_size", None)
            if grid is None:
                patch = patch_embed.patch_size
                grid = (input_size[0] // patch[0], input_size[1] // patch[1])
            height, width = grid
        # _pos_embed concatenates [class token, (distillation token | register tokens), patches]:
        # num_prefix_tokens counts them all, and query 0 is the class token.
        return TokenGrid(prefix_tokens=int(model.num_prefix_tokens), height=int(height), width=int(width), query=0)

    def token_readout(self, model: Any) -> TokenReadout | None:
        names = _vit_attention_names(model)
        if not names or getattr(model, "attn_pool", None) is not None:
            return None  # an attention-pooling head reads the tokens through its own attention
        blocks = [name.removesuffix(".attn") for name in names]
        # timm's head: norm, then fc_norm on the pooled token (one of the two is the identity).
        return TokenReadout(blocks, lambda tokens: model.head(model.fc_norm(model.norm(tokens.mean(dim=1)))))

    @contextmanager
    def capture_attention(self, model: Any, names: list[str], sink: dict[str, "torch.Tensor"]) -> Iterator[None]:
        modules = {}
        for name in names:
            try:
                modules[name] = model.get_submodule(name)
            except AttributeError:
                raise MethodError(f"The model has no layer named {name!r}.") from None
        ours = [name for name in names if _is_timm_attention(modules[name])]
        windowed = [name for name in names if _is_swin_attention(modules[name])]
        others = [name for name in names if name not in ours and name not in windowed]

        def recorder(name: str):
            def hook(module: Any, args: Any, output: Any) -> None:
                sink[name] = output  # what `attn @ v` multiplies: not a copy, not detached

            return hook

        with ExitStack() as stack:
            if others:  # e.g. nn.MultiheadAttention inside a timm model: the core knows those
                stack.enter_context(super().capture_attention(model, others, sink))
            for name in ours:
                module = modules[name]
                stack.enter_context(_unfused(module))
                stack.callback(module.attn_drop.register_forward_hook(recorder(name)).remove)
            for name in windowed:
                _record_swin_window_attention(stack, model, name, modules[name], sink)
            yield

    def preprocessing(self, model: Any) -> Preprocessing | None:
        fixed = _fixed_input_size(model)
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
        if not cfg:
            return Preprocessing(size=fixed, source="timm model img_size") if fixed else None
        from timm.data import resolve_data_config

        config = resolve_data_config(pretrained_cfg=dict(cfg))
        size = fixed or normalize_size([int(v) for v in config["input_size"][-2:]])
        crop_pct = float(config.get("crop_pct") or 1.0)
        crop_mode = config.get("crop_mode") or "center"
        source = "timm pretrained_cfg"
        if crop_mode in ("squash", "border"):
            # Neither resizes the shorter side then crops; the closest thing attnexplain does is
            # resizing the whole photo to the input size (exact for squash at crop_pct 1).
            resize = None
            if crop_mode == "border" or crop_pct < 1.0:
                source += f" (crop_mode={crop_mode} approximated by resizing the whole photo)"
        else:  # timm's eval transform: Resize(floor(size / crop_pct)) then CenterCrop(size)
            resize = math.floor(min(size) / crop_pct)
        interpolation = config.get("interpolation") or "bicubic"
        if interpolation not in _INTERPOLATIONS:
            interpolation = "bicubic"
        return Preprocessing(
            size=size,
            resize=resize,
            mean=tuple(float(v) for v in config["mean"]),
            std=tuple(float(v) for v in config["std"]),
            interpolation=interpolation,
            source=source,
        )


def _is_swin_attention(module: Any) -> bool:
    """timm's Swin (v1) window attention, with the forward this plugin reads."""
    if module is None or not type(module).__module__.startswith("timm."):
        return False
    from timm.models.swin_transformer import WindowAttention

    return (
        isinstance(module, WindowAttention)
        and type(module).forward is WindowAttention.forward
        and hasattr(module, "fused_attn")
    )


def _swin_attention_names(model: Any) -> list[str]:
    """``layers.S.blocks.N.attn`` of a timm Swin (v1) whose every block uses timm's WindowAttention
    inside timm's block, input to output (else empty)."""
    if not _is_timm(model):
        return []
    from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock

    if not isinstance(model, SwinTransformer):
        return []
    names = []
    for name, module in model.named_modules():
        if isinstance(module, SwinTransformerBlock):
            if type(module)._attn is not SwinTransformerBlock._attn or not _is_swin_attention(module.attn):
                return []  # rollout multiplies every layer: one unknown block makes it meaningless
            names.append(f"{name}.attn")
    return names


def _record_swin_window_attention(stack: ExitStack, model: Any, name: str, module: Any, sink: dict[str, Any]) -> None:
    """Record a :class:`WindowedAttention` for the Swin block whose attention is ``name``.

    The block (``SwinTransformerBlock._attn``) rolls its (B, H, W, C) map by minus its shift, pads it
    at the bottom and right to whole windows and partitions it with ``window_partition``; the same
    steps on a map of position numbers say where every token of every window lies. The
    probabilities are what ``attn_drop`` returns on the unfused path (softmax of the scores plus
    the relative position bias and the shift mask), the tensor ``attn @ v`` multiplies."""
    import torch
    import torch.nn.functional as F
    from timm.models.swin_transformer import window_partition

    block = model.get_submodule(name.rpartition(".")[0])
    shape: dict[str, tuple[int, int]] = {}

    def keep_size(_: Any, args: tuple) -> None:
        shape["map"] = tuple(args[0].shape[1:3])

    def record(_: Any, args: tuple, probabilities: "torch.Tensor") -> None:
        height, width = shape["map"]
        window, shift = tuple(block.window_size), tuple(block.shift_size)
        positions = torch.arange(height * width).reshape(1, height, width, 1)
        if any(shift):
            positions = torch.roll(positions, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        pad_h, pad_w = (-height) % window[0], (-width) % window[1]
        positions = F.pad(positions, (0, 0, 0, pad_w, 0, pad_h), value=-1)
        positions = window_partition(positions, window).reshape(-1, window[0] * window[1])
        windows = positions.shape[0]
        # (B · windows, heads, T, T), the windows of one image consecutive
        grouped = probabilities.reshape(-1, windows, *probabilities.shape[1:])
        sink[name] = WindowedAttention(grouped, positions.to(probabilities.device), height, width)

    stack.enter_context(_unfused(module))
    stack.callback(block.register_forward_pre_hook(keep_size).remove)
    stack.callback(module.attn_drop.register_forward_hook(record).remove)


#: What timm's attention modules call their internals: the probabilities after softmax
#: (``attn_drop``, ``softmax``), the queries' and keys' norms, CaiT's talking-heads projections.
_ATTENTION_INTERNALS = ("attn_drop", "softmax", "q_norm", "k_norm", "proj_l", "proj_w")
#: timm's norms over the last dimension whose forward is their own (fast or fp32 paths).
_LAST_DIMENSION_NORMS = (
    "LayerNorm",
    "LayerNormFp32",
    "LayerNormAct",
    "RmsNorm",
    "RmsNormFp32",
    "SimpleNorm",
    "SimpleNormFp32",
)


def _feature_modules(model: Any) -> set[str]:
    """The modules whose outputs timm hands out as features (``feature_info``), by name."""
    info = getattr(model, "feature_info", None) or []
    return {entry["module"] for entry in info if isinstance(entry, dict) and isinstance(entry.get("module"), str)}


def _fixed_input_size(model: Any) -> tuple[int, int] | None:
    """The only input size a non-dynamic timm ViT accepts (its ``img_size``, whatever its cfg says)."""
    if not _vision_transformer(model) or getattr(model, "dynamic_img_size", False):
        return None
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if not img_size or not getattr(patch_embed, "strict_img_size", True):
        return None
    return normalize_size([int(v) for v in img_size])


plugin = TimmPlugin()
