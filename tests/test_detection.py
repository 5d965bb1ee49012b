"""Detectors: the target is a detected box's score, the overlay draws the boxes, the report lists them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from conftest import correlation

import attnexplain
from attnexplain.catalog import catalog_entries
from attnexplain.cli import main
from attnexplain.errors import MethodError, NothingToExplain
from attnexplain.explanation import compute_maps
from attnexplain.images import load_image
from attnexplain.loading import load_model
from attnexplain.methods import METHODS
from attnexplain.preprocess import prepare

NAME = "fasterrcnn_mobilenet_v3_large_320_fpn"


@pytest.fixture(scope="module")
def detector():
    """The catalog's check build: random (He-initialised) weights, every box kept, 160 px."""
    entry = next(entry for plugin, entry in catalog_entries() if entry.name == NAME)
    torch.manual_seed(0)
    return entry.build().eval()


@pytest.fixture(scope="module")
def detector_file(detector, tmp_path_factory):
    path = tmp_path_factory.mktemp("detector") / "detector.pt"
    torch.save({"arch": NAME, "arch_kwargs": {"box_score_thresh": 0.0}, "state_dict": detector.state_dict()}, path)
    return path


def test_box_score_target_matches_pytorch_grad_cam(detector, photo):
    from pytorch_grad_cam import GradCAM

    loaded = attnexplain.explanation._as_loaded_model(detector)
    # The size the detector resizes to itself (the check build's 160), in [0, 1]: it normalises.
    assert loaded.preprocessing.size == (160, 160) and loaded.preprocessing.std == (1.0, 1.0, 1.0)
    batch = prepare(load_image(photo).pixels, loaded.preprocessing).tensor
    layer = "backbone.body.16"
    computed = compute_maps(loaded, batch, [METHODS["gradcam"]], [layer])
    detected, target = computed.detections[0], int(computed.targets[0])
    of_target = detected.labels == target
    best = int(torch.nonzero(of_target)[detected.scores[of_target].argmax()])
    assert float(computed.probabilities[0, target]) == pytest.approx(float(detected.scores[best]))
    assert float(detected.scores[best]) == pytest.approx(float(detected.scores.max()))  # top box

    # pytorch-grad-cam with the score of the output box that matches ours. (Its own
    # FasterRCNNBoxScoreTarget adds the box's IoU with the reference, which also differentiates the
    # box regression: a different target.)
    reference_box = detected.boxes[best : best + 1]

    def box_score(output):
        match = torchvision.ops.box_iou(reference_box, output["boxes"].detach()).argmax()
        return output["scores"][match]

    reference = GradCAM(model=detector, target_layers=[detector.get_submodule(layer)])
    expected = reference(input_tensor=batch, targets=[box_score])[0]
    assert correlation(computed.maps["gradcam"][0].numpy(), expected) > 0.999


@pytest.fixture(scope="module")
def square_photo(tmp_path_factory):
    """The astronaut (512 × 512): no letterbox padding, where random weights may put their best box."""
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("square") / "astronaut.jpg"
    Image.fromarray(data.astronaut()).save(path, quality=92)
    return path


def test_run_draws_the_boxes_and_reports_them(detector_file, square_photo, tmp_path):
    photo = square_photo
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(detector_file), str(photo), "--out", str(out)])
    assert result.exit_code == 0, result.output
    folder = next(out.iterdir())
    report = json.loads((folder / "report.json").read_text())
    assert report["methods"] == ["layercam"] and report["model"]["task"] == "detection"  # auto
    detections = report["detections"]
    explained = [d for d in detections if d["explained"]]
    assert len(explained) == 1 and explained[0] is detections[0]  # the top box
    assert explained[0]["index"] == report["target"]["index"]
    assert report["predictions"][0]["prob"] == pytest.approx(explained[0]["score"])
    # In photo pixels: the 320 × 320 input covered the whole (square) photo.
    height, width = load_image(photo).pixels.shape[:2]
    x0, y0, x1, y1 = explained[0]["box"]
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height

    from PIL import Image

    overlay = np.asarray(Image.open(folder / report["outputs"]["overlay"]).convert("RGB"))
    assert overlay.shape == (height, width, 3)
    # The explained box is outlined in white: the middle of its left and right edges.
    middle = int(round((y0 + y1) / 2))
    for x in (x0, x1):
        column = int(round(x))
        assert (overlay[middle, max(column - 1, 0) : column + 2] == 255).all(axis=1).any()
    # report.html draws the same boxes over its overlays: in shares of the photo, explained first.
    import re

    page = (folder / "report.html").read_text()
    viewer = json.loads(re.search(r'id="viewer-data">(.*?)</script>', page, re.S).group(1))
    drawn = viewer["detections"][0]
    assert drawn["explained"] and drawn["box"] == pytest.approx([x0 / width, y0 / height, x1 / width, y1 / height])


def test_target_label_explains_that_class_best_box(detector_file, photo):
    loaded = load_model(detector_file)
    first = attnexplain.explain(loaded, photo)
    other = next(d for d in first.detections if d["index"] != first.target.index)
    chosen = attnexplain.explain(loaded, photo, target=other["index"])
    explained = [d for d in chosen.detections if d["explained"]]
    assert len(explained) == 1 and explained[0]["index"] == other["index"]
    assert explained[0]["score"] == max(d["score"] for d in chosen.detections if d["index"] == other["index"])
    assert not np.allclose(chosen.heatmap, first.heatmap)


def test_a_detector_that_finds_nothing_says_so(detector, photo, tmp_path):
    path = tmp_path / "strict.pt"
    torch.save({"arch": NAME, "arch_kwargs": {"box_score_thresh": 1.0}, "state_dict": detector.state_dict()}, path)
    with pytest.raises(NothingToExplain):
        attnexplain.explain(load_model(path), photo)
    result = CliRunner().invoke(main, ["run", str(path), str(photo), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "nothing to explain" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_named_detector_weights_bring_coco_labels_and_their_preprocessing(detector, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.get_model_weights(NAME)["COCO_V1"]
    target = tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]
    target.parent.mkdir(parents=True)
    torch.save(detector.state_dict(), target)
    loaded = load_model(f"torchvision:{NAME}:COCO_V1")
    assert loaded.labels[1] == "person" and len(loaded.labels) == 91
    assert loaded.preprocessing.size == (320, 320) and loaded.preprocessing.mean == (0.0, 0.0, 0.0)
    assert loaded.plugin.default_layer(loaded.module) == "backbone.body.16"


def _photos(folder):
    from PIL import Image
    from skimage import data

    folder.mkdir()
    for name, pixels in (("cat.jpg", data.chelsea()), ("coffee.jpg", data.coffee()), ("rocket.jpg", data.rocket())):
        Image.fromarray(pixels).save(folder / name, quality=90)
    return folder


def test_batch_draws_and_records_the_same_boxes_as_run(detector_file, tmp_path):
    photos = _photos(tmp_path / "photos")
    result = CliRunner().invoke(
        main,
        [
            "batch",
            str(detector_file),
            str(photos),
            "--out",
            str(tmp_path / "batch"),
            "--quiet",
            "--overlay-format",
            "png",
        ],
    )
    assert result.exit_code == 0, result.output
    records = {r["image"]: r for r in map(json.loads, (tmp_path / "batch" / "results.jsonl").open())}
    assert set(records) == {"cat.jpg", "coffee.jpg", "rocket.jpg"}
    single = attnexplain.explain(load_model(detector_file), photos / "coffee.jpg")
    record = records["coffee.jpg"]
    assert [d["explained"] for d in record["detections"]].count(True) == 1
    batch_boxes = np.array([d["box"] for d in record["detections"][:5]])
    run_boxes = np.array([d["box"] for d in single.detections[:5]])
    np.testing.assert_allclose(batch_boxes, run_boxes, atol=0.5)
    from PIL import Image

    folder = tmp_path / "batch" / record["output"]
    overlay = np.asarray(Image.open(folder / record["files"]["layercam"]["overlay"]).convert("RGB"))
    # The same picture, boxes included, up to boxes a batch of three places a fraction of a pixel
    # away from where a batch of one does.
    assert (overlay != single.overlay(method="layercam")).any(axis=2).mean() < 0.01
    assert (overlay != single.image.pixels).any(axis=2).mean() > 0.5


def test_batch_records_a_detector_that_finds_nothing_per_image(detector, tmp_path):
    path = tmp_path / "strict.pt"
    torch.save({"arch": NAME, "arch_kwargs": {"box_score_thresh": 1.0}, "state_dict": detector.state_dict()}, path)
    photos = _photos(tmp_path / "photos")
    result = CliRunner().invoke(main, ["batch", str(path), str(photos), "--out", str(tmp_path / "b"), "--quiet"])
    assert result.exit_code == 3, result.output  # some images failed: documented code
    records = list(map(json.loads, (tmp_path / "b" / "results.jsonl").open()))
    assert len(records) == 3
    assert all(r["status"] == "failed" and "nothing to explain" in r["reason"] for r in records)


def test_aug_smooth_on_a_detector_and_a_subclassed_detector(detector, photo):
    from attnexplain.explanation import MethodOptions

    class MyDetector(type(detector)):  # a user's subclass, defined outside torchvision
        pass

    detector.__class__ = MyDetector
    try:
        loaded = attnexplain.explanation._as_loaded_model(detector)
        assert loaded.plugin.name == "torchvision" and loaded.plugin.task(detector) == "detection"
        smoothed = attnexplain.explain(loaded, photo, options=MethodOptions(aug_smooth=True))
    finally:
        detector.__class__ = MyDetector.__mro__[1]
    assert smoothed.method == "layercam" and np.isfinite(smoothed.heatmap).all()
    assert any(d["explained"] for d in smoothed.detections)


def test_boxes_of_a_letterboxed_photo_are_mapped_and_clipped_to_it():
    from attnexplain.explanation import boxes_on_photo
    from attnexplain.plugins import Detections
    from attnexplain.preprocess import Preprocessing

    photo = np.zeros((300, 600, 3), dtype=np.uint8)  # 2:1, letterboxed into 100 × 100: 50 × 100
    prepared = prepare(photo, Preprocessing(size=(100, 100), letterbox=True, mean=(0, 0, 0), std=(1, 1, 1)))
    assert prepared.box == (0.0, -150.0, 600.0, 450.0)  # 25 rows of padding above and below
    detected = Detections(
        boxes=torch.tensor([[10.0, 30.0, 50.0, 60.0], [0.0, 0.0, 100.0, 20.0]]),
        labels=torch.tensor([1, 2]),
        scores=torch.tensor([0.9, 0.5]),
    )
    boxes = boxes_on_photo(detected, 1, None, (100, 100), prepared.box, (600, 300))
    assert boxes[0]["box"] == [60.0, 30.0, 300.0, 210.0] and boxes[0]["explained"]
    assert boxes[1]["box"] == [0.0, 0.0, 600.0, 0.0]  # entirely in the padding: clipped to nothing


def test_target_box_n_explains_the_nth_box_by_its_own_score(detector_file, photo):
    loaded = load_model(detector_file)
    first = attnexplain.explain(loaded, photo)
    # A box of the top box's class other than the best: its class's score is the top box's.
    rank = next(n for n, d in enumerate(first.detections) if n and d["index"] == first.detections[0]["index"])
    chosen = attnexplain.explain(loaded, photo, target=f"box:{rank}")
    assert [d["explained"] for d in chosen.detections].index(True) == rank
    assert chosen.target.index == first.detections[rank]["index"]
    assert chosen.target.prob == pytest.approx(first.detections[rank]["score"])
    assert chosen.target.prob < first.target.prob
    assert not np.allclose(chosen.heatmap, first.heatmap)
    count = len(first.detections)
    with pytest.raises(MethodError, match=f"box:{count} is out of range: the model detected {count} boxes"):
        attnexplain.explain(loaded, photo, target=f"box:{count}")
