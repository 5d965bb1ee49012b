"""The transformers plugin: folders written by save_pretrained (tiny random-init configs, nothing
downloaded), checked against transformers itself (output_attentions, the image processor), a
rollout written out here, and pytorch-grad-cam."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnexplain_transformers.plugin import plugin  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from PIL import Image  # noqa: E402

from attnexplain import explain  # noqa: E402
from attnexplain.capture import attention_gradients  # noqa: E402
from attnexplain.cli import main  # noqa: E402
from attnexplain.errors import MethodError, ModelLoadError, UntrustedModelError  # noqa: E402
from attnexplain.methods.attention import gradient_rollout, rollout  # noqa: E402
from attnexplain.plugins import discover_plugins, select_plugin  # noqa: E402
from attnexplain.preprocess import prepare  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
IMAGE = REPO / "samples" / "images" / "cat-on-grass.png"
LABELS = {0: "tabby", 1: "rocket", 2: "mug"}
VIT_LIKE = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
    num_labels=3,
    id2label=LABELS,
    label2id={v: k for k, v in LABELS.items()},
)


def _config(family: str):
    t = transformers
    if family == "vit":
        return t.ViTConfig(intermediate_size=64, **VIT_LIKE), t.ViTForImageClassification
    if family == "deit":
        return t.DeiTConfig(intermediate_size=64, **VIT_LIKE), t.DeiTForImageClassificationWithTeacher
    if family == "beit":
        return (
            t.BeitConfig(intermediate_size=64, use_relative_position_bias=True, **VIT_LIKE),
            t.BeitForImageClassification,
        )
    if family == "dinov2":
        return t.Dinov2Config(mlp_ratio=2, **VIT_LIKE), t.Dinov2ForImageClassification
    if family == "dinov2_registers":
        return (
            t.Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=4, **VIT_LIKE),
            t.Dinov2WithRegistersForImageClassification,
        )
    if family == "clip":
        vision = dict(VIT_LIKE, intermediate_size=64)
        for key in ("num_labels", "id2label", "label2id"):
            vision.pop(key)
        return (
            t.CLIPConfig(
                vision_config=vision,
                num_labels=3,
                id2label=LABELS,
                text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
            ),
            t.CLIPForImageClassification,
        )
    small = dict(num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    if family in ("swin", "swinv2"):
        config = t.SwinConfig if family == "swin" else t.Swinv2Config
        model = t.SwinForImageClassification if family == "swin" else t.Swinv2ForImageClassification
        return config(
            image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4, **small
        ), model
    if family in ("convnext", "convnextv2"):
        config = t.ConvNextConfig if family == "convnext" else t.ConvNextV2Config
        model = t.ConvNextForImageClassification if family == "convnext" else t.ConvNextV2ForImageClassification
        return config(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32, **small), model
    if family == "resnet":
        return (
            t.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], **small),
            t.ResNetForImageClassification,
        )
    raise AssertionError(family)


GLOBAL = ["vit", "deit", "beit", "dinov2", "dinov2_registers", "clip"]
ALL = GLOBAL + ["swin", "swinv2", "convnext", "convnextv2", "resnet"]
PREFIX = {"vit": 1, "deit": 2, "beit": 1, "dinov2": 1, "dinov2_registers": 5, "clip": 1}


def _build(family: str, seed: int = 0):
    config, model_class = _config(family)
    torch.manual_seed(seed)
    return model_class(config).eval()


def _saved(family: str, folder: Path, processor=None) -> Path:
    model = _build(family)
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family → (folder written by save_pretrained, the model that wrote it)."""
    root = tmp_path_factory.mktemp("hf")
    built = {}
    for family in ALL:
        model = _build(family)
        model.save_pretrained(root / family)
        built[family] = (root / family, model)
    return built


def _pearson(a, b) -> float:
    return float(np.corrcoef(np.asarray(a).ravel(), np.asarray(b).ravel())[0, 1])


def _pixels(seed: int, height: int, width: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, height, width, generator=generator)


# --- discovery ----------------------------------------------------------------------------------


def test_discovered_cheaply_through_its_entry_point():
    import subprocess
    import sys

    infos = {info.name: info for info in discover_plugins()}
    assert infos["transformers"].error is None and infos["transformers"].distribution == "attnexplain-transformers"
    code = (
        "import sys, attnexplain_transformers, attnexplain_transformers.plugin;"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    )


def test_selected_for_transformers_models_only(folders):
    assert select_plugin(folders["vit"][1]).name == "transformers"
    assert plugin.specificity(torch.nn.Linear(2, 2)) is None


# --- loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ALL)
def test_loads_a_save_pretrained_folder(family, folders):
    folder, original = folders[family]
    assert plugin.claims_path(folder)
    named = plugin.load_path(folder)
    assert named.random_weights is False and named.labels == ["tabby", "rocket", "mug"]
    assert plugin.labels(named.module) == named.labels
    x = _pixels(1, 32, 32)
    with torch.no_grad():
        assert torch.equal(named.module(x).logits, original(x).logits)
    assert named.preprocessing is not None and named.preprocessing.size[0] >= 8


def test_claims_only_folders_save_pretrained_writes(tmp_path, folders):
    assert not plugin.claims_path(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "vit"}')
    assert not plugin.claims_path(tmp_path)  # no weights file
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert plugin.claims_path(tmp_path)
    (tmp_path / "config.json").write_text('{"architecture": "resnet50", "num_classes": 3}')
    assert not plugin.claims_path(tmp_path)  # timm's hub folder: another plugin's
    (tmp_path / "config.json").write_text('{"model_type": ')
    assert plugin.claims_path(tmp_path)  # broken: claimed, so that load_path says why
    assert not plugin.claims_path(folders["vit"][0] / "config.json")  # a file, not a folder


def test_placeholder_labels_are_no_labels():
    config = transformers.ViTConfig(
        intermediate_size=64, **{k: v for k, v in VIT_LIKE.items() if k not in ("id2label", "label2id")}
    )
    assert plugin.labels(transformers.ViTForImageClassification(config)) is None  # LABEL_0 ...


def _copy(folder: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(folder, target)
    return target


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "change,error,text",
    [
        (
            dict(auto_map={"AutoModelForImageClassification": "evil.EvilModel"}),
            UntrustedModelError,
            "custom modelling code",
        ),
        (dict(trust_remote_code=True), UntrustedModelError, "custom modelling code"),
        (dict(hidden_size=8 * 1024), ModelLoadError, "parameters but the weights hold"),
        (dict(hidden_size=10**9), ModelLoadError, "no vision model's configuration"),
        (dict(image_size=100000), ModelLoadError, "image_size"),
        (dict(model_type=["vit"]), ModelLoadError, "no model_type string"),
        (dict(architectures=["ViTModel"]), ModelLoadError, "not an image classifier"),
        (dict(id2label=[1, 2]), ModelLoadError, "id2label must map"),
    ],
)
def test_hostile_configs_are_refused_in_one_line(change, error, text, folders, tmp_path):
    folder = _copy(folders["vit"][0], tmp_path / "hostile")
    _edit_config(folder, **change)
    with pytest.raises(error, match=text) as raised:
        plugin.load_path(folder)
    assert "\n" not in str(raised.value)


def test_hostile_files_are_refused(folders, tmp_path):
    folder = _copy(folders["vit"][0], tmp_path / "huge")
    (folder / "config.json").write_bytes(b" " * (5 * 1024 * 1024) + b"{}")
    with pytest.raises(ModelLoadError, match="far smaller"):
        plugin.load_path(folder)
    folder = _copy(folders["vit"][0], tmp_path / "list")
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="not an object"):
        plugin.load_path(folder)
    # 990 levels that json parses exhausted the stack of the (recursive) checks after it: RecursionError.
    folder = _copy(folders["vit"][0], tmp_path / "nested")
    _edit_config(folder, anything=json.loads("[" * 100 + "]" * 100))
    with pytest.raises(ModelLoadError, match="nests values over 32 levels deep"):
        plugin.load_path(folder)
    folder = _copy(folders["vit"][0], tmp_path / "broken-header")
    (folder / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(ModelLoadError, match="not a safetensors file"):
        plugin.load_path(folder)
    folder = _copy(folders["vit"][0], tmp_path / "sharded")
    (folder / "model.safetensors").rename(tmp_path / "outside.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"classifier.weight": "../outside.safetensors"}})
    )
    assert plugin.claims_path(folder)
    with pytest.raises(ModelLoadError, match="not a file in the folder"):
        plugin.load_path(folder)


def test_pickled_weights_need_trust(folders, tmp_path):
    folder = _copy(folders["vit"][0], tmp_path / "pickled")
    model = plugin.load_path(folder).module
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    assert plugin.claims_path(folder)
    with pytest.raises(UntrustedModelError, match="pytorch_model.bin, a pickle") as raised:
        plugin.load_path(folder)
    assert "\n" not in str(raised.value)
    trusted = plugin.load_path(folder, trust_model=True).module
    x = _pixels(2, 32, 32)
    with torch.no_grad():
        assert torch.equal(trusted(x).logits, model(x).logits)


def test_hf_names_load_from_the_local_cache_only(folders, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(ModelLoadError, match=f"not in the local Hugging Face cache \\({cache}\\)"):
        plugin.load_named("tiny-org/tiny-vit", None)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--tiny-org--tiny-vit"
    _copy(folders["vit"][0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    named = plugin.load_named(*plugin.split_spec("tiny-org/tiny-vit"))
    assert named.labels == ["tabby", "rocket", "mug"] and named.random_weights is False
    # The whole rest is the name: a Windows-style path keeps its second ":"; a folder loads.
    assert plugin.split_spec(r"C:\models\x") == (r"C:\models\x", None)
    assert plugin.load_named(str(folders["deit"][0]), None).architecture == "DeiTForImageClassificationWithTeacher"
    with pytest.raises(ModelLoadError, match="without what save_pretrained writes"):
        plugin.load_named(str(tmp_path), None)
    with pytest.raises(ModelLoadError, match="neither a folder nor"):
        plugin.load_named("../no/such/../repo", None)


# --- a tampered cache, config.json sizes and code-selecting keys (issue 23) -------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache(tmp_path, monkeypatch) -> Path:
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def _cached_repo(cache: Path, folders, ref: str | None = COMMIT) -> Path:
    """models--tiny-org--tiny-vit laid out as huggingface_hub writes it: the snapshot's files are
    links into blobs/."""
    repo = cache / "models--tiny-org--tiny-vit"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for number, source in enumerate(sorted(folders["vit"][0].iterdir())):
        blob = repo / "blobs" / f"blob{number}"
        blob.write_bytes(source.read_bytes())
        (snapshot / source.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir()
    if ref is not None:
        (repo / "refs" / "main").write_text(ref)
    return repo


def test_hf_names_load_from_a_cache_laid_out_as_huggingface_hub_writes_it(folders, tmp_path, monkeypatch):
    _cached_repo(_cache(tmp_path, monkeypatch), folders)
    named = plugin.load_named("tiny-org/tiny-vit", None)
    x = _pixels(3, 32, 32)
    with torch.no_grad():
        assert torch.equal(named.module(x).logits, folders["vit"][1](x).logits)


def _outside_model(folders, tmp_path) -> Path:
    """A loadable model outside the cache, where a tampered ref or link would take the load."""
    return _copy(folders["deit"][0], tmp_path / "x")


@pytest.mark.parametrize(
    "tamper,text",
    [
        ("fifo", "is a FIFO"),
        ("dev-zero", "is a device"),
        ("climbs-out", "does not hold a commit hash"),
        ("huge", "does not hold a commit hash"),
        ("snapshot-link-out", "lies outside"),
        ("file-link-out", "links outside"),
    ],
)
def test_a_tampered_cache_ref_is_refused_in_one_line(tamper, text, folders, tmp_path, monkeypatch):
    """refs/main is read as an untrusted file (a FIFO would block, /dev/zero never end) and the
    snapshot it names, and every file in it, must lie in the repository's cache folder."""
    import os
    import shutil
    import time

    repo = _cached_repo(_cache(tmp_path, monkeypatch), folders)
    outside = _outside_model(folders, tmp_path)
    ref = repo / "refs" / "main"
    ref.unlink()
    if tamper == "fifo":
        os.mkfifo(ref)
    elif tamper == "dev-zero":
        ref.symlink_to("/dev/zero")
    elif tamper == "climbs-out":
        ref.write_text("../../../x")  # hub/models--tiny-org--tiny-vit/snapshots/../../../x is tmp/x
    elif tamper == "huge":
        ref.write_text(COMMIT * 100_000)
    else:
        ref.write_text(COMMIT)
        snapshot = repo / "snapshots" / COMMIT
        if tamper == "snapshot-link-out":
            shutil.rmtree(snapshot)
            snapshot.symlink_to(outside, target_is_directory=True)
        else:
            (snapshot / "model.safetensors").unlink()
            (snapshot / "model.safetensors").symlink_to(outside / "model.safetensors")
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=text) as raised:
        plugin.load_named("tiny-org/tiny-vit", None)
    assert time.monotonic() - started < 10
    assert "\n" not in str(raised.value) and "damaged or tampered" in str(raised.value)


def test_a_cache_ref_to_a_missing_snapshot_says_so(folders, tmp_path, monkeypatch):
    repo = _cached_repo(_cache(tmp_path, monkeypatch), folders, ref="f" * 40)
    with pytest.raises(ModelLoadError, match=f"names commit {'f' * 40}, whose snapshot is not in the local cache"):
        plugin.load_named("tiny-org/tiny-vit", None)
    assert (repo / "snapshots" / COMMIT).is_dir()


FIELD_LIMITS = [  # (field, the limit, a value a real model has beside it)
    ("num_hidden_layers", 128, 48),
    ("hidden_size", 16384, 6144),
    ("intermediate_size", 65536, 24576),
    ("num_attention_heads", 256, 48),
    ("patch_size", 1024, 14),
    ("window_size", 64, 24),
    ("num_register_tokens", 256, 4),
    ("embed_dim", 16384, 512),
]


@pytest.mark.parametrize("field,limit,real", FIELD_LIMITS)
@pytest.mark.parametrize("nested", [False, True])
def test_config_sizes_are_bounded_at_a_limit_no_real_model_reaches(field, limit, real, nested):
    from attnexplain_transformers.folder import check_model_size

    def config(value):
        # Few layers of width 8, so that only the field under test can be over its limit.
        holder = {"num_hidden_layers": 2, "hidden_size": 8, "intermediate_size": 8, "image_size": 1024, field: value}
        return {"model_type": "clip", "vision_config": holder} if nested else dict(holder, model_type="vit")

    check_model_size(config(real), "config.json")
    check_model_size(config(limit), "config.json")  # at the limit: accepted
    name = f"vision_config.{field}" if nested else field
    with pytest.raises(ModelLoadError, match=f"asks for {name} = {limit + 1};.*from . to {limit:,}"):
        check_model_size(config(limit + 1), "config.json")
    with pytest.raises(ModelLoadError, match=f"asks for {name} = '8'"):
        check_model_size(config("8"), "config.json")


def test_config_sizes_bound_blocks_stages_grid_and_their_product():
    from attnexplain_transformers.folder import check_model_size

    swin = {
        "model_type": "swin",
        "image_size": 640,
        "patch_size": 4,
        "embed_dim": 512,
        "depths": [2, 2, 42, 4],
        "num_heads": [16, 32, 64, 128],
        "window_size": 40,
    }
    check_model_size(swin, "config.json")  # SwinV2-G's size
    for change, field in [
        (dict(depths=[2, 2, 122, 4]), "depths"),
        (dict(num_heads=[16, 32, 64, 257]), "num_heads"),
        (dict(image_size=[1024, 1024], patch_size=[4, 3]), "patch_size"),
        (dict(hidden_sizes=[96, 10**5]), "hidden_sizes"),
    ]:
        with pytest.raises(ModelLoadError, match=f"asks for {field} = "):
            check_model_size(dict(swin, **change), "config.json")
    vit_22b = {"model_type": "vit", "num_hidden_layers": 48, "hidden_size": 6144, "intermediate_size": 24576}
    check_model_size(vit_22b, "config.json")
    with pytest.raises(ModelLoadError, match="about 1.2e\\+11 parameters"):
        check_model_size(dict(vit_22b, num_hidden_layers=128, intermediate_size=65536), "config.json")
    for ratio in (17, float("inf"), float("nan"), True):
        with pytest.raises(ModelLoadError, match="mlp_ratio"):
            check_model_size({"model_type": "dinov2", "mlp_ratio": ratio}, "config.json")


def test_a_config_of_thousands_of_layers_is_refused_before_building(folders, tmp_path):
    """2,000 layers took 105 s and +330 MB to build on the meta device before the parameter check."""
    import time

    folder = _copy(folders["vit"][0], tmp_path / "deep")
    _edit_config(folder, num_hidden_layers=2000)
    started = time.monotonic()
    with pytest.raises(
        ModelLoadError, match="num_hidden_layers = 2000; a model file may ask for whole numbers from 1 to 128"
    ):
        plugin.load_path(folder)
    assert time.monotonic() - started < 5
    _edit_config(folder, num_hidden_layers=128)  # at the limit: built, then found not to be the weights'
    with pytest.raises(ModelLoadError, match="parameters but the weights hold"):
        plugin.load_path(folder)


def test_a_safetensors_header_may_not_promise_more_than_the_file_holds(folders, tmp_path):
    import struct

    folder = _copy(folders["vit"][0], tmp_path / "forged")
    header = json.dumps({"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    _edit_config(folder, hidden_size=8192)  # a config the forged header would vouch for
    with pytest.raises(ModelLoadError, match="describes 1,000,000,000,000 numbers but the file holds 16 bytes"):
        plugin.load_path(folder)


def _record_kernel_imports(monkeypatch) -> list:
    """transformers' one way to a Hub kernel for attention, recorded instead of run."""
    import transformers.modeling_utils

    asked = []

    def record(implementation, *args, **kwargs):
        asked.append(implementation)
        raise ImportError("a test records this call instead of importing a kernel")

    monkeypatch.setattr(transformers.modeling_utils, "lazy_import_flash_attention", record)
    return asked


@pytest.mark.parametrize("family,where", [("vit", ()), ("clip", ()), ("clip", ("vision_config",))])
def test_the_folder_never_chooses_the_attention_implementation(family, where, folders, tmp_path, monkeypatch):
    """ "kernels-community/flash-attn3" in config.json made transformers fetch and import a Hub
    kernel while loading; attnexplain loads with transformers' default and says it ignored the key
    (also in a sub-configuration, which transformers 5.24 happens to override today)."""
    key = "attn_implementation"
    import sys

    asked = _record_kernel_imports(monkeypatch)
    folder = _copy(folders[family][0], tmp_path / "kernel")
    config = json.loads((folder / "config.json").read_text())
    holder = config
    for name in where:
        holder = holder[name]
    holder[key] = "kernels-community/flash-attn3"
    (folder / "config.json").write_text(json.dumps(config))
    named = plugin.load_path(folder)
    assert asked == [] and "kernels" not in sys.modules
    assert named.module.config._attn_implementation == "sdpa"
    assert _vision_implementation(named.module) == "sdpa"
    assert any(f"{'.'.join(where + (key,))} ignored" in note for note in named.notes), named.notes
    x = _pixels(4, 32, 32)
    with torch.no_grad():
        assert torch.equal(named.module(x).logits, folders[family][1](x).logits)
    result = explain(named.module, IMAGE, "rollout")  # recording switches to eager and back
    assert result.heatmap.std() > 0 and named.module.config._attn_implementation == "sdpa"


def _vision_implementation(model) -> str:
    vision = getattr(model.config, "vision_config", None) or model.config
    return vision._attn_implementation


@pytest.mark.parametrize("where", [(), ("text_config",)])
def test_a_quantized_config_is_refused_before_any_quantizer(where, folders, tmp_path, monkeypatch):
    from transformers.quantizers import auto

    asked = []
    monkeypatch.setattr(
        auto.AutoHfQuantizer, "from_config", classmethod(lambda cls, *args, **kwargs: asked.append(args) or None)
    )
    folder = _copy(folders["clip"][0], tmp_path / "quantized")
    config = json.loads((folder / "config.json").read_text())
    holder = config[where[0]] if where else config
    holder["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    name = ".".join(where + ("quantization_config",))
    with pytest.raises(ModelLoadError, match=f"holds {name}: a quantized model") as raised:
        plugin.load_path(folder)
    assert asked == [] and "\n" not in str(raised.value)


def test_config_json_names_no_other_config_or_weights_file(folders, tmp_path):
    """configuration_files made transformers read another config file than the one checked, and
    transformers_weights another weights file than the one whose header was counted."""
    folder = _copy(folders["vit"][0], tmp_path / "elsewhere")
    other = json.loads((folder / "config.json").read_text())
    other["id2label"] = {"0": "other", "1": "labels", "2": "here"}
    (folder / "config.4.0.0.json").write_text(json.dumps(other))
    _build("vit", seed=7).save_pretrained(tmp_path / "seven")
    (tmp_path / "seven" / "model.safetensors").rename(folder / "other.safetensors")
    _edit_config(folder, configuration_files=["config.4.0.0.json"], transformers_weights="other.safetensors")
    named = plugin.load_path(folder)
    assert named.labels == ["tabby", "rocket", "mug"]
    x = _pixels(5, 32, 32)
    with torch.no_grad():
        assert torch.equal(named.module(x).logits, folders["vit"][1](x).logits)
    assert any("configuration_files, transformers_weights ignored" in note for note in named.notes)


def test_a_folder_may_not_ask_for_a_million_attention_tokens(tmp_path):
    """A ViT of patch 2 with a processor at 1024 pixels made 262,144 tokens attending to each other
    (terabytes for one attention matrix); at 64 pixels it is an ordinary model."""
    config = transformers.ViTConfig(**dict(VIT_LIKE, patch_size=2), intermediate_size=64)
    folder = tmp_path / "patch2"
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    assert plugin.load_path(folder).preprocessing.size == (64, 64)  # 1,024 tokens
    transformers.ViTImageProcessor(size={"height": 1024, "width": 1024}).save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="1024×1024 input in patches of 2 makes 262,144 tokens"):
        plugin.load_path(folder)


def test_timm_wrapper_model_args_never_reach_timm(tmp_path, monkeypatch):
    """A timm_wrapper config's model_args went to timm.create_model as they were: a checkpoint_path
    anywhere (a FIFO blocked for ever), or a size no check here sees."""
    pytest.importorskip("timm")
    import os

    import timm.models._factory

    read = []
    monkeypatch.setattr(timm.models._factory, "load_checkpoint", lambda model, path, *a, **k: read.append(path))
    config = transformers.TimmWrapperConfig(
        architecture="test_resnet", num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}
    )
    folder = tmp_path / "timm-wrapper"
    transformers.TimmWrapperForImageClassification(config).save_pretrained(folder)
    assert plugin.load_path(folder).labels == ["tabby", "rocket", "mug"]  # without model_args: loads
    os.mkfifo(tmp_path / "fifo")
    _edit_config(folder, model_args={"checkpoint_path": str(tmp_path / "fifo")})
    with pytest.raises(ModelLoadError, match="holds model_args .*checkpoint_path.* refused"):
        plugin.load_path(folder)
    assert read == []


def test_a_stray_vision_config_does_not_hide_the_image_size(folders, tmp_path):
    """A ViT's config.json carrying a vision_config dict gave "Input image size (224*224) doesn't
    match model (32*32)": the size is read where the model's class keeps it."""
    folder = _copy(folders["vit"][0], tmp_path / "stray")
    _edit_config(folder, vision_config={"image_size": 224, "patch_size": 16})
    named = plugin.load_path(folder)
    assert named.preprocessing.size == (32, 32)
    assert plugin.token_grid(named.module, (32, 32)).height == 4
    result = explain(named.module, IMAGE, "rollout")
    assert result.heatmap.std() > 0


# --- preprocessing: the image processor itself is the reference ------------------------------------


def _photos() -> dict[str, np.ndarray]:
    from skimage import data

    astronaut = data.astronaut()
    return {
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "rocket": data.rocket(),
        "astronaut": astronaut,
        "tall": np.ascontiguousarray(astronaut[:, 150:330]),
    }


def _processors():
    t = transformers
    return {
        "vit": t.ViTImageProcessor(size={"height": 64, "width": 48}),
        "deit": t.DeiTImageProcessor(),  # 256×256 stretched, then 224 cropped; bicubic
        "beit": t.BeitImageProcessor(),
        "bit (dinov2)": t.BitImageProcessor(),  # shortest edge 256, crop 224
        "convnext crop_pct": t.ConvNextImageProcessor(size={"shortest_edge": 224}),
        "convnext 384": t.ConvNextImageProcessor(),  # stretched to 384²
        "clip": t.CLIPImageProcessor(),
        "rescale 1/127.5": t.ViTImageProcessor(
            rescale_factor=1 / 127.5, image_mean=[1, 1, 1], image_std=[1, 1, 1], resample=3
        ),
    }


@pytest.mark.parametrize("name", list(_processors()))
def test_preprocessing_reproduces_the_image_processor(name, tmp_path):
    """Same resize (torchvision's antialiased, as transformers' default backend), crop, rescale and
    normalisation: equal to 1e-5 (the float rounding of normalising in another order)."""
    _saved("vit", tmp_path, _processors()[name])
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    preprocessing = plugin.load_path(tmp_path).preprocessing
    for photo_name, pixels in _photos().items():
        expected = processor(images=Image.fromarray(pixels), return_tensors="pt").pixel_values
        got = prepare(pixels, preprocessing).tensor
        assert got.shape == expected.shape, (photo_name, preprocessing)
        assert torch.allclose(got, expected, atol=1e-5, rtol=0), (photo_name, (got - expected).abs().max())


def test_without_a_preprocessor_config_the_family_default_applies(folders):
    vit = plugin.load_path(folders["vit"][0]).preprocessing
    assert vit.size == (32, 32) and vit.mean == (0.5, 0.5, 0.5) and "ViTImageProcessor defaults" in vit.source
    convnext = plugin.load_path(folders["convnext"][0]).preprocessing
    assert convnext.interpolation == "bicubic" and convnext.size == (32, 32)


def test_a_hostile_preprocessor_config_is_refused(folders, tmp_path):
    folder = _copy(folders["vit"][0], tmp_path / "hostile")
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"height": "224"}}))
    with pytest.raises(ModelLoadError, match="preprocessor_config.json"):
        plugin.load_path(folder)


@pytest.mark.parametrize("crop_pct", [1e-9, 0.2])
def test_a_tiny_crop_pct_cannot_ask_for_a_huge_resize(crop_pct, folders, tmp_path):
    """ConvNeXt's processor resizes the shorter side to shortest_edge / crop_pct: 1e-9 asked for
    224·10⁹ pixels."""
    folder = _copy(folders["convnext"][0], tmp_path / "crop")
    transformers.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=crop_pct).save_pretrained(folder)
    with pytest.raises(ModelLoadError, match=f"crop_pct must be in \\[0.219, 1\\].*got {crop_pct}"):
        plugin.load_path(folder)
    transformers.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875).save_pretrained(folder)
    assert plugin.load_path(folder).preprocessing.resize == 256


# --- attention ----------------------------------------------------------------------------------


def reference_rollout(attentions, prefix: int, grid: tuple[int, int]) -> np.ndarray:
    """Abnar & Zuidema in NumPy: heads averaged, 0.5·A + 0.5·I row-normalised, chained; class row."""
    joint = None
    for attention in attentions:
        fused = attention.detach().double().numpy().mean(axis=1)
        mixed = 0.5 * fused + 0.5 * np.eye(fused.shape[-1])
        mixed /= mixed.sum(axis=-1, keepdims=True)
        joint = mixed if joint is None else mixed @ joint
    return joint[:, 0, prefix:].reshape(-1, *grid)


def _transformers_attentions(model, x, **kwargs):
    """transformers' own output_attentions, under its eager implementation (SDPA forms none)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        return model(x, output_attentions=True, **kwargs)
    finally:
        model.set_attn_implementation(previous)


@pytest.mark.parametrize("family", GLOBAL)
def test_recorded_attention_is_transformers_own_and_leaves_outputs_unchanged(family, folders):
    model = folders[family][1]
    size = (32, 48)  # not the config's 32×32: position embeddings are interpolated
    x = _pixels(3, *size)
    kwargs = plugin.forward_kwargs(model, size)
    if family not in ("dinov2", "dinov2_registers"):  # DINOv2 always interpolates
        assert kwargs == {"interpolate_pos_encoding": True}
    assert plugin.forward_kwargs(model, (32, 32)) == {}
    names = plugin.attention_modules(model)
    assert len(names) == 2
    before = model.config._attn_implementation
    with torch.no_grad():
        plain = model(x, **kwargs).logits
        captured = {}
        with plugin.recording(model), plugin.capture_attention(model, names, captured):
            recorded = model(x, **kwargs).logits
        reference = _transformers_attentions(model, x, **kwargs)
    assert model.config._attn_implementation == before == "sdpa"
    assert torch.allclose(recorded, plain, atol=1e-5)
    grid = plugin.token_grid(model, size)
    assert (grid.prefix_tokens, grid.height, grid.width) == (PREFIX[family], 4, 6)
    for name, expected in zip(names, reference.attentions):
        assert torch.allclose(captured[name], expected, atol=1e-6)
        assert captured[name].shape[-1] == PREFIX[family] + 24
    ours = rollout([captured[name] for name in names], grid)
    assert _pearson(ours, reference_rollout(reference.attentions, PREFIX[family], (4, 6))) >= 0.999


@pytest.mark.parametrize("family", ["vit", "deit", "dinov2_registers"])
def test_chefer_differentiates_the_models_own_probabilities(family, folders):
    model = folders[family][1]
    x = _pixels(4, 32, 32)
    names = plugin.attention_modules(model)
    captured = {}
    with plugin.recording(model), plugin.capture_attention(model, names, captured):
        logits = model(x.requires_grad_(True)).logits
    attentions = [captured[name] for name in names]
    ours = gradient_rollout(
        attentions, attention_gradients(logits[0, 1], attentions), plugin.token_grid(model, (32, 32))
    )
    # The reference: transformers' own attentions and autograd through them.
    reference = _transformers_attentions(model, x.detach().requires_grad_(True))
    gradients = torch.autograd.grad(reference.logits[0, 1], reference.attentions)
    relevance = torch.eye(reference.attentions[0].shape[-1], dtype=torch.float64)[None]
    for attention, gradient in zip(reference.attentions, gradients):
        weighted = torch.relu(gradient * attention).mean(dim=1).double()
        relevance = relevance + weighted @ relevance
    expected = relevance[0, 0, PREFIX[family] :].reshape(4, 4)
    assert _pearson(ours[0].detach(), expected.detach()) >= 0.999


@pytest.mark.parametrize("family", ["vit", "deit", "clip"])
def test_legrad_matches_the_authors_formula(family, folders):
    """Bousselham et al. 2024 by hand from transformers' own hidden states and attentions: per block
    l, the model's head (final norm, classifier) on the mean of the block's output tokens gives sˡ;
    relu(∂sˡ/∂Aˡ) averaged over heads and queries, patch keys only; mean over blocks."""
    import torch.nn.functional as F

    from attnexplain.explanation import compute_maps
    from attnexplain.loading import LoadedModel
    from attnexplain.methods import METHODS

    model = folders[family][1]
    x = _pixels(7, 32, 32)
    target = 1
    loaded = LoadedModel(module=model, source="<test>", loader="object", plugin=plugin)
    computed = compute_maps(loaded, x, [METHODS["legrad"]], [], targets=torch.tensor([target]))
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        output = model(x.clone().requires_grad_(True), output_attentions=True, output_hidden_states=True)
    finally:
        model.set_attn_implementation(previous)
    hidden = output.hidden_states[-len(output.attentions) :]  # each block's output
    if family == "clip":

        def head(pooled):
            return model.classifier(pooled)
    elif family == "deit":

        def head(pooled):
            normed = model.deit.layernorm(pooled)
            return (model.cls_classifier(normed) + model.distillation_classifier(normed)) / 2
    else:

        def head(pooled):
            return model.classifier(model.vit.layernorm(pooled))

    per_layer = []
    for tokens, attention in zip(hidden, output.attentions):
        (gradient,) = torch.autograd.grad(head(tokens.mean(dim=1))[0, target], attention, retain_graph=True)
        per_layer.append(gradient[0].clamp_min(0).mean(dim=(0, 1))[PREFIX[family] :])
    grid = torch.stack(per_layer).mean(dim=0).reshape(1, 1, 4, 4)
    expected = F.interpolate(grid, size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
    assert _pearson(computed.maps["legrad"][0].numpy(), expected.detach().numpy()) >= 0.999


@pytest.mark.parametrize(
    "family,method", [("deit", "rollout"), ("vit", "chefer"), ("swin", "rollout"), ("swinv2", "chefer")]
)
def test_explain_shows_attention_of_an_in_memory_model(family, method, folders):
    """explain() on the module itself: the plugin switches to eager attention while it records."""
    model = folders[family][1]
    before = model.config._attn_implementation
    result = explain(model, IMAGE, method)
    assert np.isfinite(result.heatmap).all() and result.heatmap.std() > 0
    assert model.config._attn_implementation == before


def _transformers_window_positions(block, height: int, width: int) -> torch.Tensor:
    """Where each window token lies, by the block's own padding, roll and transformers'
    window_partition applied to a map of position numbers (padding: -1)."""
    from transformers.models.swin.modeling_swin import window_partition

    numbers = torch.arange(1, height * width + 1, dtype=torch.float32).reshape(1, height, width, 1)
    padded, _ = block.maybe_pad(numbers, height, width)
    if block.shift_size > 0:
        padded = torch.roll(padded, shifts=(-block.shift_size, -block.shift_size), dims=(1, 2))
    windows = window_partition(padded, block.window_size)
    return windows.reshape(windows.shape[0], -1).long() - 1


def reference_windowed_rollout(layers) -> torch.Tensor:
    """Rollout with every layer's dense (positions × positions) matrix: 0.5·A + 0.5·I row-normalised,
    applied from a uniform row at the output back to the input; across a patch merging, position
    (r, c) of the finer map shares the value of (r // 2, c // 2) with the others merged into it."""
    row = None
    for layer in reversed(layers):
        count = layer.height * layer.width
        fused = layer.probabilities[0].double().mean(dim=1)  # (windows, tokens, tokens)
        queries = layer.positions[:, :, None].expand_as(fused)
        keys = layer.positions[:, None, :].expand_as(fused)
        real = (queries >= 0) & (keys >= 0)
        dense = torch.zeros(count, count, dtype=torch.float64)
        dense.index_put_((queries[real], keys[real]), fused[real], accumulate=True)
        mixed = 0.5 * dense + 0.5 * torch.eye(count, dtype=torch.float64)
        mixed = mixed / mixed.sum(dim=1, keepdim=True)
        if row is None:
            row = torch.full((count,), 1.0 / count, dtype=torch.float64)
        elif row.numel() != count:
            coarse_width = -(-layer.width // 2)
            parents = torch.tensor(
                [(r // 2) * coarse_width + c // 2 for r in range(layer.height) for c in range(layer.width)]
            )
            row = row[parents] / torch.bincount(parents)[parents]
        row = row @ mixed
    return row.reshape(layers[0].height, layers[0].width)


@pytest.mark.parametrize("family", ["swin", "swinv2"])
@pytest.mark.parametrize("size", [(32, 32), (40, 56)])  # 40×56: maps of 10×14 and 5×7, padded to windows
def test_swin_attention_is_recorded_per_window_with_its_positions(family, size, folders):
    model = folders[family][1]
    names = plugin.attention_modules(model)
    assert len(names) == 4 and plugin.refuse_method(model, "rollout") is None
    x = _pixels(6, *size)
    captured, reference = {}, {}
    before = model.config._attn_implementation
    with torch.no_grad():
        plain = model(x).logits
        with plugin.recording(model), plugin.capture_attention(model, names, captured):
            recorded = model(x).logits
        # transformers' own attention weights: the second output of each block's attention, eager.
        model.set_attn_implementation("eager")

        def keep(name):
            def hook(module, args, output):
                reference[name] = output[1]

            return hook

        handles = [model.get_submodule(name).register_forward_hook(keep(name)) for name in names]
        try:
            model(x, output_attentions=True)  # Swin v2's attention returns its weights only then
        finally:
            for handle in handles:
                handle.remove()
            model.set_attn_implementation(before)
    assert model.config._attn_implementation == before
    assert torch.allclose(recorded, plain, atol=1e-5)
    for name in names:
        layer = captured[name]
        block = model.get_submodule(name.rpartition(".")[0])
        assert torch.equal(layer.positions, _transformers_window_positions(block, layer.height, layer.width))
        assert torch.allclose(layer.probabilities.flatten(0, 1), reference[name], atol=1e-6)
    layers = [captured[name] for name in names]
    assert _pearson(rollout(layers, None), reference_windowed_rollout(layers)) >= 0.999
    assert plugin.refuse_method(model, "legrad") is not None
    with pytest.raises(MethodError, match="not the attention of a Swin block"):
        with plugin.capture_attention(model, ["swin.no.such.attention"], {}):
            pass


def test_capture_refuses_layers_that_are_not_attention(folders):
    with pytest.raises(MethodError, match="not an attention module"):
        with plugin.capture_attention(folders["vit"][1], ["vit.layers.0.mlp"], {}):
            pass


# --- Grad-CAM through the plugin's layer layout ----------------------------------------------------


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


def test_gradcam_on_a_vit_block_matches_pytorch_grad_cam(folders):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = folders["vit"][1]
    layer = plugin.default_layer(model)
    assert layer == "vit.layers.1.layernorm_before"  # the half-depth block's input
    result = explain(model, IMAGE, "gradcam")
    assert result.layer == layer and result.heatmap.std() > 0

    def reshape(tensor):
        return tensor[:, 1:, :].reshape(tensor.size(0), 4, 4, tensor.size(2)).permute(0, 3, 1, 2)

    batch = prepare(np.asarray(Image.open(IMAGE).convert("RGB")), plugin.preprocessing(model)).tensor
    model.requires_grad_(True)
    try:
        with GradCAM(
            model=_Logits(model), target_layers=[model.get_submodule(layer)], reshape_transform=reshape
        ) as cam:
            reference = cam(input_tensor=batch, targets=[ClassifierOutputTarget(result.target.index)])[0]
    finally:
        model.requires_grad_(False)
    assert _pearson(result.heatmap, reference) >= 0.999


@pytest.mark.parametrize(
    "family,layer",
    [
        ("swin", "swin.layernorm"),
        ("swinv2", "swinv2.layernorm"),
        ("convnext", "convnext.encoder.stages.1"),
        ("convnextv2", "convnextv2.encoder.stages.1"),
        ("resnet", "resnet.encoder.stages.1"),
        ("dinov2_registers", "dinov2_with_registers.encoder.layer.1.norm1"),
        ("clip", "vision_model.encoder.layers.1.layer_norm1"),
        ("beit", "beit.layers.1.layernorm_before"),
    ],
)
def test_gradcam_uses_the_plugins_layer_layout(family, layer, folders):
    model = folders[family][1]
    assert plugin.default_layer(model) == layer
    result = explain(model, IMAGE, "gradcam")
    assert result.layer == layer and np.isfinite(result.heatmap).all() and result.heatmap.std() > 0


def test_swin_stages_give_their_hidden_states(folders):
    model = folders["swin"][1]
    stage = model.get_submodule("swin.encoder.layers.0")
    outputs = {}
    handle = stage.register_forward_hook(lambda module, args, output: outputs.setdefault("stage", output))
    with torch.no_grad():
        model(_pixels(5, 32, 32))
    handle.remove()
    selected = plugin.select_output(model, "swin.encoder.layers.0", outputs["stage"])
    assert selected is outputs["stage"][0]
    laid_out = plugin.layer_map(model, "swin.encoder.layers.0", selected, (32, 32))
    assert laid_out.shape == (1, 32, 4, 4)  # merged to the next stage's 4×4 grid


# --- end to end (the core calls the v2 hooks) ----------------------------------------------------


@pytest.mark.parametrize("family,method", [("vit", "rollout"), ("swin", "gradcam")])
def test_cli_runs_hf_prefixed_folder(family, method, tmp_path):
    """``hf:FOLDER`` goes through the plugin's load_named today (the plain folder needs the core's
    claims_path wiring): exit 0, a report naming the id2label class, the processor's size."""
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    folder = _saved(family, tmp_path / "saved", processor)
    result = CliRunner().invoke(
        main,
        ["run", f"hf:{folder}", str(IMAGE), "--method", method, "--out", str(tmp_path / "D"), "--json"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(getattr(result, "stdout", result.output))
    assert report["model"]["plugin"] == "transformers" and report["method"] == method
    assert report["target"]["label"] in LABELS.values() and report["preprocessing"]["size"] == [32, 32]
    assert (Path(report["outputs"]["directory"]) / "report.html").is_file()


def test_cli_runs_a_saved_folder(folders, tmp_path):
    folder = _saved("vit", tmp_path / "saved-folder", transformers.ViTImageProcessor(size={"height": 32, "width": 32}))
    result = CliRunner().invoke(
        main, ["run", str(folder), str(IMAGE), "--out", str(tmp_path / "D"), "--json"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    report = json.loads(getattr(result, "stdout", result.output))
    assert report["model"]["plugin"] == "transformers"
    assert report["predictions"][0]["label"] in LABELS.values()
    assert not any("random weights" in note for note in report["model"]["notes"])
    assert (Path(report["outputs"]["directory"]) / "report.html").is_file()


def test_explain_on_an_in_memory_model_gets_its_labels(folders):
    result = explain(folders["vit"][1], IMAGE, "gradcam")
    assert result.predictions[0].label in LABELS.values()


def test_explain_a_non_square_input_interpolates_positions(folders):
    result = explain(folders["vit"][1], IMAGE, "rollout", size=(32, 48))
    assert result.heatmap.shape == (32, 48) and result.heatmap.std() > 0
