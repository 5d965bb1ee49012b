"""Reading a folder written by ``save_pretrained`` (and a snapshot of the Hugging Face cache), never
running code from it unless the user trusts it.

What the folder may ask for is checked before transformers builds anything: config.json is plain
JSON of a bounded size; ``auto_map`` (custom modelling code that transformers would import from the
folder) needs ``trust_model``, and so do weights stored only as ``pytorch_model.bin`` (a pickle); the
model it describes is within :data:`MODEL_LIMITS` (50,000 layers would take hours to build); the
parameters the config asks for must be held by the weights file (a config with ``hidden_size``
10⁶ next to a 1 MB file would otherwise allocate terabytes of random weights). Keys that choose code
(an attention implementation naming a Hub kernel, ...) are dropped, a quantized model is refused, and
transformers gets the configuration built from what was checked, never the file itself.
"""

from __future__ import annotations

import json
import re
import struct
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from attnexplain.plugin_api import FILE_MAX_SIZE, ModelLoadError, UntrustedModelError, not_a_regular_file, shown

from .detection import detector_class_name, labels_at_their_ids

if TYPE_CHECKING:
    from torch import nn

CONFIG = "config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
#: config.json of ImageNet-21k's 21,843 labels is ~1 MB; anything far larger is not a config.
MAX_JSON_BYTES = 4 * 1024 * 1024
#: A config nests a sub-configuration, its label map and a list or two: a few levels.
MAX_JSON_DEPTH = 32
#: No size in a vision model's config (widths, depths, heads, labels) comes near a million.
MAX_CONFIG_INT = 1_000_000
#: safetensors' own reader refuses headers over 100 MB; real ones are a few hundred kB.
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: The parameters a config asks for may exceed what the file holds by this much (buffers saved as
#: parameters, tied weights): beyond it, the config is not the file's.
PARAMETER_SLACK = 1.05
#: config.json keys (at any depth: a composite model's vision_config has its own) that choose which
#: code transformers runs or which file it reads instead of the one checked here. They are dropped
#: before transformers sees the config: attnexplain picks the attention (transformers' default,
#: sdpa, or eager where the model has no other; eager while recording), never the folder.
CODE_SELECTING_KEYS = (
    # A Hub kernel's name ("kernels-community/flash-attn3") is downloaded and its code imported.
    "attn_implementation",
    "_attn_implementation",
    "_attn_implementation_internal",
    "_attn_implementation_autoset",
    "experts_implementation",
    "_experts_implementation",
    "_experts_implementation_internal",
    "use_kernels",
    "kernel_config",  # Hub kernels replacing layers
    "fusion_config",  # patches the model class's modules while loading
    "transformers_weights",  # another weights file than the one whose header is checked
    "configuration_files",  # another config file than the one checked
    "custom_pipelines",  # pipeline code from the Hub
)
#: Keys refused whatever they say: a quantized model needs a quantizer (bitsandbytes, optimum, ...)
#: imported and run on its weights, and its layers are not the float layers attnexplain explains.
REFUSED_KEYS = ("quantization_config",)
#: The largest model a config.json may describe, a margin beyond every public vision model (ViT-22B:
#: 48 layers, hidden 6144, MLP 24576, 48 heads, patch 14; DINOv2-giant: 40 layers, 1536, 518/14;
#: SwinV2-G: 50 blocks, heads to 128, 640/4; ConvNeXt-XXL: 40 blocks, width 3072; BiT-R152x4: width
#: 8192; CLIP bigG's towers: 48 and 32 layers). Checked before anything is built: building takes
#: time with every layer, even on the meta device (2,000 layers: 105 s and +330 MB, issue 23).
MODEL_LIMITS = {
    "num_hidden_layers": 128,
    "hidden_size": 16384,
    "intermediate_size": 65536,
    "num_attention_heads": 256,
    "embed_dim": 16384,
    "hidden_sizes": 16384,  # each stage's width
    "num_heads": 256,  # each stage's heads
    "patch_size": FILE_MAX_SIZE,
    "window_size": 64,
    "num_register_tokens": 256,
    # GPT-2's names, for a captioner's decoder (GPT-2 XL: 48 layers, 1600 wide, 25 heads).
    "n_layer": 128,
    "n_embd": 16384,
    "n_head": 256,
    "n_inner": 65536,
}
#: Blocks of all stages together (``depths``): as many as ``num_hidden_layers`` may ask for.
MAX_BLOCKS = MODEL_LIMITS["num_hidden_layers"]
#: An MLP's width over the hidden size (DINOv2's ``mlp_ratio``: 4; ViT-22B's 4).
MAX_MLP_RATIO = 16
#: Patches along a side of the config's image (SwinV2-G: 160; a ViT-S/8 at 1024 pixels: 128).
MAX_PATCH_GRID = 256
#: layers × hidden × (4·hidden + 2·MLP width), the parameters of the transformer blocks: ViT-22B's is
#: 2.2·10¹⁰. A config beyond it describes no vision model that exists.
MAX_PARAMETER_ESTIMATE = 10**11
_TRUST_HINT = "If you trust where it came from, pass --trust-model (trust_model=True)."
#: Image–text dual encoders (config.json's ``architectures``) → their model_type: loaded as they
#: are, and explained against text prompts (prompts.py).
DUAL_ENCODERS = {"CLIPModel": "clip", "SiglipModel": "siglip"}
#: Image captioners (config.json's ``architectures``) → their model_type: loaded as they are and
#: explained word by word (captioning.py; BLIP is loaded to be refused there with its reason).
CAPTIONERS = {"VisionEncoderDecoderModel": "vision-encoder-decoder", "BlipForConditionalGeneration": "blip"}
# A file name inside the folder, as an index of shards may name it: no folders, no "..".
_PLAIN_NAME = re.compile(r"^[\w.-]+$")


def looks_saved_pretrained(path: Path) -> bool:
    """A folder with config.json and a weights file, as ``save_pretrained`` writes, unless its
    config.json is plainly another library's (a JSON object without ``model_type``: timm's hub
    folders hold config.json and model.safetensors too). A config.json too large or malformed to
    tell is claimed, so that :func:`read_json` refuses it with its reason."""
    try:
        if not path.is_dir() or not_a_regular_file(path / CONFIG) is not None:
            return False
        if not any((path / name).is_file() for name in SAFE_WEIGHTS + PICKLED_WEIGHTS):
            return False
        with (path / CONFIG).open("rb") as handle:
            head = handle.read(MAX_JSON_BYTES + 1)
    except OSError:
        return False
    if len(head) > MAX_JSON_BYTES:
        return True
    try:
        config = json.loads(head)
    except (ValueError, RecursionError):
        return True
    return not isinstance(config, dict) or "model_type" in config


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``, refused (one line) when it is not a small regular file of JSON."""
    problem = not_a_regular_file(path)
    if problem is not None:
        raise ModelLoadError(f"{what} {path} {problem}.")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ModelLoadError(
            f"{what} {path} is {size:,} bytes; a Hugging Face {what} is far smaller "
            f"(at most {MAX_JSON_BYTES:,} accepted)."
        )
    try:
        content = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as error:
        raise ModelLoadError(f"{what} {path} is not valid JSON: {str(error).splitlines()[0]}") from None
    if not isinstance(content, dict):
        raise ModelLoadError(f"{what} {path} holds a JSON {type(content).__name__}, not an object.")
    if _nesting(content) > MAX_JSON_DEPTH:
        raise ModelLoadError(
            f"{what} {path} nests values over {MAX_JSON_DEPTH} levels deep; a Hugging Face {what} nests a few."
        )
    _check_numbers(content, f"{what} {path}")
    return content


def _nesting(value: Any) -> int:
    """How deep lists and objects nest in ``value``, counted without recursion (the checks after
    this one recurse, and 990 levels would exhaust Python's stack)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                pending.extend((inner, depth + 1) for inner in (item.values() if isinstance(item, dict) else item))
    return deepest


def _check_numbers(value: Any, where: str, key: str = "") -> None:
    """Refuse integers no vision model's configuration holds (they size the model that is built)."""
    if isinstance(value, bool):
        return
    if isinstance(value, int) and abs(value) > MAX_CONFIG_INT:
        raise ModelLoadError(
            f"{where} asks for {key or 'a value'} = {value:,}; no vision model's "
            f"configuration holds a number above {MAX_CONFIG_INT:,}."
        )
    if isinstance(value, dict):
        for inner_key, inner in value.items():
            _check_numbers(inner, where, str(inner_key))
    elif isinstance(value, list):
        for inner in value:
            _check_numbers(inner, where, key)


def _configurations(config: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """The config and its sub-configurations (``vision_config``, ``text_config``, ...) with where
    each lies (``"vision_config."``)."""
    pending = [(path, config)]
    while pending:  # not recursive: a deeply nested file must not exhaust Python's stack
        prefix, holder = pending.pop()
        yield prefix, holder
        pending.extend(
            (f"{prefix}{key}.", value)
            for key, value in holder.items()
            # an encoder–decoder's halves are "encoder" and "decoder"
            if isinstance(value, dict) and (key.endswith("_config") or key in ("encoder", "decoder"))
        )


def check_model_size(config: dict[str, Any], where: str) -> None:
    """Refuse a config describing a model beyond :data:`MODEL_LIMITS` (layers, widths, heads, patch
    grid, their product), naming the field, before transformers builds anything."""
    for prefix, holder in _configurations(config):
        refuse = partial(_refuse_size, where, prefix)
        for field, limit in MODEL_LIMITS.items():
            value = holder.get(field)
            least = 0 if field == "num_register_tokens" else 1
            for side in value if isinstance(value, list) else [value]:
                if value is not None and not (_whole(side) and least <= side <= limit):
                    refuse(field, value, f"a model file may ask for whole numbers from {least} to {limit:,}")
        depths = holder.get("depths")
        if depths is not None and not (
            isinstance(depths, list) and all(_whole(d) and d >= 0 for d in depths) and sum(depths) <= MAX_BLOCKS
        ):
            refuse("depths", depths, f"a model file may ask for at most {MAX_BLOCKS} blocks in all")
        ratio = holder.get("mlp_ratio")
        if ratio is not None and not (
            isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 < ratio <= MAX_MLP_RATIO
        ):
            refuse("mlp_ratio", ratio, f"a model file may ask for an MLP at most {MAX_MLP_RATIO}× as wide")
        image, patch = _sides(holder.get("image_size")), _sides(holder.get("patch_size"))
        if image and patch and any(-(-i // p) > MAX_PATCH_GRID for i, p in zip(image, patch)):
            refuse(
                "patch_size",
                holder["patch_size"],
                f"on image_size {shown(holder['image_size'])} that is more than {MAX_PATCH_GRID} patches along a side",
            )
        estimate = _parameter_estimate(holder)
        if estimate > MAX_PARAMETER_ESTIMATE:
            refuse(
                "num_hidden_layers",
                holder.get("num_hidden_layers", holder.get("depths")),
                f"with its widths (hidden_size, intermediate_size) that is about {estimate:.1e} "
                f"parameters, more than {MAX_PARAMETER_ESTIMATE:.0e}",
            )


def _refuse_size(where: str, prefix: str, field: str, value: Any, bound: str) -> None:
    raise ModelLoadError(
        f"{where} asks for {prefix}{field} = {shown(value)}; {bound}, beyond every "
        f"public vision model, so the config is refused."
    )


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sides(value: Any) -> list[int] | None:
    sides = value if isinstance(value, list) else [value, value]
    return sides if len(sides) == 2 and all(_whole(side) and side >= 1 for side in sides) else None


def _parameter_estimate(holder: dict[str, Any]) -> int:
    """The parameters of the blocks a (checked) configuration describes, roughly: blocks × width ×
    (4·width for attention + 2·MLP width), with a ViT-Base's 12 layers and width 768 where the
    config says nothing (transformers' defaults are of that size)."""
    depths = holder.get("depths")
    blocks = sum(depths) if isinstance(depths, list) else holder.get("num_hidden_layers") or 12
    widths = [holder.get("hidden_size"), holder.get("embed_dim"), *(holder.get("hidden_sizes") or [])]
    width = max([w for w in widths if _whole(w)] or [768])
    ratio = holder.get("mlp_ratio")
    mlp = holder.get("intermediate_size") or int(width * (ratio if isinstance(ratio, (int, float)) else 4))
    return int(blocks) * width * (4 * width + 2 * int(mlp))


def without_code_selecting_keys(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A copy of ``config`` without :data:`CODE_SELECTING_KEYS` at any depth, and where each was."""
    dropped: list[str] = []

    def plain(value: Any, path: str) -> Any:
        if isinstance(value, dict):
            kept = {}
            for key, inner in value.items():
                if key in CODE_SELECTING_KEYS:
                    dropped.append(f"{path}{key}")
                else:
                    kept[key] = plain(inner, f"{path}{key}.")
            return kept
        if isinstance(value, list):
            return [plain(inner, path) for inner in value]
        return value

    return plain(config, ""), dropped


def _refused_key(value: Any, path: str = "") -> str | None:
    """Where a :data:`REFUSED_KEYS` key lies in the config, at any depth (a ``text_config``'s
    ``quantization_config`` counts as the model's for transformers), or None."""
    pending = [(path, value)]
    while pending:
        prefix, item = pending.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                if key in REFUSED_KEYS and inner is not None:
                    return f"{prefix}{key}"
                pending.append((f"{prefix}{key}.", inner))
        elif isinstance(item, list):
            pending.extend((prefix, inner) for inner in item)
    return None


def check_config(config: dict[str, Any], folder: Path, trust_model: bool) -> bool:
    """Refuse a config.json that is not a plain transformers configuration; return whether it asks
    for custom code (``auto_map``), which only ``trust_model`` allows."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelLoadError(f"{folder / CONFIG} has no model_type string: not a transformers config.")
    architectures = config.get("architectures")
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)
    ):
        raise ModelLoadError(f"{folder / CONFIG}: architectures must be a list of class names.")
    custom = "auto_map" in config or bool(config.get("trust_remote_code"))
    if custom and not trust_model:
        raise UntrustedModelError(
            f"{folder} asks for custom modelling code (auto_map in config.json), which transformers "
            f"would import and run from the folder, so it is refused. {_TRUST_HINT}"
        )
    for holder in (config, config.get("vision_config")):
        size = holder.get("image_size") if isinstance(holder, dict) else None
        sides = size if isinstance(size, list) else [size]
        if size is not None and not all(
            isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= FILE_MAX_SIZE for s in sides
        ):
            raise ModelLoadError(
                f"{folder / CONFIG} asks for image_size {size!r}; a model file may "
                f"ask for whole sides between 1 and {FILE_MAX_SIZE} pixels."
            )
    labels = config.get("id2label")
    if labels is not None and not (isinstance(labels, dict) and all(isinstance(v, str) for v in labels.values())):
        raise ModelLoadError(f"{folder / CONFIG}: id2label must map class numbers to names.")
    quantized = _refused_key(config)
    if quantized is not None:
        raise ModelLoadError(
            f"{folder / CONFIG} holds {quantized}: a quantized model, which transformers would load "
            f"by importing and running a quantizer (bitsandbytes, optimum, ...); attnexplain explains "
            f"float models. Load it, dequantize it and save it with save_pretrained first."
        )
    model_args = config.get("model_args")
    if model_args:  # timm_wrapper: keyword arguments for timm.create_model, beyond every check here
        raise ModelLoadError(
            f"{folder / CONFIG} holds model_args {shown(model_args)}: arguments transformers passes to "
            f"timm.create_model as they are (a checkpoint_path read from anywhere, sizes no check "
            f"here sees), so it is refused. A timm model loads through the timm plugin."
        )
    check_model_size(config, str(folder / CONFIG))
    return custom


def safe_weights(folder: Path, trust_model: bool) -> bool:
    """Whether the folder's weights are safetensors (True) or, only with ``trust_model``, a pickle."""
    if any((folder / name).is_file() for name in SAFE_WEIGHTS):
        return True
    if any((folder / name).is_file() for name in PICKLED_WEIGHTS):
        if not trust_model:
            raise UntrustedModelError(
                f"{folder} holds its weights only as pytorch_model.bin, a pickle: unpickling can run "
                f"arbitrary code, so it is refused. {_TRUST_HINT} Or re-save it with "
                f"save_pretrained(), which writes model.safetensors."
            )
        return False
    raise ModelLoadError(f"{folder} has no weights file (model.safetensors or pytorch_model.bin).")


def stored_parameters(folder: Path) -> int:
    """How many numbers the folder's safetensors files hold, read from their headers alone."""
    return sum(_header_numel(path) for path in _safetensors_files(folder))


def stored_shapes(folder: Path) -> dict[str, list[int]]:
    """Each tensor's shape, by name, read from the headers of the folder's safetensors files alone."""
    shapes: dict[str, list[int]] = {}
    for path in _safetensors_files(folder):
        shapes.update({name: entry["shape"] for name, entry in _header(path)[0].items()})
    return shapes


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / SAFE_WEIGHTS[1]
    if (folder / SAFE_WEIGHTS[0]).is_file():
        files = [folder / SAFE_WEIGHTS[0]]
    else:
        weight_map = read_json(index, "weights index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelLoadError(f"{index} has no weight_map of tensor names to file names.")
        names = sorted(set(weight_map.values()))
        unsafe = [name for name in names if not _PLAIN_NAME.match(name) or name in (".", "..")]
        if unsafe:
            raise ModelLoadError(f"{index} names shard {unsafe[0]!r}, which is not a file in the folder; refused.")
        files = [folder / name for name in names]
    return files


def _header_numel(path: Path) -> int:
    entries, data = _header(path)
    total = 0
    for entry in entries.values():
        count = 1
        for side in entry["shape"]:
            count *= side
        total += count
    # No dtype stores a number in under half a byte: a header promising more is forged, and the
    # parameter check that trusts it would let a config allocate what the file does not hold.
    if total > 2 * data:
        raise ModelLoadError(
            f"{path} is not a safetensors file: its header describes {total:,} numbers "
            f"but the file holds {data:,} bytes of data."
        )
    return total


def _header(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """A safetensors file's tensor entries (each with a valid ``shape``) and how many bytes of data
    follow its header."""
    problem = not_a_regular_file(path)
    if problem is not None:
        raise ModelLoadError(f"Weights file {path} {problem}.")
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise ModelLoadError(f"{path} is not a safetensors file (its header length is wrong).")
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path} is not a safetensors file (its header is not a JSON object).")
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ModelLoadError(f"{path}: tensor {name!r} has no valid shape in the header.")
        entries[name] = entry
    return entries, size - 8 - length


def classifier_class_name(config: dict[str, Any], folder: Path) -> str:
    """The transformers class that the folder's model is, when it is an image classifier or an
    image–text dual encoder (:data:`DUAL_ENCODERS`)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    model_type = config["model_type"]
    named = (config.get("architectures") or [None])[0]
    if named in DUAL_ENCODERS and DUAL_ENCODERS[named] == model_type:
        return named
    if CAPTIONERS.get(named) == model_type or (named is None and model_type == "vision-encoder-decoder"):
        return named or "VisionEncoderDecoderModel"
    known = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.get(model_type)
    classifiers = [known] if isinstance(known, str) else list(known or ())
    for name in config.get("architectures") or ():
        if name in classifiers:
            return name
    if not classifiers:
        raise ModelLoadError(
            f"{folder} holds a {model_type!r} model, which transformers has no "
            f"image classifier for; attnexplain explains image classifiers."
        )
    if config.get("architectures"):
        raise ModelLoadError(
            f"{folder} holds a {config['architectures'][0]}, not an image classifier "
            f"({' or '.join(classifiers)}): it has no class scores to explain."
        )
    return classifiers[0]


@contextmanager
def transformers_quiet() -> Iterator[None]:
    """transformers' log lines (load reports, deprecation notes) kept off the terminal meanwhile."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights: 100%" on the CLI's stderr
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_folder(folder: Path, trust_model: bool) -> tuple["nn.Module", list[str]]:
    """The image classifier (or DETR-family detector, or dual encoder) saved in ``folder``, in eval mode, with
    every weight from the folder; and the config.json keys that were ignored because they choose code
    (:data:`CODE_SELECTING_KEYS`).

    transformers gets the configuration checked here, built from the dict read here: it never reads
    config.json (or a file that config.json names) itself, except for a trusted folder's own code."""
    import torch
    import transformers

    config = read_json(folder / CONFIG, "config")
    custom = check_config(config, folder, trust_model)
    safe = safe_weights(folder, trust_model)
    plain, ignored = without_code_selecting_keys(config)
    try:
        with transformers_quiet():
            if custom:  # trusted: the folder's own class, through its auto_map
                model, info = transformers.AutoModelForImageClassification.from_pretrained(
                    folder,
                    local_files_only=True,
                    use_safetensors=safe,
                    trust_remote_code=True,
                    output_loading_info=True,
                )
                ignored = []
            else:
                detector = detector_class_name(config, folder)
                model_class = getattr(transformers, detector or classifier_class_name(config, folder))
                # No attention implementation in the config: transformers' default for the class
                # (sdpa, else eager), which recording() switches to eager and back.
                hf_config = model_class.config_class.from_dict(plain)
                if detector and safe:
                    labels_at_their_ids(hf_config, stored_shapes(folder))
                if safe:
                    with torch.device("meta"):
                        asked = sum(p.numel() for p in model_class._from_config(hf_config).parameters())
                    held = stored_parameters(folder)
                    if asked > held * PARAMETER_SLACK + 1024:
                        raise ModelLoadError(
                            f"{folder / CONFIG} describes a model of {asked:,} parameters but the "
                            f"weights hold {held:,} numbers: the config is not the weights'."
                        )
                model, info = model_class.from_pretrained(
                    folder, config=hf_config, local_files_only=True, use_safetensors=safe, output_loading_info=True
                )
    except ModelLoadError:
        raise
    except Exception as error:
        text = " ".join(str(error).split())[:300] or type(error).__name__
        raise ModelLoadError(f"transformers could not load {folder}: {type(error).__name__}: {text}") from None
    unfilled = list(info.get("missing_keys") or ()) + [
        str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or ()
    ]
    if unfilled:
        shown_keys = ", ".join(sorted(unfilled)[:3]) + (f" and {len(unfilled) - 3} more" if len(unfilled) > 3 else "")
        raise ModelLoadError(
            f"{folder}'s weights do not fill the model its config describes (missing or misshapen: {shown_keys})."
        )
    return model.eval(), ignored
