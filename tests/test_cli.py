"""The command line end to end: outputs written, exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from attnexplain.cli import main

ATTNEXPLAIN = [sys.executable, "-m", "attnexplain"]


def _run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _assert_clean_failure(result, message: str):
    assert result.exit_code != 0
    output = result.output.strip()
    assert "Traceback" not in output
    assert len(output.splitlines()) == 1, output
    assert output.startswith("Error: ") and message in output, output


def test_run_writes_overlay_heatmap_and_reports(tmp_path, resnet_state_dict_file, photo):
    out = tmp_path / "out"
    result = _run("run", resnet_state_dict_file, photo, "--arch", "resnet18", "--size", "96", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    folder = out / "chelsea"
    assert report["outputs"]["directory"] == str(folder.resolve())
    for key in ("image", "model", "method", "layer", "target", "predictions", "outputs", "timings", "versions"):
        assert key in report
    assert report["method"] == "gradcam" and report["layer"] == "layer4"
    assert report["model"]["loader"] == "state_dict" and report["model"]["architecture"] == "resnet18"
    assert len(report["predictions"]) == 5
    assert abs(sum(p["prob"] for p in report["predictions"]) - 1.0) < 1e-5  # 5 classes, top-5
    overlay = Image.open(folder / report["outputs"]["overlay"])
    assert overlay.size == Image.open(photo).size  # original resolution
    heatmap = np.load(folder / report["outputs"]["heatmap"])
    assert heatmap.dtype == np.float32 and heatmap.shape == (96, 96)
    assert json.loads((folder / "report.json").read_text()) == report
    html = (folder / "report.html").read_text()
    assert "data:image/jpeg;base64," in html and "layer4" in html  # self-contained
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_run_prints_a_table_and_the_paths(tmp_path, resnet_state_dict_file, photo):
    result = _run(
        "run",
        resnet_state_dict_file,
        photo,
        "--arch",
        "resnet18",
        "--size",
        "64",
        "--out",
        tmp_path,
        "--labels",
        _labels(tmp_path),
        "--target",
        "cat",
    )
    assert result.exit_code == 0, result.output
    assert "probability" in result.output and "Explained class cat" in result.output
    assert str(tmp_path / "chelsea" / "report.html") in result.output


def _labels(tmp_path: Path) -> Path:
    path = tmp_path / "labels.txt"
    path.write_text("dog\ncat\nbird\nfish\nfrog\n")
    return path


def test_same_file_name_from_another_folder_gets_its_own_outputs(tmp_path, resnet_state_dict_file, photo):
    other = tmp_path / "elsewhere" / "chelsea.jpg"
    other.parent.mkdir()
    Image.open(photo).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other)
    out = tmp_path / "out"
    for image in (photo, other, photo):
        assert (
            _run("run", resnet_state_dict_file, image, "--arch", "resnet18", "--size", "64", "--out", out).exit_code
            == 0
        )
    assert sorted(p.name for p in out.iterdir()) == ["chelsea", "chelsea-2"]
    second = json.loads((out / "chelsea-2" / "report.json").read_text())
    assert second["image"]["path"] == str(other.resolve())


def test_vit_defaults_to_rollout(tmp_path, small_vit, photo):
    import torch

    path = tmp_path / "vit.pt"
    torch.save(
        {
            "arch": "VisionTransformer",
            "arch_kwargs": {
                "image_size": 64,
                "patch_size": 8,
                "num_layers": 3,
                "num_heads": 4,
                "hidden_dim": 32,
                "mlp_dim": 64,
                "num_classes": 6,
            },
            "state_dict": small_vit.state_dict(),
        },
        path,
    )
    result = _run("run", path, photo, "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["method"] == "rollout" and report["preprocessing"]["size"] == [64, 64]


def test_run_writes_jpeg_overlays_when_asked(tmp_path, resnet_state_dict_file, photo):
    result = _run(
        "run",
        resnet_state_dict_file,
        photo,
        "--arch",
        "resnet18",
        "--size",
        "64",
        "--overlay-format",
        "jpg",
        "--out",
        tmp_path,
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    overlay = Path(report["outputs"]["directory"]) / report["outputs"]["overlay"]
    assert overlay.name == "overlay-gradcam.jpg" and Image.open(overlay).format == "JPEG"
    assert Image.open(overlay).size == Image.open(photo).size


def test_layers_lists_spatial_layers_and_the_default(resnet_state_dict_file):
    result = _run("layers", resnet_state_dict_file, "--arch", "resnet18", "--size", "64")
    assert result.exit_code == 0, result.output
    lines = [line.split("\t") for line in result.output.splitlines() if line.startswith("layer4\t")]
    assert lines and lines[0][-1] == "default"
    assert "fc" not in result.output.split()


def test_layers_lists_transformer_blocks_laid_out_as_maps(sample_vit_file):
    result = CliRunner().invoke(main, ["layers", str(sample_vit_file)])
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.output.splitlines()[1:]]
    by_name = {row[0]: row for row in rows}
    # (1, 1 class token + 8 × 8 patches, 96) tokens → a (1, 96, 8, 8) map
    assert by_name["encoder.layers.encoder_layer_1"][2:4] == ["1x65x96", "1x96x8x8"]
    # the half-depth block's input (block 2 of 4), not the last block's: see test_vit_default_layer.py
    assert by_name["encoder.layers.encoder_layer_2.ln_1"][4] == "default"
    assert by_name["encoder.layers.encoder_layer_3.ln_1"][4] != "default"


def test_torchscript_runs_saliency_and_refuses_gradcam_clearly(tmp_path, small_resnet, photo):
    import torch

    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(small_resnet), str(path))
    result = _run("run", path, photo, "--trust-model", "--out", tmp_path / "out", "--size", "64", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["method"] == "saliency"
    refused = _run("run", path, photo, "--trust-model", "--method", "gradcam", "--out", tmp_path / "out2")
    _assert_clean_failure(refused, "inner layers")
    assert not (tmp_path / "out2").exists()


def test_run_overlay_size_decodes_smaller_and_says_so(tmp_path, resnet_state_dict_file, photo):
    result = _run(
        "run",
        resnet_state_dict_file,
        photo,
        "--arch",
        "resnet18",
        "--size",
        "64",
        "--overlay-size",
        "200",
        "--out",
        tmp_path,
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    full = Image.open(photo).size  # 451 x 300: its shorter side 300 → 200 / 451 * 300 = 133
    assert (report["image"]["width"], report["image"]["height"]) == full
    assert report["image"]["decoded"] == {"width": 200, "height": 133}
    overlay = Path(report["outputs"]["directory"]) / report["outputs"]["overlay"]
    assert Image.open(overlay).size == (200, 133)
    assert set(report["timings"]) >= {"load_image_s", "import_s", "load_model_s", "plan_s", "preprocess_s", "explain_s"}


@pytest.mark.parametrize("value", ["8", "big", "-5"])
def test_a_bad_overlay_size_is_a_usage_error(tmp_path, resnet_state_dict_file, photo, value):
    result = _run("run", resnet_state_dict_file, photo, "--overlay-size", value, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--overlay-size'" in result.output and "at least 16, or full" in result.output
    assert not (tmp_path / "out").exists()


def test_batch_caps_overlays_at_the_overlay_size(tmp_path, resnet_state_dict_file, photo):
    out = tmp_path / "out"
    result = _run(
        "batch",
        resnet_state_dict_file,
        photo,
        "--arch",
        "resnet18",
        "--size",
        "32",
        "--overlay-size",
        "100",
        "--out",
        out,
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    overlay = out / "images" / photo.name / "overlay-gradcam.jpg"
    assert Image.open(overlay).size == (100, 67)


@pytest.mark.parametrize(
    "make_args,message",
    [
        (
            lambda t, m, p: ["run", m, t / "missing.jpg", "--arch", "resnet18", "--overlay-size", "99"],
            "Image not found",
        ),
        (lambda t, m, p: ["run", m, t / "missing.jpg", "--arch", "resnet18"], "Image not found"),
        (lambda t, m, p: ["run", m, _write(t / "empty.jpg", b""), "--arch", "resnet18"], "empty"),
        (lambda t, m, p: ["run", m, _write(t / "text.png", b"hello"), "--arch", "resnet18"], "Not an image"),
        (
            lambda t, m, p: ["run", m, _write(t / "cut.jpg", p.read_bytes()[:3000]), "--arch", "resnet18"],
            "Cannot decode",
        ),
        (lambda t, m, p: ["run", m, p, "--arch", "resnet18", "--max-pixels", "1000"], "too large"),
        (lambda t, m, p: ["run", t / "missing.pt", p], "Model file not found"),
        (lambda t, m, p: ["run", m, p], "--arch"),
        (lambda t, m, p: ["run", m, p, "--arch", "resnet50"], "do not fit resnet50"),
        (lambda t, m, p: ["run", m, p, "--arch", "resnet18", "--layer", "nope"], "no layer named 'nope'"),
        (lambda t, m, p: ["run", m, p, "--arch", "resnet18", "--target", "9"], "out of range"),
        (lambda t, m, p: ["run", m, p, "--arch", "resnet18", "--target", "cat"], "no class names"),
        (lambda t, m, p: ["run", m, p, "--arch", "resnet18", "--method", "rollout"], "needs attention"),
        (lambda t, m, p: ["run", m, p, "--arch", "resnet18", "--method", "magic"], "Unknown method"),
        (lambda t, m, p: ["run", "torchvision:resnet18:IMAGENET1K_V1", p], "resnet18-f37072fd.pth"),
    ],
)
def test_bad_input_fails_with_one_line_and_writes_nothing(tmp_path, resnet_state_dict_file, photo, make_args, message):
    out = tmp_path / "out"
    result = _run(*make_args(tmp_path, resnet_state_dict_file, photo), "--size", "64", "--out", out)
    _assert_clean_failure(result, message)
    assert not out.exists()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_failure_while_saving_leaves_no_partial_output(tmp_path, resnet_state_dict_file, photo, monkeypatch):
    from attnexplain import report

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report, "render_html", broken)
    out = tmp_path / "out"
    result = _run("run", resnet_state_dict_file, photo, "--arch", "resnet18", "--size", "64", "--out", out)
    _assert_clean_failure(result, "disk full")
    assert not out.exists()  # neither the result folder nor its staging folder: the folder made for them is gone too


def test_a_failed_rerun_keeps_the_previous_outputs(tmp_path, resnet_state_dict_file, photo, monkeypatch):
    from attnexplain import report

    out = tmp_path / "out"
    args = ["run", resnet_state_dict_file, photo, "--arch", "resnet18", "--size", "64", "--out", out]
    assert _run(*args).exit_code == 0
    before = (out / "chelsea" / "report.json").read_text()
    monkeypatch.setattr(report, "render_html", lambda *a, **k: (_ for _ in ()).throw(OSError("x")))
    assert _run(*args).exit_code != 0
    assert (out / "chelsea" / "report.json").read_text() == before


def test_real_subprocess_run_and_error(tmp_path, resnet_state_dict_file, photo):
    out = tmp_path / "out"
    done = subprocess.run(
        [
            *ATTNEXPLAIN,
            "run",
            str(resnet_state_dict_file),
            str(photo),
            "--arch",
            "resnet18",
            "--size",
            "64",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (out / "chelsea" / "overlay-gradcam.png").is_file()
    failed = subprocess.run(
        [*ATTNEXPLAIN, "run", str(resnet_state_dict_file), str(tmp_path / "no.jpg")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [f"Error: Image not found: {tmp_path / 'no.jpg'}"]


def test_malicious_model_is_refused_from_the_cli(tmp_path, photo):
    import torch
    from test_loading import _Payload

    evidence = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(_Payload(evidence), path)
    result = _run("run", path, photo, "--out", tmp_path / "out")
    _assert_clean_failure(result, "--trust-model")
    assert not evidence.exists()


def test_help_imports_no_torch_and_is_fast():
    code = (
        "import sys, time; t = time.perf_counter(); from attnexplain.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', time.perf_counter() - t)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    verdict = done.stdout.strip().splitlines()[-1].split()
    assert verdict[0] == "NO-TORCH"


def test_several_methods_in_one_run_are_reported_side_by_side(tmp_path, sample_vit_file):
    out = tmp_path / "out"
    image = sample_vit_file.parents[1] / "images" / "rocket-on-brick.png"
    result = _run(
        "run",
        sample_vit_file,
        image,
        "--method",
        "rollout,chefer,attention",
        "--head-fusion",
        "max",
        "--out",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["methods"] == ["rollout", "chefer", "attention"]
    assert report["options"]["head_fusion"] == "max"
    folder = out / "rocket-on-brick"
    for files in report["outputs"]["maps"].values():
        for name in files.values():
            assert (folder / name).is_file(), name
    grid = np.load(folder / report["outputs"]["maps"]["attention"]["attention_grid_npy"])
    assert grid.shape == (4, 4, 8, 8)  # the sample ViT: 4 layers, 4 heads, 8x8 patches
    html = (folder / "report.html").read_text()
    assert html.count('aria-label="rollout overlay"') == 1 and "Learned attention explorer" in html


def test_shapleycam_runs_through_the_sample_vits_attention(tmp_path, sample_vit_file):
    """Shapley-CAM differentiates the score twice, through the blocks' scaled-dot-product attention,
    whose fused CPU kernel has no second derivative: the run must still give its map (with the
    Hessian term, so not Grad-CAM's), not an error."""
    out = tmp_path / "out"
    image = sample_vit_file.parents[1] / "images" / "rocket-on-brick.png"
    result = _run("run", sample_vit_file, image, "--method", "shapleycam,gradcam", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    maps = json.loads(result.output)["outputs"]["maps"]
    shapley, grad = (np.load(out / "rocket-on-brick" / maps[name]["heatmap"]) for name in ("shapleycam", "gradcam"))
    assert np.isfinite(shapley).all() and shapley.std() > 0
    assert np.corrcoef(shapley.ravel(), grad.ravel())[0, 1] < 0.9999  # ½·H·A through attention is not 0


def test_methods_command_lists_every_method():
    from attnexplain.methods import METHODS

    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0
    for name, method in METHODS.items():
        assert name in result.output and method.paper.split(",")[0] in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "gradcam,bogus"], "Unknown method 'bogus'"),
        (["--method", "rollout", "--layer", "layer4"], "--layer does not apply to rollout"),
    ],
)
def test_bad_method_options_fail_cleanly(tmp_path, sample_resnet_file, sample_vit_file, args, message):
    model = sample_vit_file if "rollout" in args else sample_resnet_file
    image = sample_resnet_file.parents[1] / "images" / "cat-on-grass.png"
    result = _run("run", model, image, *args, "--out", tmp_path / "out")
    _assert_clean_failure(result, message)


def test_samples_sets_how_many_masked_images_rise_forwards(tmp_path, resnet_state_dict_file, photo):
    """--samples is RISE's number of random masks: each is one masked image through the model, so
    asking for 8 more masks forwards exactly 8 more images (counted at the model's own forward)."""
    import torch
    import torchvision

    forwarded: list[int] = []

    def count_images(module, inputs):
        if isinstance(module, torchvision.models.ResNet):
            forwarded[-1] += inputs[0].shape[0]

    hook = torch.nn.modules.module.register_module_forward_pre_hook(count_images)
    try:
        for samples in (8, 16):
            forwarded.append(0)
            result = _run(
                "run",
                resnet_state_dict_file,
                photo,
                "--arch",
                "resnet18",
                "--num-classes",
                "5",
                "--size",
                "64",
                "--method",
                "rise",
                "--samples",
                samples,
                "--batch-size",
                "4",
                "--out",
                tmp_path / f"out-{samples}",
                "--json",
            )
            assert result.exit_code == 0, result.output
            report = json.loads(result.output)
            assert report["methods"] == ["rise"]
            assert (Path(report["outputs"]["directory"]) / "heatmap-rise.npy").is_file()
    finally:
        hook.remove()
    assert forwarded[0] >= 8 and forwarded[1] - forwarded[0] == 8, forwarded


def test_lrp_on_a_resnet_fails_in_one_line(tmp_path, resnet_state_dict_file, photo):
    result = _run(
        "run",
        resnet_state_dict_file,
        photo,
        "--arch",
        "resnet18",
        "--num-classes",
        "5",
        "--size",
        "64",
        "--method",
        "lrp",
        "--out",
        tmp_path / "out",
    )
    _assert_clean_failure(result, "lrp cannot run on this model")
    assert not (tmp_path / "out" / "chelsea").exists()


def test_too_many_samples_fail_in_one_line(tmp_path, resnet_state_dict_file, photo):
    result = _run(
        "run",
        resnet_state_dict_file,
        photo,
        "--arch",
        "resnet18",
        "--method",
        "rise",
        "--samples",
        "1000000000",
        "--out",
        tmp_path / "out",
    )
    _assert_clean_failure(result, "samples must be at most 100,000")
