"""torchvision's detectors (Faster/Mask/Keypoint R-CNN, RetinaNet, FCOS, SSD, SSDlite): what a target
is, which layer to explain, and how their input is prepared.

A detector returns, per image, boxes with a label and a score. The target of an explanation is a
detected box's score: a class's score is the score of its highest-scoring box, so the default target
(the largest) is the most confident detection, and ``--target LABEL`` explains the best box of that
class. Those scores come out of the model's post-processing (softmax or sigmoid, then thresholding and
non-maximum suppression, all indexing), so they stay differentiable with respect to every feature map.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..plugin_api import Detections, Preprocessing

if TYPE_CHECKING:
    import torch


def is_detector(model: Any) -> bool:
    """torchvision's detector classes, subclasses included (a user's own head, say)."""
    import sys

    if "torchvision" not in sys.modules:
        return False  # then the model cannot be one, and importing torchvision would cost seconds
    from torchvision.models.detection.fcos import FCOS
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.detection.ssd import SSD

    return isinstance(model, (GeneralizedRCNN, RetinaNet, FCOS, SSD))


def detector_layer(model: Any) -> str | None:
    """The deepest backbone stage that still has a spatial map (before the FPN or SSD's extra layers).

    The FPN's outputs are a dictionary of levels and SSD's extra layers shrink to 1×1; the stage
    they start from is the backbone's last semantic map, as for classifiers.
    """
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.ssd import SSDFeatureExtractorVGG
    from torchvision.models.detection.ssdlite import SSDLiteFeatureExtractorMobileNet

    backbone = model.backbone
    if isinstance(backbone, BackboneWithFPN):
        return f"backbone.body.{list(backbone.body.named_children())[-1][0]}"
    if isinstance(backbone, SSDFeatureExtractorVGG):
        return "backbone.extra.0"  # VGG's conv5 and fc6/fc7 as convolutions, stride 16
    if isinstance(backbone, SSDLiteFeatureExtractorMobileNet):
        return "backbone.features.1"  # MobileNetV3's last stage, stride 32
    return None


def number_of_classes(model: Any) -> int:
    """The classes (background included, as torchvision counts them) the detector scores."""
    roi_heads = getattr(model, "roi_heads", None)
    if roi_heads is not None:  # the R-CNN family
        return int(roi_heads.box_predictor.cls_score.out_features)
    head = model.head.classification_head
    return int(getattr(head, "num_classes", None) or head.num_columns)  # RetinaNet, FCOS | SSD


def box_scores(model: Any, output: list[dict[str, "torch.Tensor"]]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(B, classes) scores: each class's highest box score (0 where no box has that class), twice:
    differentiable, and detached as the confidences the report shows."""
    import torch

    classes = number_of_classes(model)
    rows = []
    for detected in output:
        scores, labels = detected["scores"], detected["labels"]
        scores = scores * _covers_a_pixel(detected["boxes"]).to(scores.dtype)
        row = scores.new_zeros(classes)
        rows.append(row.scatter_reduce(0, labels, scores, reduce="amax", include_self=True))
    scores = torch.stack(rows)
    return scores, scores.detach().float()


def _covers_a_pixel(boxes: "torch.Tensor") -> "torch.Tensor":
    """Boxes at least a pixel wide and high. Thinner ones (a box squeezed against the image's edge)
    sample no image evidence, so their score does not depend on the image: they are no target."""
    return ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)


def detections(output: list[dict[str, "torch.Tensor"]]) -> list[Detections]:
    found = []
    for detected in output:
        kept = _covers_a_pixel(detected["boxes"])
        found.append(
            Detections(
                boxes=detected["boxes"][kept].detach().float().cpu(),
                labels=detected["labels"][kept].detach().cpu(),
                scores=detected["scores"][kept].detach().float().cpu(),
            )
        )
    return found


def each_box_score(output: list[dict[str, "torch.Tensor"]]) -> list["torch.Tensor"]:
    """Per image, the differentiable score of each box :func:`detections` keeps, in its order."""
    return [detected["scores"][_covers_a_pixel(detected["boxes"])] for detected in output]


def detector_preprocessing(model: Any) -> Preprocessing:
    """A square of the size the detector resizes to itself, in [0, 1] (it normalises internally),
    the photo letterboxed into it: detectors are trained on photos that keep their aspect ratio."""
    transform = model.transform
    side = int(transform.fixed_size[0]) if transform.fixed_size else int(transform.min_size[-1])
    return Preprocessing(
        size=(side, side),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        letterbox=True,
        source=f"{type(model).__name__} (normalises internally)",
    )
