"""The checkpoints people really have: PyTorch Lightning's, timm train.py's (with EMA weights), names
two plugins know, the user's own model class, and paths a plugin loads itself (plugin API v2)."""

from __future__ import annotations

import argparse
import json
import pathlib
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner

from attnexplain.cli import main
from attnexplain.errors import ModelLoadError, UntrustedModelError
from attnexplain.loading import load_model
from attnexplain.plugin_api import use_plugins
from attnexplain.plugins import ModelPlugin, NamedModel, PluginInfo


def _same_outputs(module, reference, size=64) -> bool:
    torch.manual_seed(5)
    batch = torch.randn(2, 3, size, size)
    with torch.no_grad():
        return torch.allclose(module(batch), reference(batch), atol=1e-5)


def _lightning_checkpoint(network: torch.nn.Module, prefix: str) -> dict:
    """What Lightning's Trainer.save_checkpoint writes for a LightningModule holding ``network`` as
    ``self.<prefix>``, a weighted loss and a metric (built by hand: Lightning is not installed)."""
    state_dict = {f"{prefix}{key}": value for key, value in network.state_dict().items()}
    state_dict["criterion.weight"] = torch.tensor([1.0, 2.0, 1.0, 0.5])
    state_dict["val_accuracy.tp"] = torch.tensor([3, 1, 0, 2])
    return {
        "epoch": 4,
        "global_step": 250,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": state_dict,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 5, "completed": 4}}}},
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
                "best_model_score": torch.tensor(0.31),
                "best_model_path": "/runs/epoch=3.ckpt",
                "dirpath": "/runs",
                "best_k_models": {"/runs/epoch=3.ckpt": torch.tensor(0.31)},
            }
        },
        "optimizer_states": [
            {
                "state": {0: {"momentum_buffer": torch.zeros(3)}},
                "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0]}],
            }
        ],
        "lr_schedulers": [{"step_size": 10, "last_epoch": 4, "_last_lr": [0.1]}],
        "hparams_name": "kwargs",
        "hyper_parameters": {
            "lr": 0.1,
            "num_classes": 4,
            "data_dir": pathlib.PosixPath("/data/pets"),
            "args": argparse.Namespace(batch_size=32, arch="resnet18"),
        },
    }


@pytest.fixture(scope="module")
def four_class_resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=4).eval()


@pytest.mark.parametrize("prefix", ["model.", "net.", "model.backbone."])
def test_lightning_checkpoint_loads_without_trust_and_says_what_it_left_out(tmp_path, four_class_resnet, prefix):
    path = tmp_path / "epoch=4-step=250.ckpt"
    torch.save(_lightning_checkpoint(four_class_resnet, prefix), path)
    loaded = load_model(path, arch="resnet18")
    assert _same_outputs(loaded.module, four_class_resnet)
    assert loaded.module.fc.out_features == 4
    assert f"the weights are under '{prefix}' in the checkpoint" in loaded.notes
    assert any(note.startswith("2 tensors outside") and "criterion.weight" in note for note in loaded.notes)


def test_lightning_module_whose_own_attributes_are_the_network(tmp_path, four_class_resnet):
    # self.conv1 = ... on the LightningModule itself: no prefix, the loss's weights beside them.
    checkpoint = _lightning_checkpoint(four_class_resnet, "")
    path = tmp_path / "last.ckpt"
    torch.save(checkpoint, path)
    loaded = load_model(path, arch="resnet18")
    assert _same_outputs(loaded.module, four_class_resnet)
    assert any(note.startswith("2 tensors outside") for note in loaded.notes)
    # The same extra keys in a plain state_dict are a mismatch, not silently dropped.
    plain = tmp_path / "plain.pt"
    torch.save(checkpoint["state_dict"], plain)
    with pytest.raises(ModelLoadError, match="2 unexpected keys"):
        load_model(plain, arch="resnet18")


def test_lightning_checkpoint_names_its_arch_and_classes_in_hyper_parameters(tmp_path, four_class_resnet):
    # save_hyperparameters() keeps the LightningModule's arguments: arch and num_classes among them.
    checkpoint = _lightning_checkpoint(four_class_resnet, "model.")
    checkpoint["hyper_parameters"]["arch"] = "resnet18"
    path = tmp_path / "epoch=4-step=250.ckpt"
    torch.save(checkpoint, path)
    loaded = load_model(path)
    assert loaded.architecture == "resnet18" and loaded.module.fc.out_features == 4
    assert _same_outputs(loaded.module, four_class_resnet)
    # The hyper-parameters' class count is used: one that the head contradicts is an error.
    checkpoint["hyper_parameters"]["num_classes"] = 7
    torch.save(checkpoint, path)
    with pytest.raises(ModelLoadError, match="do not fit resnet18"):
        load_model(path)
    # --arch overrides them (and their class count with them); a name that is no string is refused.
    checkpoint["hyper_parameters"]["arch"] = "resnet34"
    torch.save(checkpoint, path)
    assert load_model(path, arch="resnet18").module.fc.out_features == 4
    checkpoint["hyper_parameters"]["arch"] = ["resnet18"]
    torch.save(checkpoint, path)
    with pytest.raises(ModelLoadError, match="'arch' entry .* is not a name"):
        load_model(path)
    result = CliRunner().invoke(main, ["layers", str(path)])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1


def test_lightning_attribute_dict_hyper_parameters_load_as_plain_data(tmp_path, four_class_resnet):
    # Lightning pickles its AttributeDict by reference; here a stand-in class with its name does.
    import sys
    import types

    module = types.ModuleType("lightning.fabric.utilities.data")

    class AttributeDict(dict):
        pass

    AttributeDict.__module__, AttributeDict.__qualname__ = module.__name__, "AttributeDict"
    module.AttributeDict = AttributeDict
    names = ["lightning", "lightning.fabric", "lightning.fabric.utilities", module.__name__]
    saved = {name: sys.modules.get(name) for name in names}
    for name in names[:-1]:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[module.__name__] = module
    try:
        checkpoint = _lightning_checkpoint(four_class_resnet, "model.")
        checkpoint["hyper_parameters"]["optimizer"] = AttributeDict(name="sgd", lr=0.1)
        path = tmp_path / "attrdict.ckpt"
        torch.save(checkpoint, path)
    finally:
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value
    assert b"AttributeDict" in path.read_bytes()
    assert _same_outputs(load_model(path, arch="resnet18").module, four_class_resnet)


class _Payload:
    """What a hostile checkpoint hides in hyper_parameters: unpickling it would create a file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_lightning_checkpoint_with_code_in_hyper_parameters_is_refused(tmp_path, four_class_resnet, photo):
    marker = tmp_path / "pwned"
    checkpoint = _lightning_checkpoint(four_class_resnet, "model.")
    checkpoint["hyper_parameters"]["loss"] = _Payload(str(marker))
    path = tmp_path / "hostile.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(UntrustedModelError, match="builtins.getattr"):
        load_model(path, arch="resnet18")
    result = CliRunner().invoke(
        main, ["run", str(path), str(photo), "--arch", "resnet18", "--size", "64", "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1 and "--trust-model" in result.output
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_lightning_checkpoint_explained_from_the_cli(tmp_path, four_class_resnet, photo):
    path = tmp_path / "model.ckpt"
    torch.save(_lightning_checkpoint(four_class_resnet, "net."), path)
    result = CliRunner().invoke(
        main,
        ["run", str(path), str(photo), "--arch", "resnet18", "--size", "64", "--out", str(tmp_path / "out"), "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert any("criterion.weight" in note for note in report["model"]["notes"])
    assert (tmp_path / "out" / "chelsea" / "report.json").is_file()


# --- timm train.py ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm():
    """timm, the timm plugin's dependency: only the cases that use it skip where it is missing."""
    return pytest.importorskip("timm")


@pytest.fixture(scope="module")
def timm_train_checkpoint(tmp_path_factory, timm):
    """What timm's train.py (CheckpointSaver) writes, for a model torchvision does not have."""
    torch.manual_seed(1)
    trained = timm.create_model("convnext_atto", num_classes=6).eval()
    averaged = timm.create_model("convnext_atto", num_classes=6).eval()
    args = argparse.Namespace(
        model="convnext_atto",
        lr=0.01,
        epochs=3,
        data_dir="/data",
        mean=None,
        input_size=None,
        model_ema=True,
        model_ema_decay=0.9998,
    )
    checkpoint = {
        "epoch": 2,
        "arch": "convnext_atto",
        "state_dict": trained.state_dict(),
        "state_dict_ema": averaged.state_dict(),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]},
        "version": 2,
        "args": args,
        "metric": 71.3,
    }
    path = tmp_path_factory.mktemp("timm") / "model_best.pth.tar"
    torch.save(checkpoint, path)
    return path, trained, averaged, checkpoint


@pytest.mark.heavy
def test_timm_train_checkpoint_loads_with_its_arch_and_its_ema_weights(timm_train_checkpoint):
    path, trained, averaged, _ = timm_train_checkpoint
    loaded = load_model(path)
    assert loaded.architecture == "convnext_atto" and loaded.plugin.name == "timm"
    assert _same_outputs(loaded.module, trained)
    ema = load_model(path, ema=True)
    assert _same_outputs(ema.module, averaged) and not _same_outputs(ema.module, trained)
    assert any("EMA" in note for note in ema.notes)


def test_ema_without_ema_weights_is_a_clear_error(tmp_path, timm_train_checkpoint, photo):
    _, _, _, checkpoint = timm_train_checkpoint
    path = tmp_path / "no-ema.pth.tar"
    torch.save({key: value for key, value in checkpoint.items() if key != "state_dict_ema"}, path)
    with pytest.raises(ModelLoadError, match="has none .*Leave out --ema"):
        load_model(path, ema=True)
    result = CliRunner().invoke(main, ["run", str(path), str(photo), "--ema", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "Leave out --ema" in result.output
    assert len(result.output.strip().splitlines()) == 1
    with pytest.raises(ModelLoadError, match="named model, not a training checkpoint"):
        load_model("torchvision:resnet18", ema=True)


def test_timm_train_checkpoint_with_ema_explained_from_the_cli(tmp_path, timm_train_checkpoint, photo):
    path = timm_train_checkpoint[0]
    result = CliRunner().invoke(
        main, ["run", str(path), str(photo), "--ema", "--size", "64", "--out", str(tmp_path / "out"), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["model"]["plugin"] == "timm" and report["model"]["architecture"] == "convnext_atto"


# --- a name two plugins know --------------------------------------------------------------------


@pytest.mark.heavy
def test_a_name_two_plugins_know_takes_the_builder_the_weights_fit(tmp_path, timm):
    torch.manual_seed(2)
    timm_model = timm.create_model("convnext_tiny", num_classes=5).eval()
    path = tmp_path / "convnext.pt"
    torch.save(timm_model.state_dict(), path)
    loaded = load_model(path, arch="convnext_tiny")
    assert loaded.plugin.name == "timm" and _same_outputs(loaded.module, timm_model)
    assert any("timm:convnext_tiny" in note for note in loaded.notes)
    # torchvision's own weights keep their meaning.
    torchvision_model = torchvision.models.convnext_tiny(num_classes=5).eval()
    torch.save(torchvision_model.state_dict(), path)
    loaded = load_model(path, arch="convnext_tiny")
    assert loaded.plugin.name == "torchvision" and _same_outputs(loaded.module, torchvision_model)


def test_weights_neither_plugin_fits_list_both_candidates_with_their_prefix(tmp_path, timm):
    path = tmp_path / "other.pt"
    torch.save(timm.create_model("convnext_atto", num_classes=5).state_dict(), path)
    with pytest.raises(ModelLoadError) as error:
        load_model(path, arch="convnext_tiny")
    message = str(error.value)
    assert "torchvision:convnext_tiny (" in message and "timm:convnext_tiny (" in message
    assert "\n" not in message


def test_an_explicit_plugin_prefix_selects_that_plugin(tmp_path, timm):
    torch.manual_seed(3)
    model = timm.create_model("resnet18", num_classes=3).eval()  # the same keys as torchvision's
    path = tmp_path / "resnet.pt"
    torch.save(model.state_dict(), path)
    assert load_model(path, arch="resnet18").plugin.name == "torchvision"
    chosen = load_model(path, arch="timm:resnet18")
    assert chosen.plugin.name == "timm" and _same_outputs(chosen.module, model)


@pytest.mark.parametrize(
    "arch, suggested",
    [
        pytest.param("convnext", "convnext_atto", marks=pytest.mark.heavy),  # ~20 timm builds (meta)
        ("ResNet", "resnet50"),
    ],
)
def test_a_class_name_as_arch_gets_a_did_you_mean(tmp_path, request, arch, suggested):
    weights = (
        request.getfixturevalue("timm").create_model("convnext_atto", num_classes=3)
        if arch == "convnext"
        else torchvision.models.resnet50(num_classes=3)
    ).state_dict()
    path = tmp_path / "checkpoint.pth"
    torch.save({"arch": arch, "state_dict": weights}, path)  # timm writes type(model).__name__.lower()
    with pytest.raises(ModelLoadError, match=f"Did you mean {suggested}\\b.*the weights fit"):
        load_model(path)


# --- the user's own class -----------------------------------------------------------------------

USER_MODEL = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """Nothing torchvision or timm has: two convolutions, a pooled linear head."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


NOT_A_MODULE = 3
'''


@pytest.fixture
def user_model(tmp_path):
    """The user's model file, a saved state_dict of a 7-class, width-6 TinyNet, and the model."""
    source = tmp_path / "my_models" / "tiny.py"
    source.parent.mkdir()
    source.write_text(USER_MODEL)
    namespace: dict = {}
    exec(compile(USER_MODEL, str(source), "exec"), namespace)
    torch.manual_seed(4)
    model = namespace["TinyNet"](num_classes=7, width=6).eval()
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)
    return source, weights, model


def test_users_own_class_from_a_file_explained_end_to_end(tmp_path, user_model, photo):
    source, weights, model = user_model
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "run",
            str(weights),
            str(photo),
            "--arch",
            f"{source}:TinyNet",
            "--arch-kwargs",
            '{"width": 6}',
            "--method",
            "gradcam",
            "--size",
            "48",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["model"]["architecture"] == f"{source}:TinyNet"
    assert (out / "chelsea" / "report.json").is_file()
    loaded = load_model(weights, arch=f"{source}:TinyNet", arch_kwargs={"width": 6})
    assert _same_outputs(loaded.module, model) and loaded.module.head.out_features == 7


def test_users_own_class_from_a_module(tmp_path, user_model, monkeypatch):
    source, weights, model = user_model
    (source.parent / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(source.parent.parent))
    loaded = load_model(weights, arch="my_models.tiny:TinyNet", arch_kwargs={"width": 6, "num_classes": 7})
    assert _same_outputs(loaded.module, model)


@pytest.mark.parametrize(
    "arch, kwargs, message",
    [
        ("{dir}/missing.py:TinyNet", None, "missing.py does not exist"),
        ("{source}:Nope", None, "has no class Nope; its nn.Module classes: TinyNet"),
        ("{source}:NOT_A_MODULE", None, "NOT_A_MODULE in .* is a int, not a torch.nn.Module class"),
        ("{source}:TinyNet", '{"depth": 3}', "TinyNet takes no argument 'depth' \\(it takes num_classes, width\\)"),
        ("{source}:TinyNet", '{"width": 6', "--arch-kwargs is not valid JSON"),
        ("{source}:TinyNet", "[6]", "--arch-kwargs must be a JSON object"),
        ("{source}:TinyNet", '{"width": 5}', "do not fit"),
        ("{broken}:TinyNet", None, "Importing .*broken.py failed: ZeroDivisionError: division by zero"),
        ("{exits}:TinyNet", None, "Importing .*exits.py failed: SystemExit"),
        ("no_such_package_xyz.models:Net", None, "No module named 'no_such_package_xyz'"),
    ],
)
def test_users_own_class_errors_are_one_line(tmp_path, user_model, photo, arch, kwargs, message):
    source, weights, _ = user_model
    (tmp_path / "broken.py").write_text("import torch\n1 / 0\n")
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(0)\n")
    arch = arch.format(dir=tmp_path, source=source, broken=tmp_path / "broken.py", exits=tmp_path / "exits.py")
    arguments = ["run", str(weights), str(photo), "--arch", arch, "--size", "48", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(main, arguments + (["--arch-kwargs", kwargs] if kwargs else []))
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and not (tmp_path / "o").exists()
    import re

    assert re.search(message, lines[0]), lines[0]


def test_a_checkpoint_cannot_make_us_import_a_class(tmp_path, user_model):
    source, weights, _ = user_model
    marker = tmp_path / "imported"
    evil = tmp_path / "evil.py"
    evil.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    for arch in (f"{evil}:TinyNet", "evil:TinyNet"):
        path = tmp_path / "checkpoint.pth"
        torch.save({"arch": arch, "state_dict": torch.load(weights)}, path)
        with pytest.raises(ModelLoadError, match="a file may not ask for"):
            load_model(path)
    assert not marker.exists()


# --- plugin API v2: claimed paths, whole specs, random_weights, labels ----------------------------


class _FolderPlugin(ModelPlugin):
    """A tiny plugin that loads folders holding a ``tiny-config.json`` and builds ``tiny:`` names."""

    name = "tiny-folders"
    source_prefix = "tiny"

    def __init__(self) -> None:
        self.specs: list[str] = []

    def specificity(self, model):
        return 30 if type(model).__name__ == "TinyFolderNet" else None

    def claims_path(self, path: Path) -> bool:
        return path.is_dir() and (path / "tiny-config.json").is_file()

    def load_path(self, path: Path, *, trust_model: bool = False) -> NamedModel:
        config = json.loads((path / "tiny-config.json").read_text())
        if config.get("explode"):
            raise RuntimeError("the plugin's own bug")
        return NamedModel(
            module=_tiny_folder_net(len(config["id2label"])),
            architecture="TinyFolderNet",
            weights=str(path),
            labels=None,
            random_weights=False,
        )

    def split_spec(self, rest: str) -> tuple[str, str | None]:
        self.specs.append(rest)
        return rest, None  # a path with colons (C:\models\x) stays whole

    def load_named(self, name: str, weights: str | None) -> NamedModel:
        return NamedModel(
            module=_tiny_folder_net(3), architecture=name, weights=weights, random_weights=name.endswith("random")
        )

    def labels(self, model):
        return [f"tiny-{index}" for index in range(model[-1].out_features)]


def _tiny_folder_net(classes: int) -> torch.nn.Module:
    class TinyFolderNet(torch.nn.Sequential):
        pass

    return TinyFolderNet(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, classes),
    )


class _BrokenClaims(ModelPlugin):
    name = "broken-claims"

    def claims_path(self, path: Path) -> bool:
        raise RuntimeError("looked at the wrong thing")


@pytest.fixture
def tiny_plugins():
    plugin = _FolderPlugin()
    with use_plugins(
        PluginInfo("tiny-folders", "tiny-dist", "1.0", plugin, None),
        PluginInfo("broken-claims", "tiny-dist", "1.0", _BrokenClaims(), None),
        keep_installed=True,
    ):
        yield plugin


def test_a_folder_a_plugin_claims_is_loaded_by_it(tmp_path, tiny_plugins, photo):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "tiny-config.json").write_text(json.dumps({"id2label": {"0": "a", "1": "b"}}))
    loaded = load_model(folder)
    assert loaded.architecture == "TinyFolderNet" and loaded.plugin is tiny_plugins
    assert loaded.labels == ["tiny-0", "tiny-1"]  # from the labels hook
    assert not any("random weights" in note for note in loaded.notes)  # random_weights=False
    assert any("broken-claims failed" in note for note in loaded.notes)
    result = CliRunner().invoke(
        main, ["run", str(folder), str(photo), "--size", "32", "--out", str(tmp_path / "out"), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["predictions"][0]["label"].startswith("tiny-")


def test_a_folder_no_plugin_claims_is_a_clear_error(tmp_path, tiny_plugins):
    with pytest.raises(ModelLoadError, match="is a folder, and no installed plugin loads"):
        load_model(tmp_path)


def test_a_plugin_raising_in_claims_path_does_not_break_other_files(tmp_path, tiny_plugins, four_class_resnet):
    path = tmp_path / "plain.pt"
    torch.save(four_class_resnet.state_dict(), path)
    loaded = load_model(path, arch="resnet18")
    assert _same_outputs(loaded.module, four_class_resnet)
    assert any("broken-claims failed" in note and "looked at the wrong thing" in note for note in loaded.notes)


def test_the_plugin_splits_the_whole_spec_and_says_whether_weights_are_random(tiny_plugins):
    loaded = load_model(r"tiny:C:\models\x")
    assert tiny_plugins.specs[-1] == r"C:\models\x" and loaded.architecture == r"C:\models\x"
    assert not any("random weights" in note for note in loaded.notes)  # random_weights=False
    random = load_model("tiny:net-random")
    assert any(note.startswith("random weights") for note in random.notes)


def test_explicit_labels_win_over_the_labels_hook(tiny_plugins):
    model = _tiny_folder_net(2)
    assert load_model(model).labels == ["tiny-0", "tiny-1"]
    assert load_model(model, labels=["cat", "dog"]).labels == ["cat", "dog"]


def test_a_plugin_failing_to_load_its_path_is_one_line_naming_it(tmp_path, tiny_plugins, photo):
    folder = tmp_path / "bad-model"
    folder.mkdir()
    (folder / "tiny-config.json").write_text(json.dumps({"explode": True}))
    result = CliRunner().invoke(main, ["run", str(folder), str(photo), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: Plugin tiny-folders could not load {folder}: RuntimeError: the plugin's own bug"
    ]
