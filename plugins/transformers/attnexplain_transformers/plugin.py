"""The Hugging Face transformers plugin: save_pretrained folders, ``hf:ORG/NAME`` from the local
cache, class names from ``id2label``, the image processor's preprocessing, and the layout of the
families' layers and attention.

Registered under the entry-point group ``attnexplain.plugins`` as ``transformers``. torch and
transformers are imported inside the methods only, so discovering the plugin costs nothing.

Attention: the global-attention families (ViT, DeiT, BEiT, DINOv2 with and without registers,
CLIP's vision tower) compute attention through ``ALL_ATTENTION_FUNCTIONS``; the default
implementation (SDPA) never forms the probabilities. While recording, the model is switched to
``eager``, whose ``eager_attention_forward`` returns ``softmax(q·kᵀ·scale)`` (after dropout, the
identity in eval mode) as the second output of the attention module: the very tensor ``@ v``
multiplies, so gradients with respect to it (``chefer``) are the model's. The same tensor is what
``output_attentions=True`` returns.
"""

from __future__ import annotations

import inspect
import re
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from attnexplain.plugin_api import (
    MethodError,
    ModelLoadError,
    ModelPlugin,
    NamedModel,
    TokenGrid,
    TokenReadout,
    WindowedAttention,
    shown,
    vit_cam_block,
)

from . import captioning, detection, prompts
from .cache import cached_snapshot
from .folder import PREPROCESSOR_CONFIG, load_folder, looks_saved_pretrained, read_json

if TYPE_CHECKING:
    import torch

    from attnexplain.plugin_api import Captioning, Detections, Preprocessing

#: Families whose encoder attends globally over [class token, (distillation | register tokens),
#: patches]: their attention is recorded and rolled out; a block's tokens are laid on the grid.
GLOBAL_ATTENTION = ("vit", "deit", "beit", "dinov2", "dinov2_with_registers", "clip")
#: Families whose position embeddings are resampled to another input size only when asked.
INTERPOLATE_ON_REQUEST = ("vit", "deit", "beit", "clip")
#: Families attending inside shifted windows: recorded as WindowedAttention.
WINDOWED_ATTENTION = ("swin", "swinv2")
SWIN_BLOCKS = ("SwinLayer", "Swinv2Layer")
#: Tokens of a global-attention model's input that a folder may ask for (through its preprocessing's
#: size and its patch size): each attends to every other, so memory grows with their square, and
#: recording keeps every layer's. A ViT-S/8 at 1024 pixels has this many.
MAX_ATTENTION_TOKENS = 128 * 128
#: Convolutional families: Grad-CAM on their last stage.
CONVOLUTIONAL = ("convnext", "convnextv2", "resnet")
# A Hub repository id: ORG/NAME (or NAME) of letters, digits, "-", "_", ".".
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
# transformers' placeholder names when a config gives none: not class names.
_PLACEHOLDER_LABEL = re.compile(r"^LABEL_\d+$")


def _is_transformers(model: Any) -> bool:
    return type(model).__module__.startswith("transformers.") and hasattr(model, "config")


def _model_type(model: Any) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None) if _is_transformers(model) else None


def _vision_config(model: Any) -> Any:
    """The configuration the model's vision layers are built from: a composite model's (CLIP's)
    ``vision_config`` sub-configuration, else the config itself. A ``vision_config`` that the class
    does not declare (a plain dict a ViT's config.json carries along) is not what the model reads."""
    config = model.config
    if "vision_config" in (getattr(type(config), "sub_configs", None) or {}):
        return getattr(config, "vision_config", None) or config
    return config


def _image_size(model: Any) -> tuple[int, int] | None:
    size = getattr(_vision_config(model), "image_size", None)
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return (int(size[0]), int(size[1]))
    return None


def _attention_class(model: Any) -> type | None:
    """The module class whose second output is the attention probabilities (what transformers'
    own ``output_attentions`` records), for the global-attention families."""
    if _model_type(model) not in GLOBAL_ATTENTION:
        return None
    recorded = (getattr(model, "_can_record_outputs", None) or {}).get("attentions")
    return recorded if isinstance(recorded, type) else None


class TransformersPlugin(ModelPlugin):
    name = "transformers"
    families = (
        "Hugging Face image classifiers: save_pretrained folders and hf:ORG/NAME (local cache)",
        "ViT, DeiT incl. distilled, BEiT, DINOv2 incl. registers, CLIP vision "
        "(attention, rollout, chefer; Grad-CAM on blocks)",
        "Swin v1/v2 (windowed attention: rollout, chefer, attention)",
        "ConvNeXt v1/v2, ResNet (CAM family)",
        "DETR, Conditional DETR (decoder cross-attention per box, chefer; CAM family), Deformable DETR (CAM family)",
        "CLIP, SigLIP with --prompt/--prompts (zero-shot classifier of the prompts; prompts.py)",
        "VisionEncoderDecoderModel captioners, ViT encoder (cross-attention per word, layer and head; "
        "Chefer's relevance; Grad-CAM; captioning.py)",
    )
    source_prefix = "hf"

    # --- loading ----------------------------------------------------------------------------------

    def specificity(self, model: Any) -> int | None:
        if prompts.is_prompt_classifier(model):
            return 30
        return 20 if _is_transformers(model) else None

    def with_prompts(self, model: Any, texts: tuple[str, ...] | None) -> NamedModel | None:
        if prompts.is_dual_encoder(model) or prompts.is_prompt_classifier(model):
            return prompts.with_prompts(model, texts)
        return super().with_prompts(model, texts)

    def split_spec(self, rest: str) -> tuple[str, str | None]:
        return rest, None  # hf:C:\models\x is one name; a revision is not chosen here

    def claims_path(self, path: Path) -> bool:
        return looks_saved_pretrained(Path(path))

    def load_path(self, path: Path, *, trust_model: bool = False) -> NamedModel:
        folder = Path(path)
        module, ignored = load_folder(folder, trust_model)
        config = module.config
        preprocessing = self._folder_preprocessing(folder, module)
        grid = self.token_grid(module, preprocessing.size) if preprocessing is not None else None
        if grid is not None and grid.height * grid.width > MAX_ATTENTION_TOKENS:
            raise ModelLoadError(
                f"{folder}: its {preprocessing.size[0]}×{preprocessing.size[1]} input in patches of "
                f"{shown(_vision_config(module).patch_size)} makes {grid.height * grid.width:,} tokens, "
                f"each attending to every other; a model folder may ask for at most "
                f"{MAX_ATTENTION_TOKENS:,} (DINOv2 at 518 pixels has 1,369)."
            )
        notes = [f"transformers {config.model_type} from {folder}"]
        labels = self.labels(module)
        ids = [int(key) for key in config.id2label] if labels is not None else []  # labels: ids are numbers
        beyond = sorted(index for index in ids if not 0 <= index < len(labels or ()))
        if beyond:
            notes.append(
                f"config.json's id2label names class ids {', '.join(map(str, beyond[:5]))} beyond the model's "
                f"{len(labels or ())} classes: left out"
            )
        if ignored:
            notes.append(
                f"config.json's {', '.join(ignored)} ignored: a model folder does not choose the "
                f"code that runs (attention: transformers' default, eager while recording)"
            )
        return NamedModel(
            module=module,
            architecture=type(module).__name__,
            weights=str(folder),
            labels=labels,
            preprocessing=preprocessing,
            notes=tuple(notes),
            random_weights=False,
        )

    def load_named(self, name: str, weights: str | None) -> NamedModel:
        if Path(name).is_dir():  # hf:C:\models\x, hf:./folder
            if not looks_saved_pretrained(Path(name)):
                raise ModelLoadError(
                    f"hf:{name} is a folder without what save_pretrained writes (config.json and model.safetensors)."
                )
            return self.load_path(Path(name))
        if not _REPO_ID.match(name) or ".." in name:
            raise ModelLoadError(f"hf:{name} is neither a folder nor a Hugging Face repository id (ORG/NAME).")
        return self.load_path(cached_snapshot(name))

    def labels(self, model: Any) -> list[str] | None:
        if not _is_transformers(model):
            return None
        id2label = getattr(model.config, "id2label", None) or {}
        try:
            by_index = {int(key): str(value) for key, value in id2label.items()}
        except (TypeError, ValueError):
            return None
        if not by_index:
            return None
        # Each name at its class id, as the head scores them: ids may skip numbers (COCO's 91 ids
        # hold 80 classes); a gap is named as the core names a class without labels.
        count = (detection.class_count(model) if detection.detector_type(model) else None) or len(by_index)
        names = [by_index.get(index, f"class {index}") for index in range(count)]
        if all(_PLACEHOLDER_LABEL.match(name) for name in by_index.values()):
            return None
        return names

    def preprocessing(self, model: Any) -> "Preprocessing | None":
        if prompts.is_prompt_classifier(model):
            return self.preprocessing(model.dual)
        if not _is_transformers(model):
            return None
        from .preprocessing import family_default

        if detection.detector_type(model):
            return family_default(model.config.model_type, None, detection.detector_preprocessing)
        if captioning.is_captioner(model) and hasattr(model.config, "encoder"):  # the encoder's processor
            return family_default(model.config.encoder.model_type, model.config.encoder.image_size)
        size = _image_size(model)
        return family_default(model.config.model_type, size[0] if size and size[0] == size[1] else size)

    def _folder_preprocessing(self, folder: Path, model: Any) -> "Preprocessing | None":
        from .preprocessing import from_processor_config

        path = folder / PREPROCESSOR_CONFIG
        if not path.exists():
            return self.preprocessing(model)
        translate = detection.detector_preprocessing if detection.detector_type(model) else from_processor_config
        return translate(read_json(path, "preprocessor config"), f"{path.name} of {folder.name}")

    # --- layers ------------------------------------------------------------------------------------

    def task(self, model: Any) -> str:
        if detection.detector_type(model):
            return "detection"
        if captioning.is_captioner(model):
            return "captioning"
        # Its scores are the prompts' own (softmax, a sigmoid each, one prompt's cosine similarity):
        # not a one-output classifier whose value the core would show instead.
        return "zero-shot classification" if prompts.is_prompt_classifier(model) else "classification"

    def captioning(self, model: Any) -> "Captioning | None":
        return captioning.captioning(model) if captioning.is_captioner(model) else None

    def default_method(self, model: Any) -> str | None:
        if detection.detector_type(model):  # the explained box's query, else its backbone
            return "attention" if detection.cross_attention_modules(model) else "gradcam"
        return prompts.default_method(model) if prompts.is_prompt_classifier(model) else None

    def detections(self, model: Any, output: Any) -> "list[Detections] | None":
        return detection.detections(model, output) if detection.detector_type(model) else None

    def box_scores(self, model: Any, output: Any) -> "list[torch.Tensor] | None":
        return detection.box_scores(model, output) if detection.detector_type(model) else None

    def default_layer(self, model: Any) -> str | None:
        if detection.detector_type(model):
            return detection.backbone_layer(model)
        if prompts.is_prompt_classifier(model):
            return prompts.default_layer(model)
        model_type = _model_type(model)
        if model_type in GLOBAL_ATTENTION:
            blocks = self._blocks(model)
            if blocks:
                # The input of the block at half depth (its first norm), as for torchvision's and
                # timm's ViTs (attnexplain.plugins.vit_cam_block says why).
                block = blocks[vit_cam_block(len(blocks))]
                return f"{block}.{_first_norm(model.get_submodule(block))}"
        if model_type in WINDOWED_ATTENTION:
            return f"{model.base_model_prefix}.layernorm"  # the last stage's tokens, normalised
        if model_type in CONVOLUTIONAL:
            stages = model.base_model.encoder.stages
            return f"{model.base_model_prefix}.encoder.stages.{len(stages) - 1}"
        return None

    def _blocks(self, model: Any) -> list[str]:
        return [name.rpartition(".")[0] for name in self.attention_modules(model)]

    def layer_map(
        self, model: Any, layer: str, output: "torch.Tensor", input_size: tuple[int, int]
    ) -> "torch.Tensor | None":
        if _model_type(model) in WINDOWED_ATTENTION:
            return _swin_layer_map(model, output, input_size)
        if prompts.is_prompt_classifier(model) and prompts.pooling_head(model):
            return prompts.layer_map(model, output, input_size)
        return super().layer_map(model, layer, output, input_size)

    def select_output(self, model: Any, layer: str, output: Any) -> "torch.Tensor | None":
        import torch

        if isinstance(output, torch.Tensor):
            return output
        # A Swin stage or block returns (hidden states, ...): the first is the tokens it passes on.
        first = output[0] if isinstance(output, (tuple, list)) and output else None
        return first if isinstance(first, torch.Tensor) else None

    # --- attention ---------------------------------------------------------------------------------

    def attention_modules(self, model: Any) -> list[str]:
        if detection.detector_type(model):
            return list(detection.attention_roles(model))
        if prompts.is_prompt_classifier(model):
            return prompts.attention_modules(model)
        if _model_type(model) in WINDOWED_ATTENTION:
            return [f"{name}.attention" for name in _swin_layers(model)]
        attention_class = _attention_class(model)
        if attention_class is None:
            return []
        return [name for name, module in model.named_modules() if isinstance(module, attention_class)]

    def token_grid(self, model: Any, input_size: tuple[int, int]) -> TokenGrid | None:
        if detection.detector_type(model):
            return detection.feature_grid(model, input_size) if detection.cross_attention_modules(model) else None
        if prompts.is_prompt_classifier(model):
            return prompts.token_grid(model, input_size)
        if _attention_class(model) is None:
            return None
        patch = getattr(_vision_config(model), "patch_size", None)
        patch_h, patch_w = (patch, patch) if isinstance(patch, int) else tuple(patch)
        # Embeddings concatenate [class token, distillation token (DeiT), register tokens
        # (DINOv2 with registers), patches]; query 0 is the class token.
        embeddings = _embeddings(model)
        prefix = 1
        if getattr(embeddings, "distillation_token", None) is not None:
            prefix += 1
        registers = getattr(embeddings, "register_tokens", None)
        if registers is not None:
            prefix += int(registers.shape[1])
        return TokenGrid(prefix_tokens=prefix, height=input_size[0] // patch_h, width=input_size[1] // patch_w, query=0)

    def token_readout(self, model: Any) -> TokenReadout | None:
        if prompts.is_prompt_classifier(model):
            return prompts.token_readout(model)
        head = _head_on_pooled_tokens(model)
        names = self.attention_modules(model) if head is not None else []
        if not names:
            return None
        # Each attention module's parent is its block, whose output is the (B, tokens, C) sequence.
        return TokenReadout([name.rpartition(".")[0] for name in names], lambda tokens: head(tokens.mean(dim=1)))

    def forward_kwargs(self, model: Any, input_size: tuple[int, int]) -> dict[str, Any]:
        if prompts.is_prompt_classifier(model):  # both towers take the argument, CLIP's and SigLIP's
            resized = _image_size(model.dual) not in (None, tuple(input_size))
            return {"interpolate_pos_encoding": True} if resized else {}
        if not _is_transformers(model) or _image_size(model) in (None, tuple(input_size)):
            return {}
        # Position embeddings resampled to the input's grid. CLIP's classifier passes the argument
        # on to its vision tower through **kwargs; DINOv2 always resamples and takes no argument.
        if (
            _model_type(model) in INTERPOLATE_ON_REQUEST
            or "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        ):
            return {"interpolate_pos_encoding": True}
        return {}

    @contextmanager
    def recording(self, model: Any) -> Iterator[None]:
        """Eager attention for the duration (SDPA forms no probabilities), then what it was."""
        if detection.detector_type(model):
            with detection.eager_attention(model):
                yield
            return
        if prompts.is_prompt_classifier(model):
            model = model.dual
        config = getattr(model, "config", None)
        previous = getattr(config, "_attn_implementation", None)
        if not _is_transformers(model) or previous in (None, "eager"):
            yield
            return
        model.set_attn_implementation("eager")
        try:
            yield
        finally:
            model.set_attn_implementation(previous)

    @contextmanager
    def capture_attention(
        self, model: Any, names: list[str], sink: dict[str, "torch.Tensor | WindowedAttention"]
    ) -> Iterator[None]:
        if _model_type(model) in WINDOWED_ATTENTION:
            with self.recording(model), _capture_swin_attention(model, names, sink):
                yield
            return
        if detection.detector_type(model):
            with detection.capture_attention_layers(model, names, sink):
                yield
            return
        probe = prompts.capture_attention(model, names, sink) if prompts.is_prompt_classifier(model) else None
        if probe is not None:  # SigLIP: over [its pooling probe, patches]
            with self.recording(model), probe:
                yield
            return
        attention_class = (
            prompts.attention_class(model) if prompts.is_prompt_classifier(model) else _attention_class(model)
        ) or ()
        modules = {
            name: module
            for name, module in model.named_modules()
            if name in names and isinstance(module, attention_class)
        }
        unknown = [name for name in names if name not in modules]
        if unknown:
            raise MethodError(
                f"Layer {unknown[0]!r} is not an attention module whose probabilities "
                f"the transformers plugin records ({', '.join(self.attention_modules(model)) or 'none here'})."
            )

        def recorder(name: str):
            def hook(module: Any, args: Any, output: Any) -> None:
                weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
                if weights is None:
                    raise MethodError(
                        f"Layer {name!r} returned no attention probabilities (its "
                        f"attention implementation is not eager)."
                    )
                sink[name] = weights  # what `@ v` multiplies: not a copy, not detached

            return hook

        # recording() again here: capture works on its own (explain() on an in-memory model) and
        # inside the core's recording context alike (it is then a no-op).
        with ExitStack() as stack:
            stack.enter_context(self.recording(model))
            for name, module in modules.items():
                stack.callback(module.register_forward_hook(recorder(name)).remove)
            yield

    def class_scores(self, model: Any, output: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
        if detection.detector_type(model):
            return detection.class_scores(model, output)
        if prompts.is_prompt_classifier(model) or prompts.is_dual_encoder(model):
            return prompts.class_scores(model, output)
        return super().class_scores(model, output)

    def refuse_method(self, model: Any, method: str) -> str | None:
        if detection.detector_type(model):
            return detection.refuse_method(model, method)
        if _model_type(model) in WINDOWED_ATTENTION and method == "legrad":
            return (
                "legrad reads each layer's tokens through the head, which Swin's patch merging "
                "between stages does not allow; use --method chefer or rollout."
            )
        return None


def _swin_layers(model: Any) -> list[str]:
    """The shifted-window blocks (``SwinLayer``, ``Swinv2Layer``), input to output."""
    return [
        name
        for name, module in model.named_modules()
        if type(module).__name__ in SWIN_BLOCKS and hasattr(module, "attention")
    ]


@contextmanager
def _capture_swin_attention(model: Any, names: list[str], sink: dict[str, WindowedAttention]) -> Iterator[None]:
    """Each block's softmax, with where every window token lies on the block's map.

    A block pads its (height, width) map at the bottom/right to whole windows, rolls it by
    ``-shift_size`` (every other block) and cuts it into windows, which its ``attention`` attends
    within: the same partition torchvision's Swin makes, so the same positions. The window and
    shift are read when the attention runs (v1 shrinks them for maps smaller than a window).
    """
    from attnexplain.plugin_api import capture_softmax, shifted_window_positions

    dimensions: dict[str, tuple[int, int]] = {}

    def keep_dimensions(block: str):
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            size = kwargs.get("input_dimensions", args[1] if len(args) > 1 else None)
            dimensions[block] = (int(size[0]), int(size[1]))

        return hook

    def record(name: str, module: Any, args: tuple, probabilities: "torch.Tensor") -> None:
        block = name.rpartition(".")[0]
        height, width = dimensions[block]
        layer = model.get_submodule(block)
        window, shift = int(layer.window_size), int(layer.shift_size)
        positions = shifted_window_positions(height, width, [window, window], [shift, shift])
        windows = positions.shape[0]
        sink[name] = WindowedAttention(
            probabilities.reshape(-1, windows, *probabilities.shape[1:]),
            positions.to(probabilities.device),
            height,
            width,
        )

    blocks = set(_swin_layers(model))
    unknown = [name for name in names if name.rpartition(".")[0] not in blocks or not name.endswith(".attention")]
    if unknown:
        raise MethodError(f"Layer {unknown[0]!r} is not the attention of a Swin block.")
    with ExitStack() as stack:
        for name in names:
            block = name.rpartition(".")[0]
            handle = model.get_submodule(block).register_forward_pre_hook(keep_dimensions(block), with_kwargs=True)
            stack.callback(handle.remove)
        stack.enter_context(capture_softmax(model, names, record))
        yield


def _head_on_pooled_tokens(model: Any) -> Any:
    """The model's head as a function of one pooled (B, C) token, as LeGrad reads a block: the final
    norm and classifier(s) of ViT and DeiT (a distilled DeiT averages its two heads, as its logits
    do), CLIP's classifier (it reads the encoder's tokens without a norm). None for the others:
    BEiT's and DINOv2's heads pool tokens their own way."""
    model_type = _model_type(model)
    if model_type == "clip" and hasattr(model, "classifier"):
        return model.classifier
    if model_type not in ("vit", "deit") or not hasattr(model.base_model, "layernorm"):
        return None
    norm = model.base_model.layernorm
    if hasattr(model, "distillation_classifier"):
        return lambda pooled: (model.cls_classifier(norm(pooled)) + model.distillation_classifier(norm(pooled))) / 2
    return (lambda pooled: model.classifier(norm(pooled))) if hasattr(model, "classifier") else None


def _first_norm(block: Any) -> str:
    from torch import nn

    for name, child in block.named_children():
        if isinstance(child, nn.LayerNorm):
            return name
    raise MethodError(f"{type(block).__name__} has no LayerNorm to explain.")


def _embeddings(model: Any) -> Any:
    base = model.base_model
    return getattr(base, "embeddings", None) or getattr(getattr(base, "vision_model", None), "embeddings", None)


def _swin_layer_map(model: Any, output: "torch.Tensor", input_size: tuple[int, int]) -> "torch.Tensor | None":
    """A Swin (B, tokens, C) sequence laid on the stage grid whose size it has. Every stage halves
    the grid (rounding up: odd maps are padded before merging), so the token count names the stage."""
    if output.dim() != 3:
        return None
    config = model.config
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    height, width = -(-input_size[0] // patch), -(-input_size[1] // patch)
    for _ in range(len(config.depths)):
        if height * width == output.shape[1]:
            return output.transpose(1, 2).reshape(output.shape[0], output.shape[2], height, width)
        height, width = -(-height // 2), -(-width // 2)
    return None


plugin = TransformersPlugin()
