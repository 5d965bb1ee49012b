"""`attnexplain evaluate`: every metric per method beside a random map, its files, its hostile inputs."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import sobel_edges
from PIL import Image

from attnexplain.cli import main
from attnexplain.explanation import _as_loaded_model
from attnexplain.evaluation import EvaluationSettings, evaluate
from attnexplain.loading import load_model
from attnexplain.metrics import RANDOM_MAP, RANDOMIZATION_LIMIT, MetricSettings, randomization_correlations

from composites import TEST_SEED, make_composites  # samples/, on sys.path via conftest

FAST = MetricSettings(steps=8, randomization_steps=2, batch_size=64)


@pytest.fixture(scope="module")
def composites(tmp_path_factory):
    """Four held-out composites as PNG files and their masks in a mirrored folder."""
    return _write_composites(tmp_path_factory.mktemp("composites"), 4)


def _write_composites(root, count: int):
    pixels, _, masks = make_composites(count, TEST_SEED)
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i, (image, mask) in enumerate(zip(pixels, masks)):
        Image.fromarray(image).save(root / "images" / f"c{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"c{i}.png")
    return root


def _evaluate(args, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(main, ["evaluate", *args, "--out", str(out)])
    return result, out


def test_evaluate_writes_json_csv_and_page_with_the_random_baseline(sample_resnet_file, composites, tmp_path):
    result, out = _evaluate([str(sample_resnet_file), str(composites / "images"), "--method", "gradcam,saliency",
                             "--metrics", "deletion,insertion,drop,pointing,mass,rank", "--steps", "8",
                             "--masks", str(composites / "masks"), "--size", "64"], tmp_path)
    assert result.exit_code == 0, result.output
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["settings"]["methods"] == ["gradcam", "saliency"]
    assert set(evaluation["methods"]) == {"gradcam", "saliency", RANDOM_MAP}
    gradcam = evaluation["methods"]["gradcam"]
    for metric in ("deletion", "insertion", "avg_drop", "increase", "pointing", "mass", "rank"):
        low, high = gradcam[metric]["ci95"]
        assert low <= gradcam[metric]["mean"] <= high and gradcam[metric]["images"] == 4
    assert evaluation["images"] == {"total": 4, "ok": 4, "failed": 0, "mask_errors": 0}
    assert len(evaluation["curves"]["deletion"]["gradcam"]) == len(evaluation["curves"]["fractions"]) == 9
    assert [row["method"] for row in evaluation["ranking"]][0] in ("gradcam", "saliency", RANDOM_MAP)
    assert evaluation["verdict"].startswith("Most faithful on these 4 images:")
    assert evaluation["verdict"] in result.output
    rows = list(csv.DictReader(io.StringIO((out / "evaluation.csv").read_text())))
    assert len(rows) == 4 * 3 and {row["method"] for row in rows} == {"gradcam", "saliency", RANDOM_MAP}
    page = (out / "evaluation.html").read_text()
    assert evaluation["verdict"] in page and page.count("<polyline") == 2 * 3


def test_bad_missing_and_hostile_masks_are_errors_of_their_image(sample_resnet_file, composites, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "c0.png").write_bytes((composites / "masks" / "c0.png").read_bytes())
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / "c1.png")  # wrong size
    (masks / "c2.png").write_bytes(b"not a png at all")
    result, out = _evaluate([str(sample_resnet_file), str(composites / "images"), "--method", "gradcam",
                             "--metrics", "deletion,pointing", "--steps", "4", "--masks", str(masks),
                             "--size", "64"], tmp_path)
    assert result.exit_code == 0, result.output
    evaluation = json.loads((out / "evaluation.json").read_text())
    records = {r["image"]: r for r in evaluation["per_image"]}
    assert "pointing" in records["c0.png"]["metrics"]["gradcam"]
    for name, why in (("c1.png", "is 10×10"), ("c2.png", "mask"), ("c3.png", "does not exist")):
        assert "pointing" not in records[name]["metrics"]["gradcam"]
        assert "deletion" in records[name]["metrics"]["gradcam"]
        assert why in records[name]["mask_error"], records[name]["mask_error"]
    assert evaluation["images"]["mask_errors"] == 3
    assert evaluation["methods"]["gradcam"]["pointing"]["images"] == 1


def test_hostile_boxes_and_file_names_are_escaped_or_refused(sample_resnet_file, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    hostile = "=HYPERLINK(1)<script>alert(1)<\u2044script>.png"
    pixels, _, _ = make_composites(2, TEST_SEED)
    Image.fromarray(pixels[0]).save(images / hostile)
    Image.fromarray(pixels[1]).save(images / "b.png")
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({hostile: [[10, 10, 40, 40]], "b.png": [["x", 1, 2, 3]]}))
    result, out = _evaluate([str(sample_resnet_file), str(images), "--method", "gradcam", "--metrics",
                             "pointing,mass", "--boxes", str(boxes), "--size", "64"], tmp_path)
    assert result.exit_code == 0, result.output
    evaluation = json.loads((out / "evaluation.json").read_text())
    records = {r["image"]: r for r in evaluation["per_image"]}
    assert "mass" in records[hostile]["metrics"]["gradcam"]
    assert "is not [x, y, width, height]" in records["b.png"]["mask_error"]
    assert "<script>" not in (out / "evaluation.html").read_text()
    assert "'=HYPERLINK" in (out / "evaluation.csv").read_text()

    boxes.write_text("{not json")
    result, _ = _evaluate([str(sample_resnet_file), str(images), "--boxes", str(boxes)], tmp_path)
    assert result.exit_code == 1 and "not valid JSON" in result.output and "Traceback" not in result.output
    result, _ = _evaluate([str(sample_resnet_file), str(images), "--metrics", "pointing,bogus"], tmp_path)
    assert result.exit_code == 1 and "Unknown metric 'bogus'" in result.output


def test_a_bad_image_is_recorded_and_the_others_measured(sample_resnet_file, composites, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "good.png").write_bytes((composites / "images" / "c0.png").read_bytes())
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result, out = _evaluate([str(sample_resnet_file), str(images), "--method", "gradcam", "--metrics",
                             "deletion", "--steps", "4", "--size", "64"], tmp_path)
    assert result.exit_code == 3, result.output
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["images"] == {"total": 2, "ok": 1, "failed": 1, "mask_errors": 0}
    assert "broken.png" in (out / "evaluation.html").read_text()


@pytest.mark.parametrize("model,methods", [
    ("vit", "rollout,chefer"),
    pytest.param("segmentation", "gradcam", marks=pytest.mark.heavy),
    pytest.param("detector", "gradcam", marks=pytest.mark.heavy),
])
def test_evaluate_works_on_a_vit_a_segmentation_model_and_a_detector(model, methods, small_vit, composites,
                                                                     tmp_path):
    if model == "vit":
        loaded, size = _as_loaded_model(small_vit), 64
    elif model == "segmentation":
        torch.manual_seed(0)
        loaded, size = load_model("torchvision:lraspp_mobilenet_v3_large"), 96
    else:
        from attnexplain.catalog import catalog_entries

        entry = next(e for _, e in catalog_entries() if e.name == "fasterrcnn_mobilenet_v3_large_320_fpn")
        torch.manual_seed(0)
        path = tmp_path / "detector.pt"
        torch.save({"arch": entry.name, "arch_kwargs": {"box_score_thresh": 0.0},
                    "state_dict": entry.build().eval().state_dict()}, path)
        loaded, size = load_model(path), 160
    evaluation = evaluate(loaded, [str(composites / "images" / "c0.png"), str(composites / "images" / "c1.png")],
                          EvaluationSettings(method=methods, metrics=["deletion", "insertion", "randomization"],
                                             size=size, images_per_batch=2, metric_settings=FAST))
    assert evaluation["images"]["ok"] == 2, evaluation["per_image"]
    for name in methods.split(","):
        values = evaluation["methods"][name]
        assert 0.0 <= values["deletion"]["mean"] <= 1.0 and 0.0 <= values["insertion"]["mean"] <= 1.0
        assert -1.0 <= values["randomization"]["mean"] <= 1.0


# --- on a trained model: a real method beats chance, the sanity check catches a fake ------------

@pytest.fixture(scope="module")
def trained(sample_resnet_file):
    return load_model(sample_resnet_file)


def test_on_the_trained_sample_gradcam_beats_the_random_map(trained, tmp_path):
    composites = _write_composites(tmp_path, 8)
    evaluation = evaluate(trained, [str(composites / "images")],
                          EvaluationSettings(method="gradcam", metrics=["deletion", "insertion", "pointing"],
                                             images_per_batch=8, metric_settings=MetricSettings(steps=16)),
                          masks=composites / "masks")
    gradcam, chance = evaluation["methods"]["gradcam"], evaluation["methods"][RANDOM_MAP]
    assert gradcam["deletion"]["mean"] < chance["deletion"]["mean"]
    assert gradcam["insertion"]["mean"] > chance["insertion"]["mean"]
    assert gradcam["pointing"]["mean"] > chance["pointing"]["mean"]
    assert evaluation["verdict"].startswith("Most faithful on these 8 images: gradcam")


def test_randomization_flags_an_edge_detector_and_passes_gradcam(trained, composites):
    from attnexplain.explanation import compute_maps, plan_explanation
    from attnexplain.preprocess import prepare

    plan = plan_explanation(trained, "gradcam")
    pixels, _, _ = make_composites(8, TEST_SEED)
    batch = torch.cat([prepare(image, plan.preprocessing).tensor for image in pixels])

    def maps_of(module, step):
        import dataclasses

        computed = compute_maps(dataclasses.replace(trained, module=module), batch, plan.methods, plan.layers,
                                targets=targets)
        return torch.stack([computed.maps["gradcam"], sobel_edges(batch)], dim=1)

    original = compute_maps(trained, batch, plan.methods, plan.layers)
    targets = original.targets
    before = torch.stack([original.maps["gradcam"], sobel_edges(batch)], dim=1)
    correlations = randomization_correlations(trained.module, maps_of, before, steps=4)
    final = np.nanmean(correlations[..., -1], axis=0)
    assert final[1] > RANDOMIZATION_LIMIT  # the edge detector: flagged
    assert final[0] < RANDOMIZATION_LIMIT  # Grad-CAM depends on the weights
    assert trained.module.fc.weight.abs().sum() > 0  # the trained model itself was never changed


def test_run_metrics_go_into_report_json_and_page(sample_resnet_file, composites, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", str(sample_resnet_file), str(composites / "images" / "c0.png"),
                                       "--method", "gradcam,saliency", "--metrics", "deletion,drop",
                                       "--size", "64", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "c0" / "report.json").read_text())
    assert set(report["metrics"]) == {"gradcam", "saliency"}
    assert set(report["metrics"]["gradcam"]) == {"deletion", "avg_drop", "increase"}
    assert 0.0 <= report["metrics"]["gradcam"]["deletion"] <= 1.0
    page = (out / "c0" / "report.html").read_text()
    assert "<h2>Metrics</h2>" in page and "%.3f" % report["metrics"]["saliency"]["avg_drop"] in page
    result = CliRunner().invoke(main, ["run", str(sample_resnet_file), str(composites / "images" / "c0.png"),
                                       "--metrics", "pointing", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "evaluate" in result.output and "Traceback" not in result.output


def test_batch_metrics_go_into_each_record_and_detail_page(sample_resnet_file, composites, tmp_path):
    from attnexplain.batch import ok_record_problem, read_results

    out = tmp_path / "batch"
    result = CliRunner().invoke(main, ["batch", str(sample_resnet_file), str(composites / "images"), "--method",
                                       "gradcam", "--metrics", "insertion", "--size", "64", "--out", str(out),
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    records = read_results(out / "results.jsonl")
    assert len(records) == 4
    for record in records:
        assert set(record["metrics"]) == {"gradcam"} and 0 <= record["metrics"]["gradcam"]["insertion"] <= 1
        assert ok_record_problem(record) is None
        assert "<h2>Metrics</h2>" in (out / record["detail"]).read_text()


def test_default_methods_leave_out_those_that_cost_many_forwards_per_image(small_resnet):
    """evaluate's metrics multiply every map's cost: its default keeps the methods of one or two passes
    (a user names the others, or asks for all)."""
    from attnexplain.evaluation import applicable_methods
    from attnexplain.methods import METHODS

    loaded = _as_loaded_model(small_resnet)
    default, every = applicable_methods(loaded, "default"), applicable_methods(loaded, "all")
    many = {name for name, method in METHODS.items() if method.many_forwards}
    assert {"scorecam", "sscam", "ablationcam", "rise", "kernelshap", "lime", "occlusion"} <= many
    assert {"gradcam", "saliency", "fullgrad", "shapleycam"} <= set(default)
    assert not many & set(default) and many <= set(every)
    assert set(default) < set(every)


def test_methods_the_model_refuses_only_when_it_runs_are_left_out_not_every_image_failed(
        sample_resnet_file, composites, tmp_path):
    """DeepLIFT and LRP refuse a ResNet (its blocks call one ReLU twice) only once the model runs: the
    default evaluation leaves them out, says why, and measures the images; named, they are the error."""
    result, out = _evaluate([str(sample_resnet_file), str(composites / "images"), "--metrics", "deletion",
                             "--steps", "4", "--size", "64"], tmp_path)
    assert result.exit_code == 0, result.output
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["images"]["failed"] == 0 and evaluation["images"]["ok"] > 0
    assert {"deeplift", "lrp"} <= set(evaluation["settings"]["left_out"])
    assert "deeplift" not in evaluation["methods"] and "gradcam" in evaluation["methods"]
    assert "Left out deeplift: deeplift cannot run on this model" in result.output
    assert "Left out lrp" in (out / "evaluation.html").read_text()
    named, _ = _evaluate([str(sample_resnet_file), str(composites / "images"), "--method", "gradcam,deeplift",
                          "--metrics", "deletion", "--steps", "4", "--size", "64"], tmp_path / "named")
    assert named.exit_code == 1 and "deeplift cannot run on this model" in named.output


def test_a_boxes_file_that_is_a_fifo_is_refused_in_one_line_without_blocking(sample_resnet_file, tmp_path):
    from conftest import without_blocking

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(make_composites(1, TEST_SEED)[0][0]).save(images / "a.png")
    fifo = tmp_path / "boxes.json"
    os.mkfifo(fifo)
    result, _ = without_blocking(lambda: _evaluate([str(sample_resnet_file), str(images), "--boxes", str(fifo)],
                                                   tmp_path), fifo)
    assert result.exit_code == 1, result.output
    assert result.output.strip() == f"Error: The boxes file {fifo} is a FIFO (named pipe), not a file."


@pytest.mark.parametrize("box", [[1e308, 0, 1e308, 10], [0, 0, 10**400, 10], [0, 0, float("nan"), 10],
                                 [0, 0, 1e309, 10], [True, 0, 5, 5]],
                         ids=["far-corner-overflows", "int-beyond-float", "nan", "infinite", "bool"])
def test_a_box_no_float_can_hold_is_an_error_of_its_image(box):
    from attnexplain.evaluation import MaskError, boxes_mask

    with pytest.raises(MaskError, match=r"is not \[x, y, width, height\]"):
        boxes_mask([box], 32, 24)
    assert boxes_mask([[-1e300, -5, 2e300, 1e300]], 32, 24).all()  # huge but finite: clipped to the photo


def test_hostile_numbers_in_a_boxes_file_fail_their_image_and_a_bad_coco_id_the_file(sample_resnet_file,
                                                                                      tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    pixels, _, _ = make_composites(3, TEST_SEED)
    for name, image in zip(("a.png", "b.png", "c.png"), pixels):
        Image.fromarray(image).save(images / name)
    boxes = tmp_path / "boxes.json"
    # json writes 10**400 as its digits and 1e308 as is: Python reads them back as they were.
    boxes.write_text(json.dumps({"a.png": [[1e308, 0, 1e308, 10]], "b.png": [[0, 0, 10**400, 10]],
                                 "c.png": [[10, 10, 40, 40]]}))
    result, out = _evaluate([str(sample_resnet_file), str(images), "--method", "gradcam", "--metrics",
                             "pointing,mass", "--boxes", str(boxes), "--size", "64"], tmp_path)
    assert result.exit_code == 0, result.output
    records = {r["image"]: r for r in json.loads((out / "evaluation.json").read_text())["per_image"]}
    assert "positive, finite size" in records["a.png"]["mask_error"]
    assert "positive, finite size" in records["b.png"]["mask_error"]
    assert "mass" in records["c.png"]["metrics"]["gradcam"]

    coco = {"images": [{"id": 1, "file_name": "a.png"}],
            "annotations": [{"image_id": 1, "bbox": [1, 1, 5, 5]}, {"image_id": [1], "bbox": [1, 1, 5, 5]}]}
    boxes.write_text(json.dumps(coco))
    result, _ = _evaluate([str(sample_resnet_file), str(images), "--boxes", str(boxes)], tmp_path)
    assert result.exit_code == 1, result.output
    assert result.output.strip() == (f"Error: The COCO file {boxes}: annotation 2 has the image_id [1], "
                                     f"which is not an image's id (a number or text).")
