"""Hostile model files: a model file never runs code unless trusted, never exhausts memory, and every
refusal is one line that says why.

Every hostile file is built here. Where a file is meant to run code, a control first shows that
PyTorch's own loader does run it (the marker appears), so that "no marker" after our refusal means
something.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile
from typing import Tuple

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner

from attnexplain.cli import main
from attnexplain.errors import ModelLoadError, UntrustedModelError
from attnexplain.loading import load_model

ATTNEXPLAIN = [sys.executable, "-m", "attnexplain"]


def _cli(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def _assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    output = result.output.strip()
    assert "Traceback" not in output
    assert len(output.splitlines()) == 1, output
    assert output.startswith("Error: "), output
    for fragment in fragments:
        assert fragment in output, output
    return output


class _Touch:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _Exit:
    """Unpickling this ends the program with status 0."""

    def __reduce__(self):
        return (sys.exit, (0,))


# --- 1. torch.export archives --------------------------------------------------------------------


def _rewrite_zip(path, change) -> None:
    """Rewrite the archive at ``path``; ``change(members)`` edits a {name: bytes} dict in place."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    change(members)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def _member(members, suffix: str) -> str:
    return next(name for name in members if name.endswith(suffix))


@pytest.fixture(scope="module")
def exported_archive(tmp_path_factory) -> bytes:
    """A torch.export archive of a ResNet-18, exported once (seconds) and tampered with per test."""
    model = torchvision.models.resnet18(num_classes=5).eval()
    path = tmp_path_factory.mktemp("export") / "resnet18.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 32, 32),)), str(path))
    return path.read_bytes()


def _tampered_pt2(tmp_path, where: str, marker, archive: bytes):
    path = tmp_path / f"tampered-{where}.pt2"
    path.write_bytes(archive)
    payload = pickle.dumps(_Touch(marker))

    def change(members):
        if where == "sample-inputs":
            members[_member(members, "data/sample_inputs/model.pt")] = payload
        elif where == "pickled-weight":
            config_name = _member(members, "data/weights/model_weights_config.json")
            config = json.loads(members[config_name])
            entry = config["config"]["conv1.weight"]
            entry["use_pickle"] = True
            members[config_name] = json.dumps(config).encode()
            members[_member(members, f"data/weights/{entry['path_name']}")] = payload
        else:  # an opaque constant
            config_name = _member(members, "data/constants/model_constants_config.json")
            prefix = config_name[: -len("model_constants_config.json")]
            members[config_name] = json.dumps(
                {
                    "config": {
                        "evil": {
                            "path_name": "opaque_obj_0",
                            "is_param": False,
                            "use_pickle": True,
                            "tensor_meta": None,
                        }
                    }
                }
            ).encode()
            members[prefix + "opaque_obj_0"] = payload

    _rewrite_zip(path, change)
    return path


@pytest.mark.parametrize("where", ["sample-inputs", "pickled-weight", "opaque-constant"])
def test_tampered_export_archive_is_refused_without_running_its_pickle(tmp_path, photo, where, exported_archive):
    marker = tmp_path / "pwned"
    path = _tampered_pt2(tmp_path, where, marker, exported_archive)
    try:  # control: PyTorch's own loader runs the payload
        torch.export.load(str(path))
    except Exception:
        pass
    assert marker.exists(), "the tampered archive should run its payload under torch.export.load"
    marker.unlink()

    with pytest.raises(UntrustedModelError, match="torch.export program.*unpickles.*--trust-model"):
        load_model(path)
    _assert_one_line_error(_cli("run", path, photo, "--out", tmp_path / "out"), "torch.export program", "--trust-model")
    _assert_one_line_error(_cli("layers", path), "torch.export program", "--trust-model")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_trusted_export_archive_that_fails_to_load_is_one_line(tmp_path, exported_archive):
    path = tmp_path / "exported.pt2"
    path.write_bytes(exported_archive)
    _rewrite_zip(
        path, lambda members: members.update({_member(members, "data/sample_inputs/model.pt"): b"\x80\x04 damaged"})
    )
    # torch logs a whole traceback to stderr before it raises; only our line may come out.
    done = subprocess.run(
        [*ATTNEXPLAIN, "layers", str(path), "--trust-model"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: Cannot load torch.export program"), lines


# --- 2. TorchScript ------------------------------------------------------------------------------


class _FileWriter(torch.nn.Module):
    """A TorchScript module whose scripted __setstate__ creates a file when the archive is loaded."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.target = state[0]
        # Using the result keeps TorchScript from dropping the call as dead code.
        self.training = bool(torch.from_file(self.target, shared=True, size=4).numel() == 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Wrapper(torch.nn.Module):
    def __init__(self, target: str) -> None:
        super().__init__()
        self.inner = _FileWriter(target)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.mark.parametrize("name", ["scripted.pt", "renamed.pth", "no-suffix"])
def test_torchscript_that_writes_a_file_is_refused_unless_trusted(tmp_path, photo, name):
    marker = tmp_path / "written-by-torchscript"
    path = tmp_path / name
    torch.jit.save(torch.jit.script(_Wrapper(str(marker))), str(path))
    torch.jit.load(str(path))  # control: loading runs the scripted __setstate__
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UntrustedModelError, match="TorchScript program.*runs code"):
        load_model(path)
    _assert_one_line_error(_cli("layers", path), "TorchScript program", "--trust-model")
    _assert_one_line_error(_cli("run", path, photo, "--out", tmp_path / "out"), "TorchScript program", "--trust-model")
    assert not marker.exists()

    load_model(path, trust_model=True)  # the user vouched for it: it runs
    assert marker.exists()


# --- 3. malicious pickles: say what they would run -----------------------------------------------


def test_malicious_pickle_is_named_and_never_runs(tmp_path, photo):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": _Touch(marker)}, path)
    with pytest.raises(UntrustedModelError) as raised:
        load_model(path)
    message = str(raised.value)
    assert f"{os.system.__module__}.system" in message and "arbitrary code" in message
    assert "Not a PyTorch model file" not in message
    output = _assert_one_line_error(_cli("run", path, photo, "--out", tmp_path / "out"), "--trust-model")
    assert f"{os.system.__module__}.system" in output
    _assert_one_line_error(_cli("layers", path), f"{os.system.__module__}.system")
    assert not marker.exists()


def test_malicious_pickle_in_the_legacy_format_is_named(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.pt"
    torch.save({"x": _Touch(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UntrustedModelError, match=r"system"):
        load_model(path)
    assert not marker.exists()


def test_trusted_pickle_that_exits_is_a_one_line_error_not_success(tmp_path, photo):
    path = tmp_path / "exits.pt"
    torch.save({"model": _Exit()}, path)
    with pytest.raises(ModelLoadError, match="SystemExit"):
        load_model(path, trust_model=True)
    _assert_one_line_error(
        _cli("run", path, photo, "--trust-model", "--out", tmp_path / "out"), "Cannot unpickle", "SystemExit"
    )
    _assert_one_line_error(_cli("layers", path, "--trust-model"), "SystemExit")
    assert not (tmp_path / "out").exists()


class _Raises:
    def __reduce__(self):
        return (int, ("not a number",))


def test_trusted_pickle_that_raises_says_why(tmp_path):
    path = tmp_path / "raises.pt"
    torch.save(_Raises(), path)
    with pytest.raises(ModelLoadError, match="Cannot unpickle .*ValueError: invalid literal"):
        load_model(path, trust_model=True)


# --- 4. harmless globals of real checkpoints -----------------------------------------------------


def test_training_checkpoints_with_plain_data_load_without_trust(tmp_path, small_resnet):
    # What torchvision's and timm's reference scripts and common trainers put next to the weights.
    path = tmp_path / "checkpoint.pth"
    torch.save(
        {
            "model": small_resnet.state_dict(),
            "epoch": 3,
            "args": argparse.Namespace(model="resnet18", lr=0.1, output_dir=pathlib.Path("/runs/a")),
            "best_metric": np.float64(71.5),
            "step": np.int64(1200),
            "dtype": np.dtype("float32"),
            "history": np.array([0.5, 0.25], dtype=np.float32),
            "names": np.array(["a", "b"]),
            "saved_at": datetime.datetime(2024, 5, 1, 12, 0),
            "elapsed": datetime.timedelta(hours=2),
            "tags": frozenset({"final"}),
        },
        path,
    )
    loaded = load_model(path, arch="resnet18")
    assert loaded.loader == "state_dict" and loaded.module.fc.out_features == 5
    for key, value in small_resnet.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value)


def test_allow_list_is_scoped_to_our_load(tmp_path):
    import torch.serialization

    path = tmp_path / "args.pt"
    torch.save({"args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(ModelLoadError, match="No state_dict found"):  # unpickled: no code in it
        load_model(path, arch="resnet18")
    assert argparse.Namespace not in torch.serialization.get_safe_globals()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


# --- 5. memory: what a file says may not cost more than the file ---------------------------------


def _tiny_resnet_checkpoint(tmp_path, **extra):
    from attnexplain.default_plugins.torchvision import _build_resnet

    torch.manual_seed(0)
    model = _build_resnet(layers=[1, 1, 1, 1], num_classes=3)
    path = tmp_path / "tiny.pt"
    torch.save(
        {"arch": "ResNet", "arch_kwargs": {"layers": [1, 1, 1, 1]}, "state_dict": model.state_dict(), **extra}, path
    )
    return path, model


def test_arch_kwargs_that_build_a_huge_model_are_refused_quickly(tmp_path, photo):
    path, model = _tiny_resnet_checkpoint(tmp_path)
    assert load_model(path).module.fc.out_features == 3  # the honest file loads
    torch.save({"arch": "ResNet", "arch_kwargs": {"layers": [100000, 1, 1, 1]}, "state_dict": model.state_dict()}, path)
    with pytest.raises(ModelLoadError, match="far larger than the weights"):
        load_model(path)
    _assert_one_line_error(_cli("layers", path), "far larger than the weights")


def test_safetensors_arch_kwargs_with_huge_widths_are_refused(tmp_path, small_vit):
    from safetensors.torch import save_file

    path = tmp_path / "vit.safetensors"
    state = {k: v.contiguous() for k, v in small_vit.state_dict().items()}
    kwargs = {"image_size": 64, "patch_size": 8, "num_layers": 3, "num_heads": 4, "hidden_dim": 32, "mlp_dim": 64}
    save_file(state, str(path), metadata={"arch": "VisionTransformer", "arch_kwargs": json.dumps(kwargs)})
    assert load_model(path).module.hidden_dim == 32
    # 10¹⁰ parameters: stopped while registering them on the meta device.
    save_file(
        state,
        str(path),
        metadata={
            "arch": "VisionTransformer",
            "arch_kwargs": json.dumps({**kwargs, "hidden_dim": 100_000, "mlp_dim": 100_000, "num_heads": 1}),
        },
    )
    with pytest.raises(ModelLoadError, match="far larger than the weights"):
        load_model(path)
    # Within the budget, but not the file's shapes: refused before the real build.
    save_file(
        state, str(path), metadata={"arch": "VisionTransformer", "arch_kwargs": json.dumps({**kwargs, "mlp_dim": 96})}
    )
    with pytest.raises(ModelLoadError, match=r"size mismatch for encoder\.layers.*\[64, 32\].*\[96, 32\]"):
        load_model(path)


@pytest.mark.parametrize("size", [8192, [2048, 64], 1025])
def test_a_file_cannot_ask_for_a_huge_input(tmp_path, photo, size):
    path, _ = _tiny_resnet_checkpoint(tmp_path, preprocessing={"size": size})
    with pytest.raises(ModelLoadError, match="between 8 and 1024"):
        load_model(path)
    _assert_one_line_error(_cli("run", path, photo, "--out", tmp_path / "out"), "between 8 and 1024")


def test_the_user_may_still_ask_for_a_large_size(tmp_path):
    path, _ = _tiny_resnet_checkpoint(tmp_path, preprocessing={"size": 64, "resize": 72})
    loaded = load_model(path)
    assert loaded.preprocessing.size == (64, 64) and loaded.preprocessing.resize == 72
    bigger = loaded.preprocessing.with_overrides(size=2048)  # --size keeps its own bound
    assert bigger.size == (2048, 2048)


@pytest.mark.parametrize(
    "preprocessing,message",
    [
        ({"size": 64, "resize": 100000}, "resize must be an integer between 64 and 128"),
        ({"size": 64, "std": [0, 1, 1]}, "std values must be positive"),
        ({"size": 64, "mean": ["nan", 0, 0]}, "finite"),
        ({"size": 64, "interpolation": "lanczos"}, "interpolation"),
        ({"size": 64, "letterbox": "false"}, "letterbox must be true or false"),
        ({"size": "huge"}, "between 8 and 1024"),
    ],
)
def test_absurd_preprocessing_metadata_is_refused(tmp_path, preprocessing, message):
    path, _ = _tiny_resnet_checkpoint(tmp_path, preprocessing=preprocessing)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_exported_program_input_size_is_bounded_too(tmp_path):
    path = tmp_path / "wide.pt2"
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 8, 2048),)), str(path))
    with pytest.raises(ModelLoadError, match="between 8 and 1024"):
        load_model(path, trust_model=True)


# --- other absurd metadata -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"labels": [{"name": "cat"}, "dog", "cow"]}, "not a list of class names"),
        ({"labels": ["x"] * 100_001}, "at most 100,000"),
        ({"arch_kwargs": "layers=[1,1,1,1]"}, "'arch_kwargs' entry .* is not a mapping"),
        ({"arch_kwargs": [1, 2]}, "is not a mapping"),
        ({"arch_kwargs": {"layers": [1, 1, 1, 1], "weights_backbone": "DEFAULT"}}, "pretrained weights"),
        # The older names, which timm's and many plugins' builders still take (one would download).
        ({"arch_kwargs": {"pretrained": True}}, "pretrained weights"),
        ({"arch_kwargs": {"pretrained_backbone": True}}, "pretrained weights"),
        ({"arch": "os.system"}, "Unknown architecture 'os.system'"),
        ({"arch": ["resnet18"]}, "is not a name"),
    ],
)
def test_absurd_checkpoint_entries_are_one_line_errors(tmp_path, extra, message):
    path, _ = _tiny_resnet_checkpoint(tmp_path, **extra)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_numeric_labels_are_accepted_as_names(tmp_path):
    path, _ = _tiny_resnet_checkpoint(tmp_path, classes=[3, 7, 9])
    assert load_model(path).labels == ["3", "7", "9"]


def test_a_zip_bomb_is_refused_before_it_is_inflated(tmp_path):
    path = tmp_path / "bomb.pt"
    torch.save({"w": torch.zeros(4)}, path)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    prefix = next(iter(members)).split("/")[0]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr(f"{prefix}/data/99", bytes(64 * 1024 * 1024))  # 64 MB of zeros, ~64 kB
    assert path.stat().st_size < 1024 * 1024
    with pytest.raises(ModelLoadError, match="expands to 67,1.* bytes"):
        load_model(path, arch="resnet18")


def test_a_safetensors_file_that_is_a_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    torch.save({"x": _Touch(marker)}, path)
    with pytest.raises(ModelLoadError, match="Not a valid safetensors file"):
        load_model(path, trust_model=True)
    assert not marker.exists()


# --- not a regular file --------------------------------------------------------------------------


def test_a_fifo_as_model_or_labels_is_refused_without_hanging(tmp_path, photo, resnet_state_dict_file):
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    for command in (["run", str(fifo), str(photo), "--out", str(tmp_path / "out")], ["layers", str(fifo)]):
        done = subprocess.run([*ATTNEXPLAIN, *command], capture_output=True, text=True, timeout=120)
        assert done.returncode == 1
        assert done.stderr.strip().splitlines() == [f"Error: Model path {fifo} is a FIFO (named pipe), not a file."]
    done = subprocess.run(
        [*ATTNEXPLAIN, "layers", str(resnet_state_dict_file), "--arch", "resnet18", "--labels", str(fifo)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"Error: Labels file {fifo} is a FIFO (named pipe), not a file."]


def test_a_device_as_model_or_labels_is_refused(tmp_path, resnet_state_dict_file):
    link = tmp_path / "zero.pt"
    link.symlink_to("/dev/zero")
    with pytest.raises(ModelLoadError, match=f"Model path {link} is a device, not a file"):
        load_model(link)
    with pytest.raises(ModelLoadError, match=f"Labels file {link} is a device, not a file"):
        load_model(resnet_state_dict_file, arch="resnet18", labels=link)
    dangling = tmp_path / "gone.pt"
    dangling.symlink_to(tmp_path / "nowhere.pt")
    with pytest.raises(ModelLoadError, match="is a symbolic link to nothing"):
        load_model(dangling)


def test_a_huge_labels_file_is_refused(tmp_path, resnet_state_dict_file):
    labels = tmp_path / "labels.txt"
    labels.write_text("x\n" * 100_001)
    with pytest.raises(ModelLoadError, match="at most 100,000"):
        load_model(resnet_state_dict_file, arch="resnet18", labels=labels)


# --- 23/24. real torch.save round trips of torchvision state_dicts -------------------------------


def _round_trip(tmp_path, name: str, num_classes: int | None):
    torch.manual_seed(0)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    extra = {"weights_backbone": None} if name in _DETECTION + _SEGMENTATION else {}
    model = torchvision.models.get_model(name, **kwargs, **extra)
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)  # keeps torch's per-module versions (_metadata)
    loaded = load_model(path, arch=name)
    loaded_state = loaded.module.state_dict()
    assert loaded_state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded_state[key], value), key
    path.unlink()
    return loaded


_DETECTION = torchvision.models.list_models(module=torchvision.models.detection)
_SEGMENTATION = torchvision.models.list_models(module=torchvision.models.segmentation)


@pytest.mark.parametrize("name", ["mnasnet0_5", "mnasnet1_3", "regnet_x_400mf", "squeezenet1_1", "mobilenet_v3_small"])
def test_state_dict_round_trip_of_representative_builders(tmp_path, name):
    _round_trip(tmp_path, name, num_classes=7)


def test_mnasnet_state_dict_loads_from_the_cli(tmp_path):
    path = tmp_path / "mnasnet.pth"
    torch.save(torchvision.models.mnasnet0_5(num_classes=4).state_dict(), path)
    result = _cli("layers", path, "--arch", "mnasnet0_5", "--size", "64")
    assert result.exit_code == 0, result.output
    assert "layers" in result.output


@pytest.mark.parametrize(
    "name,head",
    [
        ("ssdlite320_mobilenet_v3_large", lambda m: m.head.classification_head.num_columns),
        ("lraspp_mobilenet_v3_large", lambda m: m.classifier.low_classifier.out_channels),
    ],
)
def test_detection_and_segmentation_heads_give_the_number_of_classes(tmp_path, name, head):
    loaded = _round_trip(tmp_path, name, num_classes=4)
    assert head(loaded.module) == 4


@pytest.mark.heavy
@pytest.mark.parametrize("name", sorted(torchvision.models.list_models()))
def test_state_dict_round_trip_of_every_builder(tmp_path, name):
    # A class count no builder has by default, so that every head's is read off the weights.
    kwargs = {"num_classes": 4, **({"weights_backbone": None} if name in _DETECTION + _SEGMENTATION else {})}
    try:
        try:  # on the meta device, where it builds there: only whether it takes a class count is asked
            with torch.device("meta"):
                torchvision.models.get_model(name, **kwargs)
        except (TypeError, ValueError):
            raise
        except Exception:  # a builder that computes with tensors while constructing
            torchvision.models.get_model(name, **kwargs)
        num_classes = 4
    except (TypeError, ValueError):  # builders without classes (optical flow)
        num_classes = None
    _round_trip(tmp_path, name, num_classes)
