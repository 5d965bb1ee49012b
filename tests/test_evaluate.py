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
from composites import TEST_SEED, make_composites  # samples/, on sys.path via conftest
from conftest import sobel_edges
from PIL import Image

from attnexplain.cli import main
from attnexplain.evaluation import EvaluationSettings, evaluate
from attnexplain.evaluation_report import render_evaluation_html
from attnexplain.explanation import _as_loaded_model
from attnexplain.loading import load_model
from attnexplain.metrics import RANDOM_MAP, MetricSettings
from attnexplain.randomization import RANDOMIZATION_LIMIT, randomization_similarities

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
    result, out = _evaluate(
        [
            str(sample_resnet_file),
            str(composites / "images"),
            "--method",
            "gradcam,saliency",
            "--metrics",
            "deletion,insertion,drop,pointing,mass,rank",
            "--steps",
            "8",
            "--masks",
            str(composites / "masks"),
            "--size",
            "64",
        ],
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["settings"]["methods"] == ["gradcam", "saliency"]
    assert set(evaluation["methods"]) == {"gradcam", "saliency", RANDOM_MAP}
    gradcam = evaluation["methods"]["gradcam"]
    for metric in ("deletion", "insertion", "avg_drop", "increase", "pointing", "mass", "rank"):
        low, high = gradcam[metric]["ci95"]
        assert low <= gradcam[metric]["mean"] <= high and gradcam[metric]["images"] == 4
    assert evaluation["images"] == {"total": 4, "ok": 4, "failed": 0, "mask_errors": 0}
    assert evaluation["settings"]["pointing_tolerance"] == 15.0  # Zhang et al.'s, by default
    assert len(evaluation["curves"]["deletion"]["gradcam"]) == len(evaluation["curves"]["fractions"]) == 9
    assert [row["method"] for row in evaluation["ranking"]][0] in ("gradcam", "saliency", RANDOM_MAP)
    # On 4 images the intervals are wide: a verdict may also be that nothing is apart from chance.
    assert evaluation["verdict"].startswith(
        (
            "Most faithful on these 4 images:",
            "No single winner:",
            "No ranking metric separates any method from the random map",
        )
    )
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
    result, out = _evaluate(
        [
            str(sample_resnet_file),
            str(composites / "images"),
            "--method",
            "gradcam",
            "--metrics",
            "deletion,pointing",
            "--steps",
            "4",
            "--masks",
            str(masks),
            "--size",
            "64",
        ],
        tmp_path,
    )
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
    result, out = _evaluate(
        [
            str(sample_resnet_file),
            str(images),
            "--method",
            "gradcam",
            "--metrics",
            "pointing,mass",
            "--boxes",
            str(boxes),
            "--size",
            "64",
        ],
        tmp_path,
    )
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
    result, out = _evaluate(
        [
            str(sample_resnet_file),
            str(images),
            "--method",
            "gradcam",
            "--metrics",
            "deletion",
            "--steps",
            "4",
            "--size",
            "64",
        ],
        tmp_path,
    )
    assert result.exit_code == 3, result.output
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["images"] == {"total": 2, "ok": 1, "failed": 1, "mask_errors": 0}
    assert "broken.png" in (out / "evaluation.html").read_text()


@pytest.mark.parametrize(
    "model,methods",
    [
        ("vit", "rollout,chefer"),
        pytest.param("segmentation", "gradcam", marks=pytest.mark.heavy),
        pytest.param("detector", "gradcam", marks=pytest.mark.heavy),
    ],
)
def test_evaluate_works_on_a_vit_a_segmentation_model_and_a_detector(model, methods, small_vit, composites, tmp_path):
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
        torch.save(
            {
                "arch": entry.name,
                "arch_kwargs": {"box_score_thresh": 0.0},
                "state_dict": entry.build().eval().state_dict(),
            },
            path,
        )
        loaded, size = load_model(path), 160
    evaluation = evaluate(
        loaded,
        [str(composites / "images" / "c0.png"), str(composites / "images" / "c1.png")],
        EvaluationSettings(
            method=methods,
            metrics=["deletion", "insertion", "randomization"],
            size=size,
            images_per_batch=2,
            metric_settings=FAST,
        ),
    )
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
    evaluation = evaluate(
        trained,
        [str(composites / "images")],
        EvaluationSettings(
            method="gradcam",
            metrics=["deletion", "insertion", "pointing"],
            images_per_batch=8,
            metric_settings=MetricSettings(steps=16),
        ),
        masks=composites / "masks",
    )
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

        computed = compute_maps(
            dataclasses.replace(trained, module=module), batch, plan.methods, plan.layers, targets=targets
        )
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
    return evaluate(
        loaded,
        images,
        EvaluationSettings(
            method=methods,
            metrics=["randomization"],
            size=size,
            images_per_batch=4,
            metric_settings=MetricSettings(randomization_steps=steps, randomization_images=first, **settings),
        ),
    )


def test_randomization_fails_guided_backprop_and_saliency_and_passes_gradcam_on_the_sample_resnet(trained, composites):
    # The measurement: judged on the fully randomized model only, every one of these passed.
    evaluation = _randomization_check(trained, [str(composites / "images")], "gradcam,guided_backprop,saliency")
    check = evaluation["randomization"]
    assert check["steps"] == ["fc", "layer4.0", "layer3.0 … bn1 + conv1"]  # the head first, one block a step
    verdicts = {name: found["verdict"] for name, found in check["methods"].items()}
    assert verdicts == {
        "gradcam": "passes",
        "guided_backprop": "fails",
        "saliency": "fails",
        RANDOM_MAP: "chance level",
    }
    assert evaluation["randomization_failed"] == ["guided_backprop", "saliency"]
    guided = check["methods"]["guided_backprop"]["curves"]
    assert guided["judged"][0] > 0.9 > guided["judged"][-1]  # survives the head, not the whole model
    for found in check["methods"].values():
        for measure in ("spearman", "spearman_abs", "ssim", "ssim_abs", "judged"):
            assert len(found["curves"][measure]) == 3 and all(-1 <= v <= 1 for v in found["curves"][measure])
    assert abs(check["methods"][RANDOM_MAP]["score"]) < 0.1  # two random maps: the chance level


def test_randomization_fails_rollout_and_raw_attention_and_passes_gradcam_on_the_sample_vit(
    sample_vit_file, composites
):
    evaluation = _randomization_check(
        load_model(sample_vit_file), [str(composites / "images")], "rollout,attention,gradcam"
    )
    methods = evaluation["randomization"]["methods"]
    # Neither reads the head: randomizing it leaves their maps bit-identical.
    assert methods["rollout"]["curves"]["spearman"][0] == methods["attention"]["curves"]["spearman"][0] == 1.0
    assert evaluation["randomization_failed"] == ["rollout", "attention"]
    assert methods["gradcam"]["verdict"] == "passes"


def test_randomization_fails_rollout_and_raw_attention_on_a_vit_the_test_builds(small_vit, composites):
    evaluation = _randomization_check(
        _as_loaded_model(small_vit), [str(composites / "images")], "rollout,attention,gradcam", size=64
    )
    assert evaluation["randomization"]["steps"][:2] == ["heads.head", "encoder.ln + encoder.layers.encoder_layer_2"]
    assert evaluation["randomization_failed"] == ["rollout", "attention"]


@pytest.mark.heavy  # a ResNet-18 explained 4 times over (about a minute on 2 loaded cores)
def test_randomization_fails_guided_backprop_and_passes_gradcam_on_a_resnet_the_test_builds(small_resnet, composites):
    evaluation = _randomization_check(
        _as_loaded_model(small_resnet), [str(composites / "images")], "gradcam,guided_backprop", size=64
    )
    assert evaluation["randomization_failed"] == ["guided_backprop"]


@pytest.mark.heavy  # every default method, 8 images, 5 steps: minutes on 2 loaded cores
def test_randomization_with_the_defaults_on_the_sample_resnet_and_vit(trained, sample_vit_file, tmp_path):
    images = _write_composites(tmp_path, 8)
    resnet = evaluate(trained, [str(images / "images")], EvaluationSettings(metrics=["randomization"]))
    assert "gradcam" not in resnet["randomization_failed"]
    assert {"guided_backprop", "saliency", "input_x_gradient"} <= set(resnet["randomization_failed"])
    vit = evaluate(
        load_model(sample_vit_file),
        [str(images / "images")],
        EvaluationSettings(method="rollout,attention,chefer,gradcam,saliency", metrics=["randomization"]),
    )
    assert set(vit["randomization_failed"]) >= {"rollout", "attention"}
    assert "gradcam" not in vit["randomization_failed"]


def test_randomization_measures_only_the_first_images_and_the_page_draws_its_curves(
    sample_resnet_file, composites, tmp_path
):
    result, out = _evaluate(
        [
            str(sample_resnet_file),
            str(composites / "images"),
            "--method",
            "gradcam,saliency",
            "--metrics",
            "deletion,randomization",
            "--steps",
            "4",
            "--randomization-images",
            "2",
            "--randomization-steps",
            "2",
            "--size",
            "64",
        ],
        tmp_path,
    )
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
    section = page[page.index('id="randomization"') : page.index('id="randomization-table"')]
    assert section.count('class="curve" data-method="saliency"') == 2  # the ρ plot and the SSIM plot
    assert 'class="limit"' in section and "2 layer4.0 … bn1 + conv1." in page


def test_randomization_summary_never_averages_nan_as_zero_and_skips_hostile_records():
    from attnexplain.evaluation_summary import randomization_summary

    def entry(head, second):
        return {measure: [head, second] for measure in ("spearman", "spearman_abs", "ssim", "ssim_abs")}

    records = [
        {
            "status": "ok",
            "randomization": {"gradcam": entry(0.1, 0.2), "blank": entry(None, None), "noisy": entry(None, 0.9)},
        },
        {
            "status": "ok",
            "randomization": {"gradcam": entry(0.3, None), "blank": entry(None, None), "noisy": entry(0.2, 0.1)},
        },
        # Hostile or garbled (a resumed record is untrusted): each entry is left out, never a crash.
        {
            "status": "ok",
            "randomization": {
                "gradcam": entry(1e308, 1.0),
                "noisy": entry("0.1", 0.1),
                "blank": {"spearman": [0.1] * 10**4},
            },
        },
        {
            "status": "ok",
            "randomization": {
                "gradcam": entry(True, 1.0),
                "noisy": [[0.9, 0.9]],
                "blank": entry(10**400, float("nan")),
            },
        },
        {"status": "ok", "randomization": "x"},
        {"status": "failed", "randomization": {"gradcam": entry(0.99, 0.99)}},
    ]
    summary = randomization_summary(records, ["gradcam", "blank", "noisy"], ["fc", "layer4.0"])
    gradcam, blank, noisy = (summary["methods"][name] for name in ("gradcam", "blank", "noisy"))
    assert gradcam["curves"]["spearman"] == [0.2, 0.2]  # the second step: one image, not (0.2 + 0) / 2
    assert gradcam["verdict"] == "passes" and gradcam["images"] == 1  # the image with both early steps
    assert blank["curves"]["judged"] == [None, None] and blank["score"] is None and blank["verdict"] == "fails"
    assert noisy["curves"]["judged"] == [0.2, 0.5]
    json.dumps(summary, allow_nan=False)  # as evaluation.json is written


def test_run_metrics_go_into_report_json_and_page(sample_resnet_file, composites, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [
            "run",
            str(sample_resnet_file),
            str(composites / "images" / "c0.png"),
            "--method",
            "gradcam,saliency",
            "--metrics",
            "deletion,drop",
            "--size",
            "64",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "c0" / "report.json").read_text())
    assert set(report["metrics"]) == {"gradcam", "saliency"}
    assert set(report["metrics"]["gradcam"]) == {"deletion", "avg_drop", "increase"}
    assert 0.0 <= report["metrics"]["gradcam"]["deletion"] <= 1.0
    page = (out / "c0" / "report.html").read_text()
    assert "<h2>Metrics</h2>" in page and "%.3f" % report["metrics"]["saliency"]["avg_drop"] in page
    result = CliRunner().invoke(
        main,
        [
            "run",
            str(sample_resnet_file),
            str(composites / "images" / "c0.png"),
            "--metrics",
            "pointing",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert result.exit_code == 2 and "evaluate" in result.output and "Traceback" not in result.output


def test_batch_metrics_go_into_each_record_and_detail_page(sample_resnet_file, composites, tmp_path):
    from attnexplain.records import ok_record_problem, read_results

    out = tmp_path / "batch"
    result = CliRunner().invoke(
        main,
        [
            "batch",
            str(sample_resnet_file),
            str(composites / "images"),
            "--method",
            "gradcam",
            "--metrics",
            "insertion",
            "--size",
            "64",
            "--out",
            str(out),
            "--quiet",
        ],
    )
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
    sample_resnet_file, composites, tmp_path
):
    """DeepLIFT and LRP refuse a ResNet (its blocks call one ReLU twice) only once the model runs: the
    default evaluation leaves them out, says why, and measures the images; named, they are the error."""
    result, out = _evaluate(
        [str(sample_resnet_file), str(composites / "images"), "--metrics", "deletion", "--steps", "4", "--size", "64"],
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["images"]["failed"] == 0 and evaluation["images"]["ok"] > 0
    assert {"deeplift", "lrp"} <= set(evaluation["settings"]["left_out"])
    assert "deeplift" not in evaluation["methods"] and "gradcam" in evaluation["methods"]
    assert "Left out deeplift: deeplift cannot run on this model" in result.output
    assert "Left out lrp" in (out / "evaluation.html").read_text()
    named, _ = _evaluate(
        [
            str(sample_resnet_file),
            str(composites / "images"),
            "--method",
            "gradcam,deeplift",
            "--metrics",
            "deletion",
            "--steps",
            "4",
            "--size",
            "64",
        ],
        tmp_path / "named",
    )
    assert named.exit_code == 1 and "deeplift cannot run on this model" in named.output


# --- the verdict: paired intervals, the randomization check, saturated metrics (no model) -------


def _records(values: dict[str, dict[str, np.ndarray]]) -> list[dict]:
    """``ok`` per-image records as evaluate writes them, from {method: {metric: value per image}}."""
    count = len(next(iter(next(iter(values.values())).values())))
    return [
        {
            "image": f"i{i}.png",
            "path": f"i{i}.png",
            "status": "ok",
            "metrics": {
                method: {metric: float(column[i]) for metric, column in by_metric.items()}
                for method, by_metric in values.items()
            },
        }
        for i in range(count)
    ]


def _summarised(values: dict[str, dict[str, np.ndarray]], metrics: list[str], sums=None) -> dict:
    """What evaluation.json holds for these records (the summary of a run, its model faked)."""
    from types import SimpleNamespace

    from attnexplain.evaluation_summary import CurveSums, summarize
    from attnexplain.preprocess import Preprocessing

    loaded = SimpleNamespace(describe=lambda: {"source": "synthetic", "task": "classification"})
    plan = SimpleNamespace(layers=[], preprocessing=Preprocessing())
    return summarize(
        loaded,
        plan,
        list(values),
        metrics,
        EvaluationSettings(),
        _records(values),
        sums or CurveSums(),
        [],
        1.0,
        ["synthetic"],
        {},
    )


def test_no_winner_where_the_paired_interval_of_two_methods_includes_zero():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.1, 0.6, 24)
    evaluation = _summarised(
        {
            "gradcam": {"deletion": base},
            "layercam": {"deletion": base + rng.normal(0, 0.02, 24)},
            "xgradcam": {"deletion": base + rng.normal(0, 0.02, 24)},
            RANDOM_MAP: {"deletion": base + 0.2},
        },
        ["deletion"],
    )
    assert evaluation["winner"] is None
    assert set(evaluation["no_difference"]) == {"gradcam", "layercam", "xgradcam"}
    assert ": no difference on 24 images." in evaluation["verdict"]
    assert not evaluation["verdict"].startswith("Most faithful")
    pairs = {(p["method"], p["other"]): p for p in evaluation["pairwise"]}
    assert len(pairs) == 6  # every two of the three methods and the random map
    top = evaluation["no_difference"][0]
    for other in set(evaluation["no_difference"]) - {top}:
        low, high = pairs[(top, other)]["ci95"]
        assert low <= 0 <= high and pairs[(top, other)]["images"] == 24


def test_a_winner_where_the_paired_interval_excludes_zero_though_the_means_intervals_overlap():
    """Images differ far more than methods do: the methods' own intervals overlap, but on every image
    gradcam deletes the class faster than saliency, which only a paired comparison sees."""
    rng = np.random.default_rng(2)
    base = rng.uniform(0.1, 0.6, 24)
    evaluation = _summarised(
        {
            "gradcam": {"deletion": base},
            "saliency": {"deletion": base + 0.01 + rng.normal(0, 0.003, 24)},
            RANDOM_MAP: {"deletion": base + 0.2},
        },
        ["deletion"],
    )
    gradcam, saliency = evaluation["methods"]["gradcam"]["deletion"], evaluation["methods"]["saliency"]["deletion"]
    assert saliency["ci95"][0] < gradcam["ci95"][1]  # unpaired, they overlap
    pair = next(p for p in evaluation["pairwise"] if (p["method"], p["other"]) == ("gradcam", "saliency"))
    saliency_values = np.array([r["metrics"]["saliency"]["deletion"] for r in evaluation["per_image"]])
    assert pair["ci95"][0] > 0 and pair["difference"] == pytest.approx(np.mean(saliency_values - base), abs=1e-6)
    assert evaluation["winner"] == "gradcam" and evaluation["no_difference"] == []
    assert evaluation["verdict"].startswith("Most faithful on these 24 images: gradcam. Ranked by −deletion.")


def test_a_method_failing_the_randomization_check_is_never_recommended():
    from attnexplain.verdict import judge, verdict_text

    rng = np.random.default_rng(3)
    base = rng.uniform(0.1, 0.6, 24)
    records = _records(
        {
            "guided_backprop": {"deletion": base - 0.2},
            "gradcam": {"deletion": base},
            "saliency": {"deletion": base + 0.1},
            RANDOM_MAP: {"deletion": base + 0.3},
        }
    )
    names = ["guided_backprop", "gradcam", "saliency", RANDOM_MAP]
    judged = judge(records, names, ["deletion"], failing=["guided_backprop"])
    assert judged.ranking[0]["method"] == "guided_backprop"  # the most faithful by far...
    assert judged.winner == "gradcam"  # ...but never the recommendation
    text = verdict_text(judged, randomization_checked=True)
    assert text.startswith("Most faithful on these 24 images: gradcam.")
    assert text.endswith("Never recommended, they fail the randomization check: guided_backprop.")
    every = judge(records, names, ["deletion"], failing=["guided_backprop", "gradcam", "saliency"])
    assert every.winner is None and every.tied == []
    assert "No method can be recommended" in verdict_text(every, randomization_checked=True)


def test_a_saturated_metric_is_flagged_uninformative_and_left_out_of_the_ranking():
    """RISE's blur-baseline insertion on an easy model: about 0.998 for every method and the random
    map, within the images' noise. It is flagged, and the ranking score is −deletion alone."""
    rng = np.random.default_rng(4)
    base = rng.uniform(0.1, 0.6, 24)
    chance = 0.994 + rng.uniform(-0.004, 0.004, 24)
    swing = np.tile([0.004, -0.004], 12)  # per image a method is above or below chance, on average neither
    values = {
        name: {"deletion": base + shift, "insertion": chance + swing * sign}
        for name, shift, sign in (("gradcam", 0.0, 1), ("saliency", 0.05, -1), (RANDOM_MAP, 0.2, 0))
    }
    evaluation = _summarised(values, ["deletion", "insertion"])
    assert evaluation["uninformative"] == ["insertion"]
    for method in ("gradcam", "saliency"):
        low, high = evaluation["against_random"]["insertion"][method]["ci95"]
        assert low <= 0 <= high
        assert evaluation["against_random"]["deletion"][method]["ci95"][0] > 0
    assert evaluation["score"] == {"metrics": ["deletion"], "formula": "−deletion"}
    for row in evaluation["ranking"]:
        assert row["faithfulness"] == pytest.approx(-np.mean(values[row["method"]]["deletion"]), abs=1e-6)
    assert "uninformative on these images (no method separates from the random map): insertion" in evaluation["verdict"]
    page = render_evaluation_html(evaluation)
    assert "Uninformative on these 24 images, left out of the ranking: insertion" in page


def test_a_saturated_metric_with_a_small_steady_paired_lead_is_still_uninformative():
    """As the sample ResNet's insertion on 50 composites (every method 0.994, the random map 0.986 with
    images from 0.9 to 1): every method leads the random map by a steady 0.008 (paired interval
    excludes 0), but its own interval overlaps the random map's. Deletion, far apart, decides."""
    rng = np.random.default_rng(6)
    base = rng.uniform(0.1, 0.6, 50)
    chance = np.clip(0.986 + rng.normal(0, 0.03, 50), 0, 1)
    lead = np.minimum(chance + 0.008 + rng.normal(0, 0.002, 50), 1.0)
    values = {
        "gradcam": {"deletion": base, "insertion": lead},
        "saliency": {"deletion": base + 0.05, "insertion": lead},
        RANDOM_MAP: {"deletion": base + 0.3, "insertion": chance},
    }
    evaluation = _summarised(values, ["deletion", "insertion"])
    assert evaluation["against_random"]["insertion"]["gradcam"]["ci95"][0] > 0  # the paired test alone separates
    assert evaluation["uninformative"] == ["insertion"]
    assert evaluation["score"] == {"metrics": ["deletion"], "formula": "−deletion"}
    assert evaluation["winner"] == "gradcam"


def test_the_agreement_of_the_metrics_is_kendall_tau_between_their_rankings():
    """deletion and pointing order the three methods alike (τ 1 once each is signed so that higher is
    better), mass in reverse (τ −1)."""
    from scipy.stats import kendalltau

    rng = np.random.default_rng(5)
    noise = lambda: rng.normal(0, 0.001, 12)  # noqa: E731
    values = {
        name: {
            "deletion": 0.1 * rank + 0.1 + noise(),
            "pointing": 0.9 - 0.2 * rank + noise(),
            "mass": 0.2 + 0.2 * rank + noise(),
        }
        for rank, name in enumerate(("gradcam", "layercam", "saliency"))
    }
    values[RANDOM_MAP] = {"deletion": 0.8 + noise(), "pointing": 0.1 + noise(), "mass": 0.05 + noise()}
    evaluation = _summarised(values, ["deletion", "pointing", "mass"])
    taus = {tuple(pair["metrics"]): pair["tau"] for pair in evaluation["agreement"]["pairs"]}
    assert taus == {("deletion", "pointing"): 1.0, ("deletion", "mass"): -1.0, ("pointing", "mass"): -1.0}
    assert evaluation["agreement"]["mean_tau"] == pytest.approx(-1 / 3, abs=1e-6)
    assert kendalltau([1, 2, 3], [3, 2, 1]).statistic == -1.0  # the convention: reversed order is −1
    assert "Kendall τ" in render_evaluation_html(evaluation)


def test_metrics_are_shown_as_a_reader_expects_and_never_as_negative_zero(capsys):
    """ROAD's MoRF is stored as the change of probability (−0.7: a faithful map) and shown as the drop
    (0.700, ↑ better); a value that rounds to zero is 0.000 on the page and the terminal, never -0.000."""
    from attnexplain.cli.printing import print_evaluation

    rng = np.random.default_rng(6)
    values = {
        name: {
            "road_morf": morf + np.tile([0.001, -0.001], 4),
            "road_lerf": np.full(8, -0.0001),
            "road": rng.normal(-0.0002, 0.00001, 8),
        }
        for name, morf in (("gradcam", -0.7), ("saliency", -0.5), (RANDOM_MAP, -0.2))
    }
    evaluation = _summarised(values, ["road"])
    assert evaluation["methods"]["gradcam"]["road_morf"]["mean"] == pytest.approx(-0.7, abs=0.01)
    page = render_evaluation_html(evaluation)
    print_evaluation(evaluation)
    terminal = capsys.readouterr().out
    for shown in (page, terminal):
        assert "-0.000" not in shown and "−0.000" not in shown
        assert "road_morf drop ↑" in shown and "road_lerf drop ↓" in shown
        assert "0.700" in shown and "-0.700" not in shown
        assert "stored in evaluation.json as the change after − before" in shown  # the convention, once
        assert shown.count("stored in evaluation.json as the change") == 1
    assert "[0.699, 0.701]" in page  # the interval flips with the sign, low to high


def test_the_pointing_tolerance_is_in_the_photos_pixels_whatever_the_model_input_size():
    """A 300×150 photo stretched to a 50×50 input: a model pixel is 3 photo pixels high and 6 wide, so
    a peak 3 model pixels below the object is 9 photo pixels away (a hit at 15), 3 beside it 18 (a miss)."""
    from types import SimpleNamespace

    from attnexplain.evaluation_masks import photo_pixel_sizes
    from attnexplain.metrics import localisation
    from attnexplain.preprocess import Preprocessing, prepare

    box = prepare(np.zeros((150, 300, 3), np.uint8), Preprocessing(size=(50, 50))).box
    sizes = photo_pixel_sizes([SimpleNamespace(box=box)], (50, 50))
    assert sizes.tolist() == [[3.0, 6.0]]
    mask = torch.zeros(1, 50, 50, dtype=torch.bool)
    mask[0, 20:30, 20:30] = True
    maps = torch.zeros(1, 2, 50, 50)
    maps[0, 0, 32, 25] = 1.0  # 3 rows below the object
    maps[0, 1, 25, 32] = 1.0  # 3 columns beside it
    assert localisation(maps, mask, 15.0, sizes)["pointing"].tolist() == [[1.0, 0.0]]


def test_too_few_images_name_no_winner_and_flag_no_metric():
    """One image proves nothing (no interval), and no image is said plainly: nothing is flagged as
    saturated for want of images."""
    from attnexplain.verdict import judge, verdict_text

    one = _records(
        {
            "gradcam": {"deletion": np.array([0.1])},
            "saliency": {"deletion": np.array([0.4])},
            RANDOM_MAP: {"deletion": np.array([0.6])},
        }
    )
    judged = judge(one, ["gradcam", "saliency", RANDOM_MAP], ["deletion"], [])
    assert judged.winner is None and judged.uninformative == []
    assert verdict_text(judged, False).startswith("No single winner: gradcam and saliency: no difference on 1 image.")
    nothing = judge([], ["gradcam", RANDOM_MAP], ["deletion"], [])
    assert verdict_text(nothing, True) == "No image was measured."
    assert json.dumps(nothing.as_dict(), allow_nan=False)  # no NaN where nothing was measured


def test_the_curves_are_large_with_a_line_style_per_method_and_the_random_maps_band():
    """Eight methods and the random map: no two lines look alike (colour and dash), the random map's
    95% band (mean ± 1.96 standard errors per point) is drawn under them, as evaluation.json has it."""
    import re

    from attnexplain.evaluation_summary import CurveSums

    rng = np.random.default_rng(7)
    names = [f"method{i}" for i in range(8)] + [RANDOM_MAP]
    fractions = np.linspace(0, 1, 6)
    sums = CurveSums(fractions=fractions)
    curves = {name: np.clip(1 - fractions[None] * rng.uniform(0.5, 1, (10, 1)), 0, 1) for name in names}
    for which in ("deletion", "insertion"):
        for name in names:
            sums.add(which, name, curves[name])
    values = {name: {"deletion": curves[name].mean(axis=1)} for name in names}
    evaluation = _summarised(values, ["deletion"], sums)
    band = np.array(evaluation["curves"]["random_band"]["deletion"])
    random_curves = curves[RANDOM_MAP]
    half = 1.96 * random_curves.std(axis=0, ddof=1) / np.sqrt(10)
    np.testing.assert_allclose(
        band, np.stack([random_curves.mean(0) - half, random_curves.mean(0) + half], 1).clip(0, 1), atol=1e-6
    )
    page = render_evaluation_html(evaluation)
    assert page.count('<svg width="480" height="300"') == 2 and page.count('<polygon class="band"') == 2
    styles = re.findall(
        r'<polyline class="curve" data-method="([^"]+)" fill="none" stroke="([^"]+)" '
        r'stroke-width="[^"]+"(?: stroke-dasharray="([^"]+)")?',
        page,
    )
    assert len(styles) == 2 * 9
    looks = {method: (colour, dash) for method, colour, dash in styles}
    assert len(set(looks.values())) == 9  # every line its own colour and dash
    assert looks[RANDOM_MAP] == ("#000", "5,3")


def test_a_boxes_file_that_is_a_fifo_is_refused_in_one_line_without_blocking(sample_resnet_file, tmp_path):
    from conftest import without_blocking

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(make_composites(1, TEST_SEED)[0][0]).save(images / "a.png")
    fifo = tmp_path / "boxes.json"
    os.mkfifo(fifo)
    result, _ = without_blocking(
        lambda: _evaluate([str(sample_resnet_file), str(images), "--boxes", str(fifo)], tmp_path), fifo
    )
    assert result.exit_code == 1, result.output
    assert result.output.strip() == f"Error: The boxes file {fifo} is a FIFO (named pipe), not a file."


@pytest.mark.parametrize(
    "box",
    [[1e308, 0, 1e308, 10], [0, 0, 10**400, 10], [0, 0, float("nan"), 10], [0, 0, 1e309, 10], [True, 0, 5, 5]],
    ids=["far-corner-overflows", "int-beyond-float", "nan", "infinite", "bool"],
)
def test_a_box_no_float_can_hold_is_an_error_of_its_image(box):
    from attnexplain.evaluation_masks import MaskError, boxes_mask

    with pytest.raises(MaskError, match=r"is not \[x, y, width, height\]"):
        boxes_mask([box], 32, 24)
    assert boxes_mask([[-1e300, -5, 2e300, 1e300]], 32, 24).all()  # huge but finite: clipped to the photo


def test_hostile_numbers_in_a_boxes_file_fail_their_image_and_a_bad_coco_id_the_file(sample_resnet_file, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    pixels, _, _ = make_composites(3, TEST_SEED)
    for name, image in zip(("a.png", "b.png", "c.png"), pixels):
        Image.fromarray(image).save(images / name)
    boxes = tmp_path / "boxes.json"
    # json writes 10**400 as its digits and 1e308 as is: Python reads them back as they were.
    boxes.write_text(
        json.dumps({"a.png": [[1e308, 0, 1e308, 10]], "b.png": [[0, 0, 10**400, 10]], "c.png": [[10, 10, 40, 40]]})
    )
    result, out = _evaluate(
        [
            str(sample_resnet_file),
            str(images),
            "--method",
            "gradcam",
            "--metrics",
            "pointing,mass",
            "--boxes",
            str(boxes),
            "--size",
            "64",
        ],
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    records = {r["image"]: r for r in json.loads((out / "evaluation.json").read_text())["per_image"]}
    assert "positive, finite size" in records["a.png"]["mask_error"]
    assert "positive, finite size" in records["b.png"]["mask_error"]
    assert "mass" in records["c.png"]["metrics"]["gradcam"]

    coco = {
        "images": [{"id": 1, "file_name": "a.png"}],
        "annotations": [{"image_id": 1, "bbox": [1, 1, 5, 5]}, {"image_id": [1], "bbox": [1, 1, 5, 5]}],
    }
    boxes.write_text(json.dumps(coco))
    result, _ = _evaluate([str(sample_resnet_file), str(images), "--boxes", str(boxes)], tmp_path)
    assert result.exit_code == 1, result.output
    assert result.output.strip() == (
        f"Error: The COCO file {boxes}: annotation 2 has the image_id [1], "
        f"which is not an image's id (a number or text)."
    )
