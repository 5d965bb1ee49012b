"""The model specification (ModelSpec): what the CLI's model options build and batch, evaluate and the
Ray workers take. It fingerprints and reports a run exactly as the dict it replaced did, so that
--resume still recognises a run made before it existed."""

from __future__ import annotations

import hashlib
import json
import pickle
import types
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

import attnexplain.batch_ledger as batch_ledger
from attnexplain.batch import run_batch
from attnexplain.batch_stages import BatchSettings
from attnexplain.cli import main
from attnexplain.errors import AttnExplainError
from attnexplain.evaluation_log import run_fingerprint
from attnexplain.loading import class_file, load_model
from attnexplain.model_spec import ModelSpec
from attnexplain.options import MethodOptions
from attnexplain.preprocess import Preprocessing
from attnexplain.records import file_sha256, fingerprint


def fingerprint_of_a_dict(model_spec: dict, settings, plan=None) -> str:
    """attnexplain.batch.fingerprint as it was when the CLI handed it a dict (its body verbatim)."""
    spec = {
        key: str(value) if isinstance(value, Path) else value
        for key, value in model_spec.items()
        if value is not None and value is not False
    }
    source = spec.get("model")
    if source and Path(str(source)).is_file():
        spec["model_sha256"] = file_sha256(Path(str(source)))
        spec["model"] = Path(str(source)).name
    labels = spec.get("labels")
    if labels and Path(str(labels)).is_file():
        spec["labels"] = file_sha256(Path(str(labels)))
    arch_file = class_file(spec["arch"]) if isinstance(spec.get("arch"), str) else None
    if arch_file is not None and arch_file.is_file():
        spec["arch_sha256"] = file_sha256(arch_file)
    spec.pop("device", None)
    decided = (
        None
        if plan is None
        else {
            "methods": [method.name for method in plan.methods],
            "layers": list(plan.layers),
            "preprocessing": asdict(plan.preprocessing),
        }
    )
    text = json.dumps({"model": spec, "settings": settings.describe(), "plan": decided}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def dict_the_cli_built(spec: ModelSpec) -> dict:
    """The dict `batch` and `evaluate` built from their options before ModelSpec (the device left out)."""
    return {
        "model": spec.model,
        "arch": spec.arch,
        "num_classes": spec.num_classes,
        "labels": spec.labels,
        "trust_model": spec.trust_model,
        "plugin": spec.plugin,
        "arch_kwargs": spec.arch_kwargs,
        "ema": spec.ema,
    }


@pytest.fixture
def model_files(tmp_path) -> dict[str, Path]:
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"not really weights, but bytes to hash")
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    net = tmp_path / "net.py"
    net.write_text("import torch\nclass Net(torch.nn.Module):\n    pass\n")
    return {"weights": weights, "labels": labels, "net": net}


def _specs(files: dict[str, Path]) -> list[ModelSpec]:
    return [
        ModelSpec("torchvision:resnet18"),
        ModelSpec(str(files["weights"]), arch="resnet18"),
        ModelSpec(
            str(files["weights"]),
            arch=f"{files['net']}:Net",
            arch_kwargs='{"width": 3}',
            num_classes=2,
            labels=files["labels"],
            device="cpu",
        ),
        ModelSpec(str(files["weights"]), ema=True, trust_model=True, plugin="torchvision", device="cuda"),
        ModelSpec(str(files["weights"].parent / "missing.pt"), labels=files["weights"].parent / "no-labels.txt"),
    ]


def test_a_model_spec_fingerprints_a_run_as_the_dict_it_replaced(model_files):
    plan = types.SimpleNamespace(
        methods=[types.SimpleNamespace(name="gradcam")], layers=["layer4"], preprocessing=Preprocessing(size=(32, 32))
    )
    settings = BatchSettings(size=(32, 32), options=MethodOptions())
    for spec in _specs(model_files):
        for decided in (None, plan):
            expected = fingerprint_of_a_dict(dict_the_cli_built(spec), settings, decided)
            assert fingerprint(spec, settings, decided) == expected
            assert fingerprint(dict_the_cli_built(spec), settings, decided) == expected  # the API's dict
    # evaluate's default, when no specification is given: the loaded model's source
    assert fingerprint(ModelSpec("torchvision:resnet18"), settings) == fingerprint_of_a_dict(
        {"model": "torchvision:resnet18"}, settings
    )
    # ... and an evaluation's fingerprint, whichever form it is given
    spec = _specs(model_files)[2]
    assert run_fingerprint(spec, types.SimpleNamespace(describe=dict), None, ["deletion"], None) == run_fingerprint(
        dict_the_cli_built(spec), types.SimpleNamespace(describe=dict), None, ["deletion"], None
    )


def test_the_device_does_not_change_the_fingerprint(model_files):
    settings = BatchSettings(options=MethodOptions())
    spec = _specs(model_files)[1]
    assert fingerprint(replace(spec, device="cpu"), settings) == fingerprint(replace(spec, device="cuda"), settings)


def test_a_batch_run_records_the_model_spec_and_fingerprint_the_dict_gave(
    tmp_path, resnet_state_dict_file, monkeypatch
):
    """Through the CLI, as a user runs it: report.json's model_spec and fingerprint are what the
    dict the command built before gave."""
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (40, 30), (200, 40, 10)).save(photos / "red.png")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class {index}" for index in range(5)))
    given = []
    real = batch_ledger.fingerprint

    def recorded(model_spec, settings, plan=None):
        given.append((model_spec, settings, plan))
        return real(model_spec, settings, plan)

    monkeypatch.setattr(batch_ledger, "fingerprint", recorded)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "batch",
            str(resnet_state_dict_file),
            str(photos),
            "--arch",
            "resnet18",
            "--labels",
            str(labels),
            "--arch-kwargs",
            '{"num_classes": 5}',
            "--size",
            "32",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    ((spec, settings, plan),) = given
    assert isinstance(spec, ModelSpec)
    old = {
        "model": str(resnet_state_dict_file),
        "arch": "resnet18",
        "num_classes": None,
        "labels": labels,
        "trust_model": False,
        "plugin": None,
        "arch_kwargs": '{"num_classes": 5}',
        "ema": False,
    }
    run = json.loads((out / "report.json").read_text())["run"]
    assert run["fingerprint"] == fingerprint_of_a_dict(old, settings, plan)
    assert run["model_spec"] == {key: str(value) if value is not None else None for key, value in old.items()}
    assert list(run["model_spec"]) == list(old)  # in the same order


def test_the_python_api_still_takes_the_dict_and_refuses_an_unknown_field(tmp_path):
    assert ModelSpec.of({"model": "m.pt", "arch": "resnet18"}) == ModelSpec("m.pt", arch="resnet18")
    spec = ModelSpec("m.pt")
    assert ModelSpec.of(spec) is spec
    assert ModelSpec.of({}).model is None  # a model in memory, named by nothing
    with pytest.raises(AttnExplainError, match="no field 'weights'"):
        ModelSpec.of({"model": "m.pt", "weights": "x"})
    with pytest.raises(AttnExplainError, match="names no model"):
        ModelSpec.of({}).load()
    with pytest.raises(AttnExplainError, match="no field"):
        run_batch(None, {"model": "m.pt", "wieghts": 1}, [str(tmp_path)], tmp_path / "out", BatchSettings())


def test_a_model_spec_travels_to_a_ray_worker_and_loads_there(tmp_path, resnet_state_dict_file):
    """What the Ray engine hands each actor: a pickled ModelSpec, loaded on the actor's device."""
    from attnexplain.ray_engine import _ExplainWorker

    spec = ModelSpec(str(resnet_state_dict_file), arch="resnet18", arch_kwargs='{"num_classes": 5}', device="cuda")
    travelled = pickle.loads(pickle.dumps(spec))
    assert travelled == spec
    worker = _ExplainWorker(
        travelled, BatchSettings(size=(32, 32), options=MethodOptions()), str(tmp_path), use_gpu=False
    )
    assert str(next(worker.loaded.module.parameters()).device) == "cpu"
    assert worker.loaded.architecture == load_model(str(resnet_state_dict_file), arch="resnet18").architecture


def test_check_refuses_a_fifo_before_torch_and_load_reads_the_labels(tmp_path, resnet_state_dict_file):
    import os

    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    with pytest.raises(AttnExplainError, match="FIFO"):
        ModelSpec(str(fifo)).check()
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class {index}" for index in range(5)))
    loaded = ModelSpec(str(resnet_state_dict_file), arch="resnet18", labels=labels, device="cpu").load()
    assert loaded.labels[:2] == ["class 0", "class 1"]
