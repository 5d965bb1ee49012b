"""Detection transformers: DETR, Conditional DETR and Deformable DETR (``…ForObjectDetection``).

A DETR decodes a fixed set of object queries; each query predicts a box (``pred_boxes``: centre,
width and height in shares of the input) and class logits. A query's box is labelled with its best
class and scored by that class's probability: DETR's softmax with its last, "no object" class left
out (as transformers' ``post_process_object_detection`` does), Conditional and Deformable DETR's
sigmoid per class (they are trained with a focal loss and have no such class). As for torchvision's
detectors, a class's score is its best box's, so the default target is the most confident box, and
``--target LABEL`` explains that label's best box. Every query is a box of the report.

Maps: a DETR and a Conditional DETR decoder layer's cross-attention (``encoder_attn``) is a softmax
over the image's feature grid, one row per query: recorded (eager attention), the explained box's
row is the map of that layer and head. Every attention layer (the encoder's self-attention too) is
recorded with its role (``EncoderDecoderAttention``), so that ``chefer`` applies Chefer et al.
2021b's encoder–decoder rules to the explained box's query. Deformable DETR has no such matrix: each query samples a few
points around reference points at learned offsets (``MultiscaleDeformableAttention``), so there is
no attention over the image to record; its CAMs on the backbone are explained all the same.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator
from weakref import WeakKeyDictionary

from attnexplain.plugin_api import Detections, MethodError, ModelLoadError, Preprocessing, TokenGrid, shown

if TYPE_CHECKING:
    import torch

#: model_type → the detector class attnexplain explains.
DETECTORS = {
    "detr": "DetrForObjectDetection",
    "conditional_detr": "ConditionalDetrForObjectDetection",
    "deformable_detr": "DeformableDetrForObjectDetection",
}
#: Families whose decoder cross-attention is a softmax over the image's feature grid.
DENSE_CROSS_ATTENTION = ("detr", "conditional_detr")
#: Families that score classes by a softmax with a last "no object" class (the others: a sigmoid).
NO_OBJECT_CLASS = ("detr",)
#: Each family's class head in its weights (Deformable DETR: the last decoder layer's, as scored).
HEAD_BIAS = {
    "detr": "class_labels_classifier",
    "conditional_detr": "class_labels_classifier",
    "deformable_detr": "class_embed.0",
}
#: More classes than a detection head has (ImageNet-21k's 21,843 is far beyond any detector's).
MAX_CLASSES = 100_000
#: Methods that chain self-attention between the same tokens from layer to layer (chefer has its
#: encoder–decoder rules for a DETR: attnexplain.methods.encoder_decoder).
CHAINING = ("rollout", "legrad")
#: The feature grid each detector's backbone gave, recorded while its attention is: input (h, w)
#: → grid (h, w). Weak: a model that is dropped takes its entry along.
_grids: "WeakKeyDictionary[Any, dict[tuple[int, int], tuple[int, int]]]" = WeakKeyDictionary()


def detector_type(model: Any) -> str | None:
    """The model's model_type when it is one of :data:`DETECTORS` (a subclass included), else None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DETECTORS:
        return None
    return model_type if any(cls.__name__ == DETECTORS[model_type] for cls in type(model).__mro__) else None


def detector_class_name(config: dict[str, Any], folder: Path) -> str | None:
    """The detector class of a folder's config, None when it is no object detector. Another
    transformers detector (YOLOS, RT-DETR, ...) is refused, naming what it is."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES

    model_type = config["model_type"]
    name = DETECTORS.get(model_type)
    if name is None:
        if model_type in MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES:
            raise ModelLoadError(
                f"{folder} holds a {model_type!r} object detector; attnexplain explains the DETR "
                f"family's ({', '.join(DETECTORS)}) and image classifiers."
            )
        return None
    architectures = config.get("architectures") or [name]
    if name not in architectures:
        raise ModelLoadError(
            f"{folder} holds a {architectures[0]}, not a {name}: attnexplain explains its object detector."
        )
    _check_backbone(config, folder)
    return name


def _check_backbone(config: dict[str, Any], folder: Path) -> None:
    """A timm backbone named ``hf-hub:…`` or ``local-dir:…`` is read from elsewhere than the folder
    (timm fetches its config even without pretrained weights): refused."""
    names = [config.get("backbone"), (config.get("backbone_config") or {}).get("backbone")]
    for name in names:
        if name is not None and (not isinstance(name, str) or ":" in name or "/" in name):
            raise ModelLoadError(
                f"{folder / 'config.json'} names backbone {shown(name)}, which timm would fetch from "
                f"elsewhere than the folder; a detector's backbone must be a timm architecture name."
            )


# --- scores and boxes -------------------------------------------------------------------------


def query_probabilities(model: Any, output: Any) -> "torch.Tensor":
    """(B, queries, classes) each query's probability of each class, "no object" left out."""
    logits = output.logits
    if detector_type(model) in NO_OBJECT_CLASS:
        return logits.softmax(dim=-1)[..., :-1]
    return logits.sigmoid()


def _best_classes(model: Any, output: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(B, queries) each query's best class's probability (differentiable) and that class."""
    return query_probabilities(model, output).max(dim=-1)


def class_scores(model: Any, output: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(B, classes): each class's best box's probability (0 where no query's best class it is)."""
    best, labels = _best_classes(model, output)
    classes = output.logits.shape[-1] - (1 if detector_type(model) in NO_OBJECT_CLASS else 0)
    scores = best.new_zeros(best.shape[0], classes).scatter_reduce(1, labels, best, reduce="amax", include_self=True)
    return scores, scores.detach().float()


def detections(model: Any, output: Any) -> list[Detections]:
    """Every query's box (``pred_boxes``: centre, width, height in shares of the input) with its
    best class and that class's probability."""
    import torch

    best, labels = _best_classes(model, output)
    centre, size = output.pred_boxes[..., :2].detach().float(), output.pred_boxes[..., 2:].detach().float()
    corners = torch.cat([centre - size / 2, centre + size / 2], dim=-1).cpu()
    queries = torch.arange(best.shape[1])
    return [
        Detections(
            boxes=corners[image],
            labels=labels[image].detach().cpu(),
            scores=best[image].detach().float().cpu(),
            relative=True,
            queries=queries,
        )
        for image in range(best.shape[0])
    ]


def class_count(model: Any) -> int | None:
    """How many classes the detector's head scores, "no object" left out: what its labels index
    (a config's ``id2label`` may skip ids)."""
    head = getattr(model, "class_labels_classifier", None)
    if head is None:  # Deformable DETR: one class head per decoder layer, the last one's scores
        heads = getattr(model, "class_embed", None)
        head = heads[-1] if heads is not None and len(heads) else None
    features = getattr(head, "out_features", None)
    if not isinstance(features, int):
        return None
    return features - (1 if detector_type(model) in NO_OBJECT_CLASS else 0)


def labels_at_their_ids(config: Any, shapes: dict[str, list[int]]) -> None:
    """A config whose ``id2label`` skips ids (COCO's 80 names on ids 1-90) for weights whose class
    head scores more classes, up to its highest id: every name at its id, a gap ``class N``, so that
    transformers (which sizes the head by how many names there are) builds the head the weights hold.
    ``shapes``: the weights' tensor shapes by name (read from the safetensors headers)."""
    bias = shapes.get(f"{HEAD_BIAS[config.model_type]}.bias")
    ids = sorted(config.id2label)
    if not bias or len(bias) != 1 or ids == list(range(len(ids))):
        return
    classes = bias[0] - (1 if config.model_type in NO_OBJECT_CLASS else 0)
    if not len(ids) < classes <= MAX_CLASSES or ids[0] < 0 or ids[-1] >= classes:
        return
    names = {index: config.id2label.get(index, f"class {index}") for index in range(classes)}
    config.id2label, config.label2id = names, {name: index for index, name in names.items()}


def box_scores(model: Any, output: Any) -> list["torch.Tensor"]:
    best, _ = _best_classes(model, output)
    return list(best)


# --- layers and attention ---------------------------------------------------------------------


def backbone_layer(model: Any) -> str | None:
    """The backbone stage whose map the transformer reads (its last output feature): a transformers
    ResNet's ``encoder.stages.N``, else the backbone's last child."""
    prefix = "model.backbone.model"
    backbone = model.get_submodule(prefix)
    stages = getattr(getattr(backbone, "encoder", None), "stages", None)
    names, features = getattr(backbone, "stage_names", None), getattr(backbone, "out_features", None)
    if stages is not None and names and features and features[-1] in names and names.index(features[-1]) >= 1:
        return f"{prefix}.encoder.stages.{names.index(features[-1]) - 1}"
    children = list(backbone.named_children())
    return f"{prefix}.{children[-1][0]}" if children else None


def cross_attention_modules(model: Any) -> list[str]:
    """Each decoder layer's cross-attention, first layer first (none for Deformable DETR)."""
    return [name for name, role in attention_roles(model).items() if role == "cross"]


def attention_roles(model: Any) -> dict[str, str]:
    """Every attention layer, in the order the model runs them, with its role for Chefer 2021b's
    rules (:class:`EncoderDecoderAttention`): the encoder's self-attention among the image tokens,
    then per decoder layer its self-attention among the queries and its cross-attention to the
    image. None for Deformable DETR (no attention matrix over the image)."""
    if detector_type(model) not in DENSE_CROSS_ATTENTION:
        return {}
    roles = {f"model.encoder.layers.{index}.self_attn": "encoder" for index in range(len(model.model.encoder.layers))}
    for index in range(len(model.model.decoder.layers)):
        roles[f"model.decoder.layers.{index}.self_attn"] = "decoder"
        roles[f"model.decoder.layers.{index}.encoder_attn"] = "cross"
    return roles


def feature_grid(model: Any, input_size: tuple[int, int]) -> TokenGrid:
    """The backbone's feature grid for an input of ``input_size``: the keys of the cross-attention,
    row by row, with no token before them. Read from the last recording, else from a forward of
    the backbone alone."""
    import torch

    grid = _grids.get(model, {}).get(tuple(input_size))
    if grid is None:
        parameter = next(model.parameters())
        with torch.no_grad():
            zeros = torch.zeros(1, 3, *input_size, dtype=parameter.dtype, device=parameter.device)
            mask = torch.ones(1, *input_size, dtype=torch.long, device=parameter.device)
            feature_map = model.model.backbone(zeros, mask)[-1][0]
        grid = (int(feature_map.shape[-2]), int(feature_map.shape[-1]))
    return TokenGrid(prefix_tokens=0, height=grid[0], width=grid[1], query=0)


@contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """The detector's own attention layers eager for the duration, then as they were. Its config is
    switched alone: ``set_attn_implementation`` would also set the backbone's, which refuses sdpa
    on the way back."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous


@contextmanager
def capture_attention_layers(model: Any, names: list[str], sink: dict[str, Any]) -> Iterator[None]:
    """Each named attention layer's probabilities with its role (:func:`attention_roles`): the
    tensor its values are averaged with (eager attention), not a copy, so that gradients with respect
    to it are the model's; and the backbone's grid meanwhile."""
    from attnexplain.plugin_api import EncoderDecoderAttention

    known = attention_roles(model)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise MethodError(
            f"Layer {unknown[0]!r} is not an attention layer of this detector ({', '.join(known) or 'none'})."
        )

    def recorder(name: str):
        def hook(module: Any, args: Any, output: Any) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise MethodError(f"Layer {name!r} returned no attention probabilities (not eager attention).")
            sink[name] = EncoderDecoderAttention(weights, known[name])

        return hook

    def into_graph(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # The first decoder layer's self-attention reads the learned queries alone (no pixel): with
        # the parameters frozen its probabilities would lie outside the target score's graph, and
        # chefer needs their gradient. Its input, the same values as a leaf that requires a
        # gradient, puts them inside.
        import torch

        states = kwargs.get("hidden_states", args[0] if args else None)
        if not torch.is_grad_enabled() or not isinstance(states, torch.Tensor) or states.requires_grad:
            return None
        states = states.detach().requires_grad_(True)
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": states}
        return (states, *args[1:]), kwargs

    def keep_grid(module: Any, args: Any, output: Any) -> None:
        pixels, feature_map = args[0], output[-1][0]
        grids = _grids.setdefault(model, {})
        grids[tuple(pixels.shape[-2:])] = (int(feature_map.shape[-2]), int(feature_map.shape[-1]))

    with ExitStack() as stack:
        stack.enter_context(eager_attention(model))
        stack.callback(model.model.backbone.register_forward_hook(keep_grid).remove)
        for name in names:
            module = model.get_submodule(name)
            stack.callback(module.register_forward_pre_hook(into_graph, with_kwargs=True).remove)
            stack.callback(module.register_forward_hook(recorder(name)).remove)
        yield


def refuse_method(model: Any, method: str) -> str | None:
    model_type = detector_type(model)
    if model_type is None:
        return None
    if method in CHAINING:
        return (
            f"{method} chains self-attention between the same tokens; a {DETECTORS[model_type]}'s "
            f"decoder attends from its object queries to the image (cross-attention), so --method "
            f"chefer (Chefer 2021b's encoder–decoder relevance) or attention explains the box's "
            f"query, and gradcam its backbone."
        )
    if method in ("attention", "chefer") and model_type not in DENSE_CROSS_ATTENTION:
        return (
            f"{DETECTORS[model_type]} has no attention over the image to record: its deformable "
            f"attention samples a few points at learned offsets per query, not a softmax over the "
            f"feature grid. Use --method gradcam (its backbone)."
        )
    return None


# --- preprocessing ----------------------------------------------------------------------------


def detector_preprocessing(settings: dict[str, Any], source: str) -> Preprocessing:
    """A DETR processor's settings as a square input of its ``shortest_edge``, the photo
    letterboxed into it: the processor keeps the photo's aspect ratio (shorter side to
    ``shortest_edge``, longer at most ``longest_edge``), which a fixed-size input cannot."""
    from dataclasses import replace

    from .preprocessing import from_processor_config

    size = settings.get("size")
    side = size.get("shortest_edge") if isinstance(size, dict) else None
    if side is None:
        return from_processor_config(settings, source)
    square = {**settings, "size": {"height": side, "width": side}, "do_center_crop": False}
    preprocessing = from_processor_config(square, source)
    return replace(
        preprocessing,
        letterbox=True,
        source=f"{preprocessing.source} (a {side}-pixel square, the photo letterboxed into it)",
    )
