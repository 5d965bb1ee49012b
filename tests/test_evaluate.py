"""`attnexplain evaluate`: every metric per method beside a random map, its files, its hostile inputs."""

from __future__ import annotations

import csv
import io
import json

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
from attnexplain.metrics import RANDOM_MAP, RANDOMIZATION_LIMIT, MetricSettings, randomization_similarities

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
    correlations = randomization_similarities(trained.module, maps_of, before, steps=4)["spearman"]
    final = np.nanmean(correlations[..., -1], axis=0)
    assert final[1] > RANDOMIZATION_LIMIT  # the edge detector: flagged
    assert final[0] < RANDOMIZATION_LIMIT  # Grad-CAM depends on the weights
    assert trained.module.fc.weight.abs().sum() > 0  # the trained model itself was never changed


def _randomization_check(loaded, images, methods: str, *, size=None, steps=3, first=4, **settings):
    return evaluate(loaded, images, EvaluationSettings(
        method=methods, metrics=["randomization"], size=size, images_per_batch=4,
        metric_settings=MetricSettings(randomization_steps=steps, randomization_images=first, **settings)))


def test_randomization_fails_guided_backprop_and_saliency_and_passes_gradcam_on_the_sample_resnet(
        trained, composites):
    # The measurement: judged on the fully randomized model only, every one of these passed.
    evaluation = _randomization_check(trained, [str(composites / "images")], "gradcam,guided_backprop,saliency")
    check = evaluation["randomization"]
    assert check["steps"] == ["fc", "layer4.0", "layer3.0 … bn1 + conv1"]  # the head first, one block a step
    verdicts = {name: found["verdict"] for name, found in check["methods"].items()}
    assert verdicts == {"gradcam": "passes", "guided_backprop": "fails", "saliency": "fails",
                        RANDOM_MAP: "chance level"}
    assert evaluation["randomization_failed"] == ["guided_backprop", "saliency"]
    guided = check["methods"]["guided_backprop"]["curves"]
    assert guided["judged"][0] > 0.9 > guided["judged"][-1]  # survives the head, not the whole model
    for name, found in check["methods"].items():
        for measure in ("spearman", "spearman_abs", "ssim", "ssim_abs", "judged"):
            assert len(found["curves"][measure]) == 3 and all(-1 <= v <= 1 for v in found["curves"][measure])
    assert abs(check["methods"][RANDOM_MAP]["score"]) < 0.1  # two random maps: the chance level


def test_randomization_fails_rollout_and_raw_attention_and_passes_gradcam_on_the_sample_vit(
        sample_vit_file, composites):
    evaluation = _randomization_check(load_model(sample_vit_file), [str(composites / "images")],
                                      "rollout,attention,gradcam")
    methods = evaluation["randomization"]["methods"]
    # Neither reads the head: randomizing it leaves their maps bit-identical.
    assert methods["rollout"]["curves"]["spearman"][0] == methods["attention"]["curves"]["spearman"][0] == 1.0
    assert evaluation["randomization_failed"] == ["rollout", "attention"]
    assert methods["gradcam"]["verdict"] == "passes"


def test_randomization_fails_rollout_and_raw_attention_on_a_vit_the_test_builds(small_vit, composites):
    evaluation = _randomization_check(_as_loaded_model(small_vit), [str(composites / "images")],
                                      "rollout,attention,gradcam", size=64)
    assert evaluation["randomization"]["steps"][:2] == ["heads.head", "encoder.ln + encoder.layers.encoder_layer_2"]
    assert evaluation["randomization_failed"] == ["rollout", "attention"]


@pytest.mark.heavy  # a ResNet-18 explained 4 times over (about a minute on 2 loaded cores)
def test_randomization_fails_guided_backprop_and_passes_gradcam_on_a_resnet_the_test_builds(small_resnet,
                                                                                            composites):
    evaluation = _randomization_check(_as_loaded_model(small_resnet), [str(composites / "images")],
                                      "gradcam,guided_backprop", size=64)
    assert evaluation["randomization_failed"] == ["guided_backprop"]


@pytest.mark.heavy  # every default method, 8 images, 5 steps: minutes on 2 loaded cores
def test_randomization_with_the_defaults_on_the_sample_resnet_and_vit(trained, sample_vit_file, tmp_path):
    images = _write_composites(tmp_path, 8)
    resnet = evaluate(trained, [str(images / "images")], EvaluationSettings(metrics=["randomization"]))
    assert "gradcam" not in resnet["randomization_failed"]
    assert {"guided_backprop", "saliency", "input_x_gradient"} <= set(resnet["randomization_failed"])
    vit = evaluate(load_model(sample_vit_file), [str(images / "images")],
                   EvaluationSettings(method="rollout,attention,chefer,gradcam,saliency", metrics=["randomization"]))
    assert set(vit["randomization_failed"]) >= {"rollout", "attention"}
    assert "gradcam" not in vit["randomization_failed"]


def test_randomization_measures_only_the_first_images_and_the_page_draws_its_curves(
        sample_resnet_file, composites, tmp_path):
    result, out = _evaluate([str(sample_resnet_file), str(composites / "images"), "--method", "gradcam,saliency",
                             "--metrics", "deletion,randomization", "--steps", "4", "--randomization-images", "2",
                             "--randomization-steps", "2", "--size", "64"], tmp_path)
    assert result.exit_code == 0, result.output
    evaluation = json.loads((out / "evaluation.json").read_text())
    checked = [record["image"] for record in evaluation["per_image"] if "randomization" in record]
    assert checked == ["c0.png", "c1.png"] and evaluation["randomization"]["images"] == 2
    assert evaluation["settings"]["randomization_images"] == 2
    assert evaluation["methods"]["gradcam"]["randomization"]["images"] == 2
    assert evaluation["methods"]["gradcam"]["deletion"]["images"] == 4  # the other metrics: every image
    record = evaluation["per_image"][0]["randomization"]
    assert set(record) == {"gradcam", "saliency", RANDOM_MAP}
    assert set(record["gradcam"]) == {"spearman", "spearman_abs", "ssim", "ssim_abs"}
    page = (out / "evaluation.html").read_text()
    section = page[page.index('id="randomization"'):page.index('id="randomization-table"')]
    assert section.count('class="curve" data-method="saliency"') == 2  # the ρ plot and the SSIM plot
    assert 'class="limit"' in section and "2 layer4.0 … bn1 + conv1." in page


def test_randomization_summary_never_averages_nan_as_zero_and_skips_hostile_records():
    from attnexplain.evaluation import _randomization_summary

    def entry(head, second):
        return {measure: [head, second] for measure in ("spearman", "spearman_abs", "ssim", "ssim_abs")}

    records = [
        {"status": "ok", "randomization": {"gradcam": entry(0.1, 0.2), "blank": entry(None, None),
                                           "noisy": entry(None, 0.9)}},
        {"status": "ok", "randomization": {"gradcam": entry(0.3, None), "blank": entry(None, None),
                                           "noisy": entry(0.2, 0.1)}},
        # Hostile or garbled (a resumed record is untrusted): each entry is left out, never a crash.
        {"status": "ok", "randomization": {"gradcam": entry(1e308, 1.0), "noisy": entry("0.1", 0.1),
                                           "blank": {"spearman": [0.1] * 10**4}}},
        {"status": "ok", "randomization": {"gradcam": entry(True, 1.0), "noisy": [[0.9, 0.9]],
                                           "blank": entry(10**400, float("nan"))}},
        {"status": "ok", "randomization": "x"},
        {"status": "failed", "randomization": {"gradcam": entry(0.99, 0.99)}},
    ]
    summary = _randomization_summary(records, ["gradcam", "blank", "noisy"], ["fc", "layer4.0"])
    gradcam, blank, noisy = (summary["methods"][name] for name in ("gradcam", "blank", "noisy"))
    assert gradcam["curves"]["spearman"] == [0.2, 0.2]  # the second step: one image, not (0.2 + 0) / 2
    assert gradcam["verdict"] == "passes" and gradcam["images"] == 1  # the image with both early steps
    assert blank["curves"]["judged"] == [None, None] and blank["score"] is None and blank["verdict"] == "fails"
    assert noisy["curves"]["judged"] == [0.2, 0.5]
    json.dumps(summary, allow_nan=False)  # as evaluation.json is written


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
