"""evaluate and run --metrics beyond one class: several labels of a multi-label model (each label's
maps measured against its own score and its own object's mask), a contrast (--versus: the
perturbation curves follow score(target) − score(versus)) and CLIP prompts, on models saved to disk
and checked against Grad-CAM, sigmoids and softmaxes computed here with plain autograd."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tagger_model import LABELS, gradcam_by_hand, save_tagger

from attnexplain.cli import main
from attnexplain.images import load_image
from attnexplain.loading import load_model
from attnexplain.planning import plan_preprocessing
from attnexplain.preprocess import prepare

SIZE = 32
CLIP = Path(__file__).resolve().parents[1] / "samples" / "models" / "clip-composites"
PROMPTS = "a photo of an astronaut,a photo of a cat,a photo of a coffee,a photo of a rocket"


@pytest.fixture
def saved(tmp_path) -> tuple[Path, Path, list[str]]:
    """The tagger saved as a user would, its photo and the options that load it."""
    weights, arch = save_tagger(tmp_path)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(photo)
    return weights, photo, ["--arch", arch, "--size", str(SIZE), "--resize", "squash", "--layer", "features"]


def _model_and_input(weights: Path, photo: Path, arch: str) -> tuple[torch.nn.Module, torch.Tensor]:
    loaded = load_model(weights, arch=arch)
    loaded.preprocessing = loaded.preprocessing.with_resize("squash")  # the whole photo: a mask pixel is a map pixel
    return loaded.module, prepare(load_image(photo).pixels, plan_preprocessing(loaded, size=SIZE)).tensor


def _one_pixel_mask(path: Path, y: int, x: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[y, x] = 255
    Image.fromarray(mask).save(path)


def _evaluate(tmp_path: Path, name: str, arguments: list) -> tuple[int, str, Path]:
    out = tmp_path / name
    result = CliRunner().invoke(main, [str(a) for a in ["evaluate", *arguments, "--out", out, "--quiet"]])
    return result.exit_code, result.output, out


def test_evaluate_measures_each_label_against_its_own_object_and_score(tmp_path, saved):
    weights, photo, options = saved
    module, batch = _model_and_input(weights, photo, options[1])
    cams = {label: gradcam_by_hand(module, batch, LABELS.index(label)) for label in ("cat", "dog")}
    peaks = {label: np.unravel_index(int(np.argmax(cam)), cam.shape) for label, cam in cams.items()}
    far = {label: ((y + SIZE // 2) % SIZE, (x + SIZE // 2) % SIZE) for label, (y, x) in peaks.items()}
    masks = tmp_path / "masks"
    _one_pixel_mask(masks / "photo.png", *far["cat"])  # the image's one mask: never a label's
    _one_pixel_mask(masks / "photo" / "cat.png", *far["cat"])  # away from the cat map's peak
    _one_pixel_mask(masks / "photo" / "dog.png", *peaks["dog"])  # on the dog map's peak
    metrics = ["--metrics", "pointing,mass,deletion", "--pointing-tolerance", "0", "--steps", "4"]
    code, output, out = _evaluate(
        tmp_path,
        "eval",
        [weights, photo, *options, "--method", "gradcam", "--masks", masks, *metrics] + ["--target", "cat,dog"],
    )
    assert code == 0, output
    line = json.loads((out / "evaluation.jsonl").read_text().splitlines()[-1])
    found = line["metrics"]
    assert set(found) == {"gradcam@cat", "random@cat", "gradcam@dog", "random@dog"}
    assert (found["gradcam@cat"]["pointing"], found["gradcam@dog"]["pointing"]) == (0.0, 1.0)
    for label in ("cat", "dog"):  # mass: the mask pixel's share of the label's own Grad-CAM
        y, x = far["cat"] if label == "cat" else peaks["dog"]
        expected = cams[label][y, x] / cams[label].sum()
        assert found[f"gradcam@{label}"]["mass"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # The deletion curve of each label starts at its own sigmoid on the intact photo and ends at
    # its sigmoid on the all-zero input (every pixel deleted).
    with torch.no_grad():
        intact, deleted = torch.sigmoid(module(batch))[0], torch.sigmoid(module(torch.zeros_like(batch)))[0]
    for label in ("cat", "dog"):
        curve = line["curves"]["deletion"][f"gradcam@{label}"]
        index = LABELS.index(label)
        assert (curve[0], curve[-1]) == pytest.approx((float(intact[index]), float(deleted[index])), rel=1e-5)
    assert [t["label"] for t in line["targets"]] == ["cat", "dog"]
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["images"]["total"] == 1 and evaluation["settings"]["targets"] == ["cat", "dog"]
    assert evaluation["verdict"].endswith("(Counted per (image, target) pair: 2 pairs.)")
    by_label = evaluation["by_label"]
    assert by_label["dog"]["gradcam"]["pointing"]["mean"] == 1.0 and by_label["cat"]["gradcam"]["pointing"]["mean"] == 0
    # Overall: every (image, label) pair together.
    assert evaluation["methods"]["gradcam"]["pointing"] == {"mean": 0.5, "ci95": [0.0, 1.0], "images": 2}
    table = (out / "evaluation.csv").read_text()
    assert "gradcam@dog" in table and "random@cat" in table
    assert "  dog: gradcam pointing 1.000" in output  # the terminal's per-label lines
    page = (out / "evaluation.html").read_text()
    assert 'id="by-label"' in page and "<td>dog</td><td>gradcam</td><td>1.000" in page


def test_a_label_without_its_own_mask_is_not_measured_against_the_images_mask(tmp_path, saved):
    weights, photo, options = saved
    masks = tmp_path / "masks"
    _one_pixel_mask(masks / "photo.png", 3, 3)
    _one_pixel_mask(masks / "photo" / "cat.png", 5, 5)
    code, output, out = _evaluate(
        tmp_path,
        "eval",
        [weights, photo, *options, "--method", "gradcam", "--masks", masks, "--metrics", "pointing"]
        + ["--target", "cat,dog"],
    )
    assert code == 0, output
    line = json.loads((out / "evaluation.jsonl").read_text().splitlines()[-1])
    assert "pointing" in line["metrics"]["gradcam@cat"] and "pointing" not in line["metrics"]["gradcam@dog"]
    assert "dog.png" in line["mask_error"] and "cat.png" not in line["mask_error"]


@pytest.mark.parametrize(
    ("targets", "extra", "says"),
    [
        ("cat,wolf", [], "No class is labelled 'wolf'"),
        ("cat,Cat", [], "named twice"),
        ("cat,dog", ["--boxes", "BOXES"], "not --boxes"),
        ("cat,dog", ["--versus", "dog"], "--versus 'dog' is one of the targets"),
    ],
)
def test_several_targets_refused_in_one_line(tmp_path, saved, targets, extra, says):
    weights, photo, options = saved
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"photo.png": [[0, 0, 4, 4]]}))
    extra = [boxes if value == "BOXES" else value for value in extra]
    code, output, _ = _evaluate(tmp_path, "eval", [weights, photo, *options, "--target", targets, *extra])
    assert code == 1 and says in output and "Traceback" not in output
    assert len([line for line in output.splitlines() if line.strip()]) == 1


def test_evaluate_and_run_metrics_of_a_contrast_follow_the_difference(tmp_path, saved):
    weights, photo, options = saved
    torch.save({**torch.load(weights), "multilabel": False}, weights)  # a softmax classifier
    module, batch = _model_and_input(weights, photo, options[1])
    with torch.no_grad():
        intact, deleted = torch.softmax(module(batch), 1)[0], torch.softmax(module(torch.zeros_like(batch)), 1)[0]
    assert float(intact[0] - intact[1]) > 0.05  # cat rather than dog: a difference to explain
    code, output, out = _evaluate(
        tmp_path,
        "eval",
        [weights, photo, *options, "--method", "gradcam", "--metrics", "deletion", "--steps", "4"]
        + ["--target", "cat", "--versus", "dog"],
    )
    assert code == 0, output
    curve = json.loads((out / "evaluation.jsonl").read_text().splitlines()[-1])["curves"]["deletion"]["gradcam"]
    assert (curve[0], curve[-1]) == pytest.approx(
        (float(intact[0] - intact[1]), float(deleted[0] - deleted[1])), rel=1e-5, abs=1e-7
    )

    # run --metrics: the average drop of the contrast when the photo is multiplied by the map.
    run_out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [str(a) for a in ["run", weights, photo, *options, "--method", "gradcam", "--target", "cat", "--versus", "dog"]]
        + ["--metrics", "drop", "--out", str(run_out), "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    heatmap = torch.from_numpy(np.load(run_out / "photo" / report["outputs"]["maps"]["gradcam"]["heatmap"]))
    scaled = (heatmap - heatmap.min()) / (heatmap.max() - heatmap.min())
    with torch.no_grad():
        masked = torch.softmax(module(batch * scaled), 1)[0]
    before, after = float(intact[0] - intact[1]), float(masked[0] - masked[1])
    expected = max(before - after, 0.0) / (before + 1e-7)
    assert report["metrics"]["gradcam"]["avg_drop"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("command", ["run", "batch"])
def test_metrics_of_several_targets_follow_each_maps_own_label(tmp_path, saved, command):
    weights, photo, options = saved
    module, batch = _model_and_input(weights, photo, options[1])
    out = tmp_path / command
    result = CliRunner().invoke(
        main,
        [str(a) for a in [command, weights, photo, *options, "--method", "gradcam", "--target", "cat,dog"]]
        + ["--metrics", "drop", "--out", str(out), "--json" if command == "run" else "--quiet"],
    )
    assert result.exit_code == 0, result.output
    if command == "run":
        report = json.loads(result.output)
        files, measured = {k: out / "photo" / v["heatmap"] for k, v in report["outputs"]["maps"].items()}, report
    else:
        record = json.loads((out / "results.jsonl").read_text().splitlines()[0])
        files = {key: out / record["output"] / found["heatmap"] for key, found in record["files"].items()}
        measured = record
    for index, label in ((0, "cat"), (1, "dog")):
        key = f"gradcam@{label}"
        heatmap = torch.from_numpy(np.load(files[key]))
        scaled = (heatmap - heatmap.min()) / (heatmap.max() - heatmap.min())
        with torch.no_grad():
            before = float(torch.sigmoid(module(batch))[0, index])
            after = float(torch.sigmoid(module(batch * scaled))[0, index])
        expected = max(before - after, 0.0) / (before + 1e-7)
        assert measured["metrics"][key]["avg_drop"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


@pytest.mark.heavy
@pytest.mark.skipif(not (CLIP / "config.json").is_file(), reason="the sample CLIP folder is not shipped here")
def test_evaluate_localises_each_prompts_map_on_its_named_object(tmp_path):
    """The sample CLIP (trained on the composites): each object prompt's map against that object's
    mask, a prompt whose object is not in the image unmeasured."""
    samples = CLIP.parents[1]
    masks = tmp_path / "masks"
    (masks / "cat-on-grass").mkdir(parents=True)
    (masks / "cat-on-grass" / "a photo of a cat.png").write_bytes((samples / "masks" / "cat-on-grass.png").read_bytes())
    code, output, out = _evaluate(
        tmp_path,
        "eval",
        [CLIP, samples / "images" / "cat-on-grass.png", "--prompts", PROMPTS, "--method", "chefer"]
        + ["--target", "a photo of a cat,a photo of a rocket", "--masks", masks, "--metrics", "pointing,mass"],
    )
    assert code == 0, output
    record = json.loads((out / "evaluation.json").read_text())["per_image"][0]
    found = record["metrics"]
    assert found["chefer@a photo of a cat"]["pointing"] == 1.0
    assert found["chefer@a photo of a cat"]["mass"] > 3 * found["random@a photo of a cat"]["mass"]
    assert "pointing" not in found["chefer@a photo of a rocket"] and "a photo of a rocket.png" in record["mask_error"]


def test_resume_reuses_an_image_of_several_targets_until_an_objects_mask_changes(tmp_path, saved):
    weights, photo, options = saved
    masks = tmp_path / "masks"
    _one_pixel_mask(masks / "photo" / "cat.png", 2, 2)
    _one_pixel_mask(masks / "photo" / "dog.png", 9, 9)
    command = [weights, photo, *options, "--method", "gradcam", "--masks", masks, "--metrics", "pointing,mass"]
    command += ["--target", "cat,dog", "--pointing-tolerance", "0"]
    code, output, out = _evaluate(tmp_path, "eval", command)
    assert code == 0, output
    first = json.loads((out / "evaluation.json").read_text())["per_image"][0]["metrics"]
    code, output, _ = _evaluate(tmp_path, "eval", [*command, "--resume"])
    again = json.loads((out / "evaluation.json").read_text())
    assert code == 0 and again["reused"] == 1 and again["per_image"][0]["metrics"] == first
    _one_pixel_mask(masks / "photo" / "dog.png", 20, 20)  # the dog's object moved: measured again
    code, output, _ = _evaluate(tmp_path, "eval", [*command, "--resume"])
    assert code == 0 and json.loads((out / "evaluation.json").read_text())["reused"] == 0


def test_a_label_that_is_no_file_name_never_names_a_mask_path(tmp_path):
    """Labels are the model's text: '../cat' must not read MASKS/../cat.png (a mask the test leaves
    there, on the map's peak, would otherwise count)."""
    weights, arch = save_tagger(tmp_path, labels=["../photo", "dog", "grass", "rocket"])
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(photo)
    masks = tmp_path / "masks"
    _one_pixel_mask(masks / "photo" / "dog.png", 1, 1)
    _one_pixel_mask(masks / "photo.png", 0, 0)  # what "masks/photo/../photo.png" would be
    options = ["--arch", arch, "--size", str(SIZE), "--resize", "squash", "--layer", "features"]
    code, output, out = _evaluate(
        tmp_path,
        "eval",
        [weights, photo, *options, "--method", "gradcam", "--masks", masks, "--metrics", "mass"]
        + ["--target", "../photo,dog"],
    )
    assert code == 0, output
    line = json.loads((out / "evaluation.jsonl").read_text().splitlines()[-1])
    assert "mass" not in line["metrics"]["gradcam@../photo"] and "mass" in line["metrics"]["gradcam@dog"]
    assert "no mask of its '../photo' object" in line["mask_error"]


def _block_mask(path: Path, top: int, left: int, side: int) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[top : top + side, left : left + side] = True
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return mask


def test_a_background_label_is_measured_against_every_pixel_outside_the_objects(tmp_path, saved):
    """--background-label grass: grass's region is the complement of the image's object masks (the
    union of MASKS/<image>/*.png, or its one MASKS/<image>.png) or boxes, its mass and pointing by hand."""
    weights, photo, options = saved
    module, batch = _model_and_input(weights, photo, options[1])
    cam = gradcam_by_hand(module, batch, LABELS.index("grass"))
    masks = tmp_path / "masks"
    objects = _block_mask(masks / "photo" / "cat.png", 2, 2, 12) | _block_mask(masks / "photo" / "dog.png", 18, 16, 10)
    single = _block_mask(tmp_path / "single" / "photo.png", 8, 8, 16)
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"photo.png": [[4, 6, 10, 20]]}))  # x, y, width, height
    boxed = np.zeros((SIZE, SIZE), bool)
    boxed[6:26, 4:14] = True
    metrics = ["--metrics", "pointing,mass", "--pointing-tolerance", "0", "--method", "gradcam"]
    for name, where, targets, region in (
        ("several", ["--masks", masks], "cat,grass", ~objects),
        ("one", ["--masks", tmp_path / "single"], "grass", ~single),
        ("boxes", ["--boxes", boxes], "grass", ~boxed),
    ):
        code, output, out = _evaluate(
            tmp_path,
            name,
            [weights, photo, *options, *where, *metrics, "--target", targets, "--background-label", "grass"],
        )
        assert code == 0, output
        found = json.loads((out / "evaluation.jsonl").read_text().splitlines()[-1])["metrics"]
        grass = found["gradcam@grass"] if "," in targets else found["gradcam"]
        assert grass["mass"] == pytest.approx(cam[region].sum() / cam.sum(), rel=1e-4, abs=1e-6)
        assert grass["pointing"] == float(region[np.unravel_index(int(np.argmax(cam)), cam.shape)])
        assert 0 < cam[region].sum() < cam.sum()  # the region is neither all nor none of the map
    cat = gradcam_by_hand(module, batch, LABELS.index("cat"))
    cat_mask = np.asarray(Image.open(masks / "photo" / "cat.png")) > 127
    cat_found = json.loads((tmp_path / "several" / "evaluation.jsonl").read_text().splitlines()[-1])["metrics"]
    assert cat_found["gradcam@cat"]["mass"] == pytest.approx(cat[cat_mask].sum() / cat.sum(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--background-label", "wolf"], "--background-label 'wolf' is not one of the model's classes"),
        (["--background-label", "grass", "--metrics", "deletion"], None),  # no masks: refused
    ],
)
def test_background_label_refused_in_one_line(tmp_path, saved, extra, says):
    weights, photo, options = saved
    masks = tmp_path / "masks"
    _block_mask(masks / "photo.png", 2, 2, 8)
    where = ["--masks", masks] if says else []
    code, output, _ = _evaluate(tmp_path, "eval", [weights, photo, *options, "--method", "gradcam", *where, *extra])
    assert code != 0 and "Traceback" not in output
    assert (says or "--background-label measures a label against the background of --masks or --boxes") in output


def test_a_background_label_without_any_object_mask_is_that_images_error(tmp_path, saved):
    weights, photo, options = saved
    masks = tmp_path / "masks"
    (masks / "photo").mkdir(parents=True)
    (masks / "photo" / "grass.txt").write_text("not a mask")
    code, output, out = _evaluate(
        tmp_path,
        "eval",
        [weights, photo, *options, "--method", "gradcam", "--masks", masks, "--metrics", "pointing"]
        + ["--target", "grass", "--background-label", "grass"],
    )
    line = json.loads((out / "evaluation.jsonl").read_text().splitlines()[-1])
    assert "no object mask to take the background of" in line["mask_error"] and "Traceback" not in output
