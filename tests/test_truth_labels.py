"""batch --truth of a multi-label run: each label counted on its own (found, said but not there,
missed; precision and recall), since a confusion table of one class against one has no cell for
"cat;dog". Checked against the labels a sigmoid computed here puts at or above 0.5."""

from __future__ import annotations

import json

import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image
from tagger_model import LABELS, save_tagger

from attnexplain.cli import main
from attnexplain.images import load_image
from attnexplain.loading import load_model
from attnexplain.planning import plan_preprocessing
from attnexplain.preprocess import prepare
from attnexplain.truth_labels import label_counts

SIZE = 24


def test_label_counts_count_each_label_on_its_own():
    found = label_counts([(["cat", "dog"], ["cat"]), (["dog"], ["dog", "grass"]), (["cat"], ["cat"])])
    assert found["labels"]["cat"] == {
        "images": 2,
        "true_positives": 2,
        "false_positives": 0,
        "false_negatives": 0,
        "precision": 1.0,
        "recall": 1.0,
    }
    assert found["labels"]["dog"]["false_negatives"] == 1 and found["labels"]["dog"]["recall"] == 0.5
    assert found["labels"]["grass"] == {
        "images": 0,
        "true_positives": 0,
        "false_positives": 1,
        "false_negatives": 0,
        "precision": 0.0,
        "recall": None,
    }
    assert (found["precision"], found["recall"]) == (0.75, 0.75)  # 3 right of the 4 said, of the 4 held


def test_batch_truth_of_a_multilabel_model_counts_each_label(tmp_path):
    weights, arch = save_tagger(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    generator = np.random.default_rng(2)
    for name in ("a", "b", "c"):
        pixels = generator.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{name}.png")
    truth = {"a.png": "cat;dog", "b.png": "dog;rocket", "c.png": "grass"}
    (tmp_path / "truth.csv").write_text("image,labels\n" + "".join(f"{k},{v}\n" for k, v in truth.items()))
    out = tmp_path / "batch"
    command = ["batch", weights, images, "--arch", arch, "--size", SIZE, "--truth", tmp_path / "truth.csv"]
    result = CliRunner().invoke(main, [str(a) for a in command + ["--out", out, "--quiet"]])
    assert result.exit_code == 0, result.output

    loaded = load_model(weights, arch=arch)
    preprocessing = plan_preprocessing(loaded, size=SIZE)
    expected = []
    for name, cell in truth.items():
        batch = prepare(load_image(images / name).pixels, preprocessing).tensor
        with torch.no_grad():
            present = [LABELS[i] for i, p in enumerate(torch.sigmoid(loaded.module(batch))[0]) if p >= 0.5]
        expected.append((cell.split(";"), present))
    judged = json.loads((out / "report.json").read_text())["truth"]
    assert judged["labels"] == label_counts(expected)["labels"]
    assert judged["correct"] == sum(sorted(t) == sorted(p) for t, p in expected)
    assert "confusion" not in judged
    page = (out / "index.html").read_text()
    assert "Per label" in page and "<th>rocket</th>" in page
