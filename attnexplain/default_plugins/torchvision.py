"""The torchvision plugin: builders, weights, preprocessing and attention for torchvision's models."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from ..plugin_api import (
    CatalogEntry,
    Detections,
    ModelLoadError,
    ModelPlugin,
    NamedModel,
    Preprocessing,
    TokenGrid,
    TokenReadout,
    from_torchvision_transforms,
    vit_cam_block,
)
from .torchvision_detection import (
    box_scores,
    detections,
    detector_layer,
    detector_preprocessing,
    each_box_score,
    is_detector,
)

if TYPE_CHECKING:
    import torch

#: Set to 1 to never try downloading weights that are not in torchvision's cache.
OFFLINE_ENV = "ATTNEXPLAIN_OFFLINE"
_DOWNLOAD_TIMEOUT_S = 30


def _build_resnet(block: str = "BasicBlock", layers: list[int] = (2, 2, 2, 2), **kwargs: Any):
    """torchvision's ResNet class with a JSON-describable block, for small custom ResNets."""
    from torchvision.models import resnet

    blocks = {"BasicBlock": resnet.BasicBlock, "Bottleneck": resnet.Bottleneck}
    if block not in blocks:
        raise ValueError(f"block must be one of {', '.join(blocks)}, not {block!r}")
    return resnet.ResNet(blocks[block], list(layers), **kwargs)


def _build_vision_transformer(**kwargs: Any):
    from torchvision.models import VisionTransformer

    return VisionTransformer(**kwargs)


class TorchvisionPlugin(ModelPlugin):
    name = "torchvision"
    families = (
        "torchvision classification builders",
        "segmentation (a class's pixels)",
        "detection (a box's score)",
        "ViT, Swin, MaxViT (attention)",
        "EfficientNet/MobileNetV3/RegNetY (SE gates)",
    )
    source_prefix = "torchvision"

    def specificity(self, model: Any) -> int | None:
        return 10 if _defined_in(model, "torchvision.models") else None

    def builders(self) -> Mapping[str, Callable[..., Any]]:
        import torchvision

        found: dict[str, Callable[..., Any]] = {name: _builder(name) for name in torchvision.models.list_models()}
        # Constructors for models smaller than any builder (as the shipped samples are).
        found["ResNet"] = _build_resnet
        found["VisionTransformer"] = _build_vision_transformer
        return found

    def catalog(self) -> list[CatalogEntry]:
        import torchvision

        entries = [
            CatalogEntry(
                name, "classification", _smallest_input(name), _builder(name), default_size=_weights_size(name)
            )
            for name in torchvision.models.list_models(module=torchvision.models)
        ]
        entries += [
            CatalogEntry(name, "segmentation", 96, _builder(name), default_size=_weights_size(name))
            for name in torchvision.models.list_models(module=torchvision.models.segmentation)
        ]
        entries += [
            CatalogEntry(name, "detection", *_small_detector(name), default_size=_detector_size(name))
            for name in torchvision.models.list_models(module=torchvision.models.detection)
        ]
        return entries

    def load_named(self, name: str, weights: str | None) -> NamedModel:
        import torchvision

        if name not in torchvision.models.list_models():
            import difflib

            close = difflib.get_close_matches(name, torchvision.models.list_models(), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ModelLoadError(f"torchvision has no model named {name!r}.{hint}")
        if weights is None:
            return NamedModel(module=_builder(name)(), architecture=name, weights=None)
        enum = torchvision.models.get_model_weights(name)
        available = [member.name for member in enum] + ["DEFAULT"]
        if weights not in available:
            raise ModelLoadError(f"{name} has no weights {weights!r}; available: {', '.join(available)}.")
        chosen = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
        cached = weights_cache_path(chosen.url)
        if not cached.exists() and os.environ.get(OFFLINE_ENV) == "1":
            raise ModelLoadError(_missing_weights_message(name, chosen, cached))
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
        try:
            module = _with_rectified_features(torchvision.models.get_model(name, weights=chosen))
        except (OSError, RuntimeError) as error:
            if cached.exists() and "HTTP" not in str(error) and "urlopen" not in str(error):
                raise ModelLoadError(f"Cannot load cached weights {cached}: {str(error).splitlines()[0]}") from None
            raise ModelLoadError(_missing_weights_message(name, chosen, cached)) from None
        finally:
            socket.setdefaulttimeout(previous)
        return NamedModel(
            module=module,
            architecture=name,
            weights=str(chosen),
            labels=list(chosen.meta.get("categories") or []) or None,
            preprocessing=from_torchvision_transforms(chosen.transforms(), source=str(chosen)),
        )

    def task(self, model: Any) -> str:
        if is_detector(model):
            return "detection"
        return "segmentation" if _is_segmentation(model) else "classification"

    def default_method(self, model: Any) -> str | None:
        # A box's score draws on the features around the box. LayerCAM weights every position by its
        # own gradient, so the map stays where the score's evidence is; Grad-CAM's per-channel mean
        # gradient mixes in the whole image, where other objects' evidence can cancel the box's.
        return "layercam" if is_detector(model) else None

    def default_layer(self, model: Any) -> str | None:
        from torchvision.models import VGG, AlexNet, SqueezeNet, VisionTransformer

        if isinstance(model, VisionTransformer):
            # A block's input (its first norm), laid out on the token grid: the block at half depth,
            # where the sample ViT's CAMs point at the object most often (see vit_cam_block).
            blocks = [name for name, _ in model.encoder.layers.named_children()]
            return f"encoder.layers.{blocks[vit_cam_block(len(blocks))]}.ln_1"

        # After `features` these end in pooling to a fixed size (which upsamples small maps) or in
        # the classifier's own class-score convolution: the feature map itself is the one to explain.
        if isinstance(model, (AlexNet, VGG, SqueezeNet)):
            return "features"
        from .torchvision_densenet import RECTIFIED_LAYER, RectifiedDenseNet

        if isinstance(model, RectifiedDenseNet):
            # What the classifier reads: the features after DenseNet's ReLU (docs/methods.md).
            return RECTIFIED_LAYER
        if _is_segmentation(model):
            # The backbone's last stage, as for classifiers; after it come the class-score heads.
            last = list(model.backbone.named_children())[-1][0]
            return f"backbone.{last}"
        if is_detector(model):
            return detector_layer(model)
        return None

    def class_scores(self, model: Any, output: Any):
        if is_detector(model) and isinstance(output, list):
            return box_scores(model, output)
        if not (_is_segmentation(model) and isinstance(output, dict)):
            return super().class_scores(model, output)
        import torch.nn.functional as F

        # A class's score is its mean logit over the pixels predicted as that class (the pixels
        # a user asks about); its "probability" is the share of the image those pixels cover.
        logits = output["out"]
        classes = logits.shape[1]
        predicted = F.one_hot(logits.detach().argmax(dim=1), classes).permute(0, 3, 1, 2).to(logits.dtype)
        pixels = predicted.sum(dim=(2, 3))
        scores = (logits * predicted).sum(dim=(2, 3)) / pixels.clamp_min(1)
        return scores, pixels / pixels.sum(dim=1, keepdim=True)

    def detections(self, model: Any, output: Any) -> list[Detections] | None:
        return detections(output) if is_detector(model) and isinstance(output, list) else None

    def box_scores(self, model: Any, output: Any) -> "list[torch.Tensor] | None":
        return each_box_score(output) if is_detector(model) and isinstance(output, list) else None

    def gate_modules(self, model: Any) -> list[str]:
        from torchvision.ops import SqueezeExcitation

        # EfficientNet, MobileNetV3 and RegNetY gate their channels with this block.
        return [name for name, module in model.named_modules() if isinstance(module, SqueezeExcitation)]

    def attention_modules(self, model: Any) -> list[str]:
        from torchvision.models import VisionTransformer

        from .torchvision_attention import windowed_attention_modules

        if not isinstance(model, VisionTransformer):
            return windowed_attention_modules(model)
        return [f"encoder.layers.{name}.self_attention" for name, _ in model.encoder.layers.named_children()]

    def token_readout(self, model: Any) -> TokenReadout | None:
        from torchvision.models import VisionTransformer

        if not isinstance(model, VisionTransformer):
            return None  # windowed attention: no token sequence a head reads
        blocks = [f"encoder.layers.{name}" for name, _ in model.encoder.layers.named_children()]
        return TokenReadout(blocks, lambda tokens: model.heads(model.encoder.ln(tokens.mean(dim=1))))

    @contextmanager
    def capture_attention(self, model: Any, names: list[str], sink: dict[str, Any]) -> Iterator[None]:
        from .torchvision_attention import capture_windowed_attention, windowed_attention_modules

        windowed = bool(windowed_attention_modules(model))
        capture = capture_windowed_attention if windowed else super().capture_attention
        with capture(model, names, sink):
            yield

    def layer_map(self, model: Any, layer: str, output: Any, input_size: tuple[int, int]) -> Any:
        from torchvision.models import SwinTransformer

        # Swin works channels-last, (B, H, W, C), from after the patch embedding's convolution
        # (features.0.0) until `permute` turns the final map around for pooling.
        channels_last = layer.startswith(("features", "norm")) and layer != "features.0.0"
        if isinstance(model, SwinTransformer) and output.dim() == 4 and channels_last:
            return output.permute(0, 3, 1, 2)
        return super().layer_map(model, layer, output, input_size)

    def token_grid(self, model: Any, input_size: tuple[int, int]) -> TokenGrid | None:
        from torchvision.models import VisionTransformer

        if not isinstance(model, VisionTransformer):
            return None
        # conv_proj cuts the image into non-overlapping patch_size squares; the class token is
        # prepended (VisionTransformer.forward), so token 0 is the class token.
        return TokenGrid(
            prefix_tokens=1, height=input_size[0] // model.patch_size, width=input_size[1] // model.patch_size
        )

    def preprocessing(self, model: Any) -> Preprocessing | None:
        if is_detector(model):
            return detector_preprocessing(model)
        image_size = getattr(model, "image_size", None)
        if isinstance(image_size, int):  # VisionTransformer only accepts its own image_size
            return Preprocessing(size=(image_size, image_size), source="model image_size")
        return None


def _is_segmentation(model: Any) -> bool:
    return _defined_in(model, "torchvision.models.segmentation")


def _defined_in(model: Any, package: str) -> bool:
    """Whether the model's class, or a class it derives from (a user's subclass), comes from ``package``."""
    return any(cls.__module__.startswith(package) for cls in type(model).__mro__)


def _builder(name: str) -> Callable[..., Any]:
    """torchvision's builder for ``name``, never fetching pretrained backbone weights."""
    import functools

    import torchvision

    segmentation = torchvision.models.list_models(module=torchvision.models.segmentation)
    detection = torchvision.models.list_models(module=torchvision.models.detection)
    extra = {"weights_backbone": None} if name in segmentation or name in detection else {}
    build = functools.partial(torchvision.models.get_model, name, **extra)
    if name.startswith("densenet"):
        return lambda **kwargs: _with_rectified_features(build(**kwargs))
    return build


def _with_rectified_features(model: Any) -> Any:
    """A DenseNet whose rectified features are a layer (see torchvision_densenet); others unchanged."""
    from .torchvision_densenet import with_rectified_features

    return with_rectified_features(model)


def _smallest_input(name: str) -> int:
    """A small square input each classification builder accepts and still maps to several positions.

    Transformers need their own size. CNNs work from 64 pixels (inception_v3 from 75), but that
    leaves a 2×2 final map, on which a randomly initialised model's Grad-CAM is sometimes entirely
    negative (zero after ReLU); 128 leaves 4×4.
    """
    if name.startswith(("vit_", "maxvit")):
        return 224  # fixed positional embeddings / partition sizes
    return 128


def _weights_size(name: str) -> int | None:
    """The input side of ``name``'s DEFAULT weights, read from their preset (nothing downloaded):
    the centre crop of a classifier's, the resized shorter side of a segmentation model's."""
    import torchvision

    preset = from_torchvision_transforms(torchvision.models.get_model_weights(name).DEFAULT.transforms(), source=name)
    return preset.size[0] if preset is not None else None


def _detector_size(name: str) -> int:
    """The side a detector resizes photos to itself (what :func:`detector_preprocessing` reads off
    the built model's ``transform``), known without building it: SSD300 and SSDlite320 have a fixed
    size, the 320 px MobileNet Faster R-CNN is built with ``min_size=320``, and every other
    torchvision detector (R-CNNs, RetinaNet, FCOS) keeps the default ``min_size=800``."""
    if name.startswith("ssd300"):
        return 300
    return 320 if name.startswith("ssdlite320") or "_320_" in name else 800


def _small_detector(name: str) -> tuple[int, Callable[..., Any]]:
    """An input size and a builder for checking a detector with random weights.

    Random weights score every box near 1/classes, below the default thresholds: the check keeps
    every box, so that there is a box to explain. Detectors that resize their input themselves are
    told a small size; SSD and SSDlite have a fixed one.
    """
    import functools

    if name.startswith("ssd"):
        size = 300 if name.startswith("ssd300") else 320
        build = functools.partial(_builder(name), score_thresh=0.0)
    else:
        threshold = {"box_score_thresh": 0.0} if "rcnn" in name else {"score_thresh": 0.0}
        size, build = 160, functools.partial(_builder(name), min_size=160, max_size=160, **threshold)
    if "mobilenet" in name:
        build = functools.partial(_with_lasting_signal, build)
    return size, build


def _with_lasting_signal(build: Callable[[], Any]) -> Any:
    """The MobileNetV3 detectors' random backbone initialisation (He, fan-out) treats a depthwise
    convolution as if each output mixed every channel: its weights come out ~30× too small,
    activations shrink by ~10⁻⁹ through the backbone, every class scores the same and gradients
    underflow. He fan-in initialisation (fan-in is 9 for a 3×3 depthwise kernel) keeps the signal,
    which is what checking the explanation plumbing needs."""
    import torch

    model = build()
    for module in model.backbone.modules():  # the heads keep their own initialisation
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
    return model


def weights_cache_path(url: str) -> Path:
    """Where torchvision's weights API looks for (and downloads) ``url``: $TORCH_HOME/hub/checkpoints."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _missing_weights_message(name: str, weights: Any, cached: Path) -> str:
    return (
        f"Weights {weights} for {name} are not in torchvision's cache and cannot be downloaded "
        f"here: place the file {cached.name} (from {weights.url}) at {cached}."
    )


plugin = TorchvisionPlugin()
