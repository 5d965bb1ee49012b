"""Multi-label models (a sigmoid per class): --scores sigmoid, or a checkpoint that says
``"multilabel": true`` (at its top level or in Lightning's ``hyper_parameters``), reports each
class's own probability, sigmoid(logit), rather than a softmax over the classes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tagger_model import NET_SOURCE

from attnexplain.cli import main
from attnexplain.images import load_image
from attnexplain.loading import load_model
from attnexplain.planning import plan_preprocessing
from attnexplain.preprocess import prepare

SIZE = 32


@pytest.fixture
def tagger(tmp_path) -> tuple[dict, Path, list[str]]:
    source = tmp_path / "tagger.py"
    source.write_text(NET_SOURCE)
    namespace: dict = {}
    exec(compile(NET_SOURCE, str(source), "exec"), namespace)
    torch.manual_seed(4)
    state = namespace["Tagger"]().state_dict()
    state["head.bias"] = torch.tensor([2.0, 1.5, -0.5, -3.0])  # two labels present, two absent
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(photo)
    return state, photo, ["--arch", f"{source}:Tagger", "--size", str(SIZE)]


def _logits(weights: Path, photo: Path, arch: str) -> torch.Tensor:
    loaded = load_model(weights, arch=arch)
    batch = prepare(load_image(photo).pixels, plan_preprocessing(loaded, size=SIZE)).tensor
    with torch.no_grad():
        return loaded.module(batch)[0]


def _predictions(tmp_path: Path, weights: Path, photo: Path, options: list[str], *extra: str) -> list[dict]:
    out = tmp_path / f"out-{weights.stem}"
    result = CliRunner().invoke(
        main, [str(a) for a in ["run", weights, photo, *options, *extra, "--out", out, "--json"]]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.output)["predictions"]


def _independent(predictions: list[dict], logits: torch.Tensor) -> None:
    expected = torch.sigmoid(logits)
    assert len(predictions) == 4
    for prediction in predictions:
        assert prediction["prob"] == pytest.approx(float(expected[prediction["index"]]), rel=1e-5)
    assert sum(p["prob"] for p in predictions) > 1.2  # independent: no softmax sums to that
    assert [p["index"] for p in predictions] == torch.argsort(expected, descending=True).tolist()


def test_scores_sigmoid_reports_each_class_its_own_probability(tmp_path, tagger):
    state, photo, options = tagger
    weights = tmp_path / "tagger.pt"
    torch.save(state, weights)
    logits = _logits(weights, photo, options[1])
    _independent(_predictions(tmp_path, weights, photo, options, "--scores", "sigmoid"), logits)
    softmax = _predictions(tmp_path, weights, photo, options)
    assert sum(p["prob"] for p in softmax) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("where", ["top", "lightning"])
def test_a_checkpoint_that_says_multilabel_is_read_with_sigmoids(tmp_path, tagger, where):
    state, photo, options = tagger
    weights = tmp_path / f"checkpoint-{where}.pt"
    checkpoint = {"state_dict": state}
    if where == "top":
        checkpoint["multilabel"] = True
    else:
        checkpoint["hyper_parameters"] = {"multilabel": True, "lr": 0.01}
    torch.save(checkpoint, weights)
    logits = _logits(weights, photo, options[1])
    _independent(_predictions(tmp_path, weights, photo, options), logits)
    forced = _predictions(tmp_path, weights, photo, options, "--scores", "softmax")
    assert sum(p["prob"] for p in forced) == pytest.approx(1.0, abs=1e-5)


def test_an_unknown_scores_kind_is_a_usage_error(tmp_path, tagger):
    state, photo, options = tagger
    weights = tmp_path / "tagger.pt"
    torch.save(state, weights)
    result = CliRunner().invoke(main, [str(a) for a in ["run", weights, photo, *options, "--scores", "tanh"]])
    assert result.exit_code == 2 and "'tanh' is not one of 'auto', 'softmax', 'sigmoid'" in result.output


def test_every_label_above_the_threshold_is_reported_present(tmp_path, tagger):
    state, photo, options = tagger
    weights = tmp_path / "tagger.pt"
    torch.save({"state_dict": state, "multilabel": True, "labels": ["cat", "dog", "grass", "rocket"]}, weights)
    probabilities = torch.sigmoid(_logits(weights, photo, options[1]))
    for threshold in (0.5, 0.9):
        out = tmp_path / f"t{threshold}"
        result = CliRunner().invoke(
            main,
            [str(a) for a in ["run", weights, photo, *options, "--top-k", "1", "--threshold", threshold]]
            + ["--out", str(out), "--json"],
        )
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        expected = [i for i in torch.argsort(probabilities, descending=True).tolist() if probabilities[i] >= threshold]
        assert [p["index"] for p in report["present"]] == expected
        shown = [p["index"] for p in report["predictions"]]
        assert shown == (expected if len(expected) > 1 else shown[:1])  # past --top-k 1 to every present label
    assert [p["label"] for p in json.loads(result.output)["present"]] != [] or probabilities.max() < 0.9


def test_the_gallery_files_a_multilabel_image_under_each_present_label(tmp_path, tagger):
    state, photo, options = tagger
    weights = tmp_path / "tagger.pt"
    torch.save({"state_dict": state, "multilabel": True, "labels": ["cat", "dog", "grass", "rocket"]}, weights)
    probabilities = torch.sigmoid(_logits(weights, photo, options[1]))
    present = [["cat", "dog", "grass", "rocket"][i] for i in torch.argsort(probabilities, descending=True).tolist()]
    present = present[: int((probabilities >= 0.5).sum())]
    assert len(present) >= 2  # the fixture's biases make two labels present
    out = tmp_path / "batch"
    result = CliRunner().invoke(main, [str(a) for a in ["batch", weights, photo, *options, "--out", out, "--quiet"]])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert [p["label"] for p in record["present"]] == present
    report = json.loads((out / "report.json").read_text())
    assert report["class_histogram"] == {name: 1 for name in present}
    assert json.dumps("; ".join(present)) in (out / "gallery-data.js").read_text()


def _gradcam_by_hand(weights: Path, photo: Path, arch: str, index: int, resize: str | None = None) -> np.ndarray:
    loaded = load_model(weights, arch=arch)
    loaded.preprocessing = loaded.preprocessing.with_resize(resize)  # as --resize does
    batch = prepare(load_image(photo).pixels, plan_preprocessing(loaded, size=SIZE)).tensor.requires_grad_()
    captured = {}
    handle = loaded.module.features.register_forward_hook(lambda module, args, output: captured.setdefault("a", output))
    logits = loaded.module(batch)
    handle.remove()
    (gradient,) = torch.autograd.grad(logits[0, index], captured["a"])
    cam = torch.relu((gradient.mean(dim=(2, 3), keepdim=True) * captured["a"]).sum(dim=1))[0]
    return cam.detach().numpy()


def test_several_targets_give_one_map_per_label_each_naming_it(tmp_path, tagger):
    state, photo, options = tagger
    weights = tmp_path / "tagger.pt"
    labels = ["cat", "dog", "grass/sky", "rocket"]  # a label that is no file name
    torch.save({"state_dict": state, "multilabel": True, "labels": labels}, weights)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [str(a) for a in ["run", weights, photo, *options, "--layer", "features", "--target", "dog,grass/sky"]]
        + ["--out", str(out), "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["methods"] == ["gradcam@dog", "gradcam@grass/sky"]
    for key, index in (("gradcam@dog", 1), ("gradcam@grass/sky", 2)):
        assert report["maps"][key]["target"] == {"index": index, "label": labels[index], "method": "gradcam"}
        name = report["outputs"]["maps"][key]["heatmap"]
        assert "/" not in name
        heatmap = np.load(out / "photo" / name)
        np.testing.assert_allclose(heatmap, _gradcam_by_hand(weights, photo, options[1], index), rtol=1e-4, atol=1e-6)
    dog = np.load(out / "photo" / report["outputs"]["maps"]["gradcam@dog"]["heatmap"])
    grass = np.load(out / "photo" / report["outputs"]["maps"]["gradcam@grass/sky"]["heatmap"])
    assert not np.allclose(dog, grass)
    html = (out / "photo" / "report.html").read_text()
    assert "gradcam@dog" in html and "gradcam@grass/sky" in html


def test_batch_writes_each_labels_map(tmp_path, tagger):
    state, photo, options = tagger
    weights = tmp_path / "tagger.pt"
    torch.save({"state_dict": state, "multilabel": True, "labels": ["cat", "dog", "grass", "rocket"]}, weights)
    out = tmp_path / "batch"
    command = ["batch", weights, photo, *options, "--target", "cat,dog", "--out", out, "--quiet"]
    result = CliRunner().invoke(main, [str(a) for a in command])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert record["methods"] == ["gradcam@cat", "gradcam@dog"]
    assert [record["maps"][key]["target"]["label"] for key in record["methods"]] == ["cat", "dog"]
    for key in record["methods"]:
        assert (out / record["output"] / record["files"][key]["heatmap"]).is_file()
    assert "gradcam@dog" in (out / record["detail"]).read_text()


def test_batch_truth_takes_several_labels_per_image(tmp_path, tagger):
    state, photo, options = tagger
    names = ["cat", "dog", "grass", "rocket"]
    weights = tmp_path / "tagger.pt"
    torch.save({"state_dict": state, "multilabel": True, "labels": names}, weights)
    probabilities = torch.sigmoid(_logits(weights, photo, options[1]))
    present = sorted(names[i] for i in range(4) if probabilities[i] >= 0.5)
    for cell, right in ((";".join(present), 1), (" rocket ; cat ", 0)):
        truth = tmp_path / "truth.csv"
        truth.write_text(f'image,labels\nphoto.png,"{cell}"\n')
        out = tmp_path / f"batch-{right}"
        command = ["batch", weights, photo, *options, "--truth", truth, "--out", out, "--quiet"]
        result = CliRunner().invoke(main, [str(a) for a in command])
        assert result.exit_code == 0, result.output
        record = json.loads((out / "results.jsonl").read_text().splitlines()[0])
        assert record["truth"] == cell.replace(" ", "")
        judged = json.loads((out / "report.json").read_text())["truth"]
        assert (judged["judged"], judged["correct"]) == (1, right)


@pytest.mark.parametrize("cell", ["cat;;dog", "cat;cat", ";"])
def test_a_truth_cell_of_empty_or_repeated_labels_is_refused(tmp_path, cell):
    from attnexplain.truth import TruthError, read_truth

    truth = tmp_path / "truth.csv"
    truth.write_text(f"image,class\na.png,{cell}\n")
    with pytest.raises(TruthError, match="not a name"):
        read_truth(str(truth))


def test_evaluate_localises_each_labels_map_against_that_objects_mask(tmp_path, tagger):
    state, photo, options = tagger
    names = ["cat", "dog", "grass", "rocket"]
    weights = tmp_path / "tagger.pt"
    torch.save({"state_dict": state, "multilabel": True, "labels": names}, weights)
    # The whole photo is the model's input (--resize squash), so that a mask pixel is a map pixel.
    cam = _gradcam_by_hand(weights, photo, options[1], 0, resize="squash")
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    on_peak = np.zeros((SIZE, SIZE), np.uint8)
    on_peak[y, x] = 255
    far = np.zeros((SIZE, SIZE), np.uint8)
    far[(y + SIZE // 2) % SIZE, (x + SIZE // 2) % SIZE] = 255
    masks = tmp_path / "masks"
    (masks / "photo").mkdir(parents=True)
    Image.fromarray(far).save(masks / "photo.png")  # the image's one mask: elsewhere
    Image.fromarray(on_peak).save(masks / "photo" / "cat.png")  # the cat's own mask: on its map's peak

    def pointing(target: str) -> float:
        out = tmp_path / f"eval-{target}"
        command = [
            "evaluate",
            weights,
            photo,
            *options,
            "--resize",
            "squash",
            "--layer",
            "features",
            "--method",
            "gradcam",
        ]
        command += ["--metrics", "pointing", "--pointing-tolerance", "0", "--masks", masks, "--target", target]
        result = CliRunner().invoke(main, [str(a) for a in command + ["--out", out, "--quiet", "--json"]])
        assert result.exit_code == 0, result.output
        line = json.loads((out / "evaluation.jsonl").read_text().splitlines()[-1])
        return line["metrics"]["gradcam"]["pointing"]

    assert pointing("cat") == 1.0  # measured against masks/photo/cat.png
    assert pointing("dog") == 0.0  # no dog.png: the image's mask, away from any peak of a 1-pixel map
