"""Model loading: every way people save models, and the ways they go wrong."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from attnexplain.errors import ModelLoadError, UntrustedModelError
from attnexplain.loading import load_model


def _same_outputs(loaded, reference, size=64):
    torch.manual_seed(5)
    batch = torch.randn(2, 3, size, size)
    with torch.no_grad():
        return torch.allclose(loaded.module(batch), reference(batch), atol=1e-5)


def test_state_dict_with_arch_infers_the_number_of_classes(resnet_state_dict_file, small_resnet):
    loaded = load_model(resnet_state_dict_file, arch="resnet18")
    assert loaded.loader == "state_dict" and loaded.architecture == "resnet18"
    assert loaded.module.fc.out_features == 5
    assert loaded.plugin.name == "torchvision"
    assert _same_outputs(loaded, small_resnet)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd, "epoch": 7, "best_acc1": 0.5},
        lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},  # DataParallel
        lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},  # torch.compile
    ],
)
def test_wrapped_checkpoints_and_prefixes(tmp_path, small_resnet, wrap):
    path = tmp_path / "checkpoint.pth"
    torch.save(wrap(small_resnet.state_dict()), path)
    assert _same_outputs(load_model(path, arch="resnet18"), small_resnet)


def test_checkpoint_arch_key_needs_no_flag(tmp_path, small_resnet):
    # The layout of PyTorch's ImageNet example: {"arch": ..., "state_dict": ...}.
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"arch": "resnet18", "state_dict": small_resnet.state_dict(), "labels": list("abcde")}, path)
    loaded = load_model(path)
    assert loaded.architecture == "resnet18" and loaded.labels == list("abcde")


def test_state_dict_without_arch_says_how_to_name_it(resnet_state_dict_file):
    with pytest.raises(ModelLoadError, match="--arch"):
        load_model(resnet_state_dict_file)


def test_wrong_arch_is_reported_not_crashed(resnet_state_dict_file):
    with pytest.raises(ModelLoadError, match="do not fit resnet34"):
        load_model(resnet_state_dict_file, arch="resnet34")
    with pytest.raises(ModelLoadError, match="Did you mean resnet18"):
        load_model(resnet_state_dict_file, arch="resnet81")


def test_safetensors_with_metadata(tmp_path, small_resnet):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    state = {k: v.contiguous() for k, v in small_resnet.state_dict().items()}
    save_file(state, str(path), metadata={"arch": "resnet18", "labels": json.dumps(list("vwxyz"))})
    loaded = load_model(path)
    assert loaded.loader == "safetensors" and loaded.labels == list("vwxyz")
    assert _same_outputs(loaded, small_resnet)
    path2 = tmp_path / "plain.safetensors"
    save_file(state, str(path2))
    assert _same_outputs(load_model(path2, arch="resnet18"), small_resnet)


def test_whole_pickled_module_is_refused_unless_trusted(tmp_path, small_resnet):
    path = tmp_path / "whole.pt"
    torch.save(small_resnet, path)
    with pytest.raises(UntrustedModelError, match="--trust-model") as raised:
        load_model(path)
    assert "arbitrary code" in str(raised.value)
    loaded = load_model(path, trust_model=True)
    assert loaded.loader == "pickle" and _same_outputs(loaded, small_resnet)


class _Payload:
    """Unpickling this runs code that creates a file."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').close()",))


def test_malicious_pickle_never_runs(tmp_path):
    evidence = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload(evidence)}, path)
    with pytest.raises(UntrustedModelError):
        load_model(path)
    assert not evidence.exists()


def test_torchscript_loads_and_says_what_it_cannot_do(tmp_path, small_resnet):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(small_resnet), str(path))
    with pytest.raises(UntrustedModelError, match="TorchScript program"):
        load_model(path)  # TorchScript is code: see test_hostile_models
    loaded = load_model(path, trust_model=True)
    assert loaded.loader == "torchscript" and not loaded.inner_layers
    assert any("saliency" in note for note in loaded.notes)
    assert _same_outputs(loaded, small_resnet)


def test_torch_export_program_loads_at_its_input_size(tmp_path, small_resnet):
    path = tmp_path / "exported.pt2"
    torch.export.save(torch.export.export(small_resnet, (torch.randn(1, 3, 64, 64),)), str(path))
    with pytest.raises(UntrustedModelError, match="torch.export program"):
        load_model(path)  # torch.export.load unpickles: see test_hostile_models
    loaded = load_model(path, trust_model=True)
    assert loaded.loader == "export" and loaded.preprocessing.size == (64, 64)
    assert loaded.inner_layers  # unflattened: layers can be hooked
    with torch.no_grad():
        batch = torch.randn(1, 3, 64, 64)
        assert torch.allclose(loaded.module(batch), small_resnet(batch), atol=1e-5)


def _cache_weights(builder: str, weights_name: str, torch_home):
    weights = torchvision.models.get_model_weights(builder)[weights_name]
    torch.manual_seed(3)
    model = torchvision.models.get_model(builder, num_classes=len(weights.meta["categories"]))
    target = torch_home / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), target)
    return model, target


def test_torchvision_weights_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model, _ = _cache_weights("mobilenet_v3_small", "IMAGENET1K_V1", tmp_path)
    loaded = load_model("torchvision:mobilenet_v3_small:IMAGENET1K_V1")
    assert loaded.loader == "torchvision" and loaded.weights == "MobileNet_V3_Small_Weights.IMAGENET1K_V1"
    assert len(loaded.labels) == 1000 and loaded.labels[0] == "tench"
    assert loaded.preprocessing.size == (224, 224) and loaded.preprocessing.resize == 256
    assert _same_outputs(loaded, model.eval(), size=96)
    # DEFAULT resolves through the weights enum to the same file.
    assert load_model("torchvision:mobilenet_v3_small:DEFAULT").weights.endswith("IMAGENET1K_V1")


def test_torchvision_weights_missing_offline_name_the_file_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError) as raised:
        load_model("torchvision:resnet50:IMAGENET1K_V2")
    message = str(raised.value)
    assert "resnet50-11ad3fa6.pth" in message
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in message


def test_torchvision_bad_names(tmp_path):
    with pytest.raises(ModelLoadError, match="no model named 'resnet5'"):
        load_model("torchvision:resnet5:DEFAULT")
    with pytest.raises(ModelLoadError, match="available: IMAGENET1K_V1"):
        load_model("torchvision:resnet18:BEST")


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "empty"),
        (b"definitely not a model", "Not a PyTorch model file"),
    ],
)
def test_bad_model_files(tmp_path, content, message):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_missing_model_file():
    with pytest.raises(ModelLoadError, match="Model file not found: nowhere/model.pt"):
        load_model("nowhere/model.pt")


def test_labels_file_is_read(tmp_path, resnet_state_dict_file):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\nd\ne\n")
    assert load_model(resnet_state_dict_file, arch="resnet18", labels=labels).labels == list("abcde")


def test_weights_are_the_files_and_half_precision_files_load_as_float32(tmp_path, small_resnet):
    state = small_resnet.state_dict()
    torch.save(state, tmp_path / "full.pt")
    torch.save(
        {key: value.half() if value.is_floating_point() else value for key, value in state.items()},
        tmp_path / "half.pt",
    )
    full = load_model(tmp_path / "full.pt", arch="resnet18").module.state_dict()
    assert all(torch.equal(full[key], value) for key, value in state.items())
    half = load_model(tmp_path / "half.pt", arch="resnet18").module.state_dict()
    assert all(half[key].dtype == value.dtype for key, value in state.items())
    assert all(
        torch.equal(half[key], value.half().to(value.dtype) if value.is_floating_point() else value)
        for key, value in state.items()
    )


def test_loading_leaves_random_initialisation_to_everyone_else(resnet_state_dict_file):
    initialisers = {name: getattr(torch.nn.init, name) for name in dir(torch.nn.init)}
    load_model(resnet_state_dict_file, arch="resnet18")
    assert {name: getattr(torch.nn.init, name) for name in dir(torch.nn.init)} == initialisers
    assert float(torchvision.models.resnet18(num_classes=5).conv1.weight.detach().std()) > 0.01
