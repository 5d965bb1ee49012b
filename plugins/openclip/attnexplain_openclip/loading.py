"""``open_clip:ARCH:WEIGHTS``: an OpenCLIP model built from its configuration, with weights from a
local file or open_clip's download cache; nothing is downloaded and no code from a file runs.

ARCH is an architecture open_clip knows (``ViT-B-32``, ``open_clip.list_models()``) or a model
configuration file of open_clip's own format (``{"embed_dim": …, "vision_cfg": {…}, "text_cfg":
{…}}``, as in open_clip's ``model_configs/``, or an ``open_clip_config.json`` whose ``model_cfg``
holds it). WEIGHTS is a file (a ``state_dict`` saved with ``torch.save``, read with
``weights_only``; or ``.safetensors``) or a pretrained tag of ARCH (``laion2b_s34b_b79k``) whose
file open_clip's cache already holds.

Only the CLIP models whose image tower is open_clip's own ``VisionTransformer`` and whose text is
read by open_clip's bundled byte-pair tokenizer are explained: the tokenizer needs no download,
and the tower's attention modules are ``nn.MultiheadAttention``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from attnexplain.plugin_api import ModelLoadError, not_a_regular_file, shown

#: A model configuration is a few hundred bytes; open_clip_config.json a few kilobytes.
MAX_CONFIG_BYTES = 1024 * 1024
#: Configuration keys that name a tower or tokenizer from another library (timm, Hugging Face):
#: building them would download or need code this plugin does not explain.
FOREIGN_TOWERS = ("timm_model_name", "hf_model_name", "hf_tokenizer_name")
#: The largest value a configuration file may give each size field (ViT-bigG-14: 48 layers, width
#: 1664, text width 1280, 77 tokens, 49,408 words): a file asking for more describes no CLIP that
#: exists, and building it would take the machine's memory before anything could be refused.
SIZE_LIMITS = {
    "layers": 256,
    "width": 16_384,
    "heads": 1_024,
    "head_width": 4_096,
    "embed_dim": 16_384,
    "context_length": 4_096,
    "vocab_size": 1_000_000,
    "image_size": 4_096,
}
#: layers × width² × (4 + 2 · mlp_ratio) over both towers, plus the word embeddings: ViT-bigG-14's
#: is about 2.5·10⁹.
MAX_PARAMETER_ESTIMATE = 10**11
#: What open_clip's cache holds for a pretrained tag on the Hugging Face Hub, safest first.
HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def model_config(arch: str) -> dict[str, Any]:
    """The configuration ``open_clip.CLIP`` is built from: a file's, or open_clip's own for ARCH."""
    path = Path(arch)
    if arch.endswith(".json") or path.is_file():
        return _config_file(path)
    import open_clip

    config = open_clip.get_model_config(arch)
    if config is None:
        known = ", ".join(sorted(name for name in open_clip.list_models() if name.startswith("ViT"))[:8])
        raise ModelLoadError(
            f"open_clip has no architecture {shown(arch)} (e.g. {known}; open_clip.list_models() lists "
            f"them), and it is not a model configuration file (.json)."
        )
    return config


def _config_file(path: Path) -> dict[str, Any]:
    problem = not_a_regular_file(path)
    if problem is not None:
        raise ModelLoadError(f"OpenCLIP model configuration {path} {problem}.")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ModelLoadError(f"OpenCLIP model configuration {path} is over {MAX_CONFIG_BYTES:,} bytes.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ModelLoadError(f"OpenCLIP model configuration {path} is not JSON: {shown(str(error), 120)}") from None
    if isinstance(config, dict) and isinstance(config.get("model_cfg"), dict):
        config = config["model_cfg"]  # open_clip_config.json
    if not isinstance(config, dict) or not all(isinstance(config.get(key), dict) for key in ("vision_cfg", "text_cfg")):
        raise ModelLoadError(
            f"OpenCLIP model configuration {path} holds no vision_cfg and text_cfg objects (open_clip's "
            f"model_configs/*.json format)."
        )
    check_size(config, path)
    return config


def check_size(config: dict[str, Any], path: Path) -> None:
    """Refuse a configuration file asking for a model beyond :data:`SIZE_LIMITS` or
    :data:`MAX_PARAMETER_ESTIMATE`, naming the field, before open_clip allocates anything."""
    estimate = 0.0
    for where, holder in (("", config), ("vision_cfg.", config["vision_cfg"]), ("text_cfg.", config["text_cfg"])):
        for field, limit in SIZE_LIMITS.items():
            value = holder.get(field)
            sides = value if isinstance(value, list) else [value]
            if value is not None and not all(
                isinstance(side, int) and not isinstance(side, bool) and 1 <= side <= limit for side in sides
            ):
                raise ModelLoadError(
                    f"OpenCLIP model configuration {path} asks for {where}{field} = {shown(value)}; a "
                    f"configuration may ask for whole numbers from 1 to {limit:,}, beyond every public CLIP."
                )
        ratio = holder.get("mlp_ratio", 4)
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio <= 16:
            raise ModelLoadError(
                f"OpenCLIP model configuration {path} asks for {where}mlp_ratio = {shown(ratio)}; at most 16."
            )
        if holder is not config:
            layers, width = holder.get("layers", 12), holder.get("width", 768)
            depth = sum(layers) if isinstance(layers, list) else layers
            estimate += float(depth) * float(width) ** 2 * (4 + 2 * float(ratio))
    estimate += float(config["text_cfg"].get("vocab_size", 49_408)) * float(config["text_cfg"].get("width", 512))
    if estimate > MAX_PARAMETER_ESTIMATE:
        raise ModelLoadError(
            f"OpenCLIP model configuration {path} describes about {estimate:.1e} parameters, more than "
            f"{MAX_PARAMETER_ESTIMATE:.0e}, beyond every public CLIP."
        )


def build(arch: str) -> Any:
    """``open_clip.CLIP`` of ARCH with random weights; refused in one line for what is not explained."""
    import open_clip

    config = model_config(arch)
    foreign = [key for key in FOREIGN_TOWERS if config["vision_cfg"].get(key) or config["text_cfg"].get(key)]
    if foreign or config.get("custom_text"):
        what = f"a tower or tokenizer from another library ({foreign[0]})" if foreign else "a custom text tower"
        raise ModelLoadError(
            f"{shown(arch)} has {what}; the openclip plugin explains CLIP models with open_clip's own "
            f"VisionTransformer and tokenizer."
        )
    try:
        model = open_clip.CLIP(**config)
    except (TypeError, ValueError, KeyError, AssertionError) as error:
        raise ModelLoadError(
            f"open_clip could not build {shown(arch)}: {type(error).__name__}: {shown(str(error), 160)}"
        ) from None
    tower = type(model.visual).__name__
    if tower != "VisionTransformer" or getattr(model.visual, "attn_pool", None) is not None:
        pooled = " with attentional pooling" if tower == "VisionTransformer" else ""
        raise ModelLoadError(
            f"{shown(arch)}'s image tower is a {tower}{pooled}; the openclip plugin explains open_clip's "
            f"VisionTransformer with a class token."
        )
    return model.eval()


def weights_file(arch: str, weights: str) -> tuple[Path, dict[str, Any]]:
    """The file WEIGHTS names (a path, or a pretrained tag found in open_clip's cache), and the
    preprocessing the tag's configuration gives (mean, std, interpolation; none for a path)."""
    path = Path(weights)
    if path.exists():
        return path, {}
    import open_clip

    path = cached_pretrained(arch, weights)
    pretrained = open_clip.get_pretrained_cfg(arch, weights)
    return path, {key: pretrained[key] for key in ("mean", "std", "interpolation") if pretrained.get(key)}


def load_weights(model: Any, arch: str, path: Path) -> str:
    """Load the state_dict in ``path`` into ``model``; the file read, for the report."""
    import torch

    problem = not_a_regular_file(path)
    if problem is not None:
        raise ModelLoadError(f"OpenCLIP weights {path} {problem}.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - what the file holds
        raise ModelLoadError(
            f"OpenCLIP weights {path} could not be read as a state_dict: {type(error).__name__}: "
            f"{shown(' '.join(str(error).split()), 160)}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # open_clip's training checkpoints
    if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
        raise ModelLoadError(f"OpenCLIP weights {path} hold no state_dict (a mapping of parameter names).")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as error:
        raise ModelLoadError(
            f"OpenCLIP weights {path} do not fit {shown(arch)}: {shown(' '.join(str(error).split()), 200)}"
        ) from None
    return str(path)


def cached_pretrained(arch: str, tag: str) -> Path:
    """The file open_clip's cache holds for ARCH's pretrained TAG; refused when it is not there
    (nothing is downloaded)."""
    import open_clip

    config = open_clip.get_pretrained_cfg(arch, tag)
    if not config:
        raise ModelLoadError(
            f"{shown(tag)} is neither a weights file nor a pretrained tag of {shown(arch)} "
            f"(open_clip.list_pretrained_tags_by_model lists them)."
        )
    candidates: list[Path] = []
    hub = str(config.get("hf_hub") or "").strip("/")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        for filename in HUB_FILES:
            found = try_to_load_from_cache(hub, filename)
            if isinstance(found, str):
                candidates.append(Path(found))
    url = str(config.get("url") or "")
    if url:
        candidates.append(Path("~/.cache/clip").expanduser() / url.rsplit("/", 1)[-1])
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"open_clip's cache holds no weights for {arch}:{tag} and nothing is downloaded here; "
        f"download them once elsewhere (open_clip.create_model('{arch}', pretrained='{tag}')) or name the file."
    )


def tokenizer(model: Any) -> Any:
    """open_clip's bundled byte-pair tokenizer (shipped with the package: nothing downloaded), at
    the model's context length."""
    from open_clip.tokenizer import SimpleTokenizer

    tokens = SimpleTokenizer(context_length=int(model.context_length))
    if len(tokens.encoder) != int(model.vocab_size):
        raise ModelLoadError(
            f"The model's text tower reads {model.vocab_size:,} token ids; open_clip's bundled "
            f"tokenizer has {len(tokens.encoder):,}: its own tokenizer is not one this plugin reads."
        )
    return tokens
