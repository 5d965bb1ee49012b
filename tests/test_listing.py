"""`attnexplain models`, `plugins`, `methods` and `layers`: every plugin's models listed at once (no
model built, no torch imported once cached), real input sizes, --json, plain lines when piped."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from attnexplain import catalog, plugin_cache
from attnexplain.cli import main
from attnexplain.plugins import plugin_infos


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """An empty catalog cache of the test's own, and no catalog remembered from an earlier test."""
    monkeypatch.setenv(plugin_cache.CACHE_ENV, str(tmp_path / "cache"))
    catalog._live_catalog.cache_clear()
    yield tmp_path / "cache"
    catalog._live_catalog.cache_clear()


def _invoke(*arguments: str):
    return CliRunner().invoke(main, list(arguments))


def _json(*arguments: str):
    result = _invoke(*arguments, "--json")
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


def _plugin(name: str):
    return next(info.plugin for info in plugin_infos() if info.name == name)


def _live(name: str) -> list:
    return list(_plugin(name).catalog())


@pytest.fixture
def builds_counted(monkeypatch):
    """Every working plugin's catalog, with each entry's builder counting its calls (and building
    nothing)."""
    calls = []

    def counted(name):
        def build():
            calls.append(name)
            raise RuntimeError("built")

        return build

    for info in plugin_infos():
        if info.plugin is not None:
            original = info.plugin.catalog
            monkeypatch.setattr(
                info.plugin,
                "catalog",
                lambda original=original: [
                    dataclasses.replace(entry, build=counted(entry.name)) for entry in original()
                ],
            )
    return calls


def test_models_json_lists_every_installed_plugins_catalog():
    listed = _json("models")
    assert listed["errors"] == {}
    by_plugin: dict[str, set[str]] = {}
    for model in listed["models"]:
        by_plugin.setdefault(model["plugin"], set()).add(model["name"])
    for info in plugin_infos():
        if info.plugin is not None:
            assert by_plugin.get(info.name, set()) == {entry.name for entry in info.plugin.catalog()}, info.name
    assert {"torchvision", "timm", "attention-cnn"} <= set(by_plugin)
    assert len(by_plugin["timm"]) > 1000 and len(by_plugin["torchvision"]) == 98
    resnet = next(m for m in listed["models"] if m["spec"] == "torchvision:resnet50")
    assert resnet == {
        "name": "resnet50",
        "spec": "torchvision:resnet50",
        "plugin": "torchvision",
        "task": "classification",
        "input_size": 224,
        "check_size": 128,
        "supported": True,
        "note": "",
        "method": None,
        "layer": None,
        "status": "supported",
        "seconds": None,
    }
    cnn = next(m for m in listed["models"] if m["plugin"] == "attention-cnn")
    assert cnn["spec"] is None and cnn["name"] == "AttentionPoolingCNN"  # an --arch name


def test_models_show_the_size_the_weights_are_run_at_not_the_probes():
    import timm
    import torch
    import torchvision
    from attnexplain_attention_cnn.cbam import CBAMCNN
    from attnexplain_attention_cnn.model import AttentionPoolingCNN

    from attnexplain.default_plugins.torchvision_detection import detector_preprocessing

    sizes = {(m["plugin"], m["name"]): m["input_size"] for m in _json("models")["models"]}
    for name in (
        "resnet50",
        "vit_h_14",
        "swin_v2_t",
        "efficientnet_b7",
        "inception_v3",
        "deeplabv3_resnet50",
        "lraspp_mobilenet_v3_large",
    ):
        preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        expected = preset.crop_size[0] if getattr(preset, "crop_size", None) else preset.resize_size[0]
        assert sizes[("torchvision", name)] == expected, name
    assert sizes[("torchvision", "vit_h_14")] == 518 and sizes[("torchvision", "efficientnet_b7")] == 600
    # A detector resizes photos itself: the size its built transform says.
    for name in torchvision.models.list_models(module=torchvision.models.detection):
        with torch.device("meta"):
            model = torchvision.models.get_model(name, weights=None, weights_backbone=None)
        assert sizes[("torchvision", name)] == detector_preprocessing(model).size[0], name
    for name in ("vit_base_patch16_384", "resnet50", "convnext_tiny", "deit_tiny_distilled_patch16_224"):
        with torch.device("meta"):
            model = timm.create_model(name)
        assert sizes[("timm", name)] == model.pretrained_cfg["input_size"][-1], name
    assert sizes[("timm", "vit_base_patch16_384")] == 384
    assert sizes[("attention-cnn", "AttentionPoolingCNN")] == AttentionPoolingCNN().image_size
    assert sizes[("attention-cnn", "CBAMCNN")] == CBAMCNN().image_size


def test_listing_builds_no_model_and_details_do(builds_counted):
    for arguments in (["models"], ["models", "--json"], ["plugins"], ["plugins", "--json"]):
        for _ in range(2):  # the cache is written, then read
            assert _invoke(*arguments).exit_code == 0
    assert builds_counted == []
    result = _invoke("models", "resnet18", "--plugin", "torchvision", "--details")
    assert builds_counted == ["resnet18"] and result.exit_code == 0
    # A builder that fails while describing leaves method and layer to --check ...
    assert "see --check" in result.stdout
    # ... and fails the check, with exit code 1.
    checked = _invoke("models", "resnet18", "--plugin", "torchvision", "--check")
    assert checked.exit_code == 1 and builds_counted == ["resnet18", "resnet18"]
    assert "failed: RuntimeError: built" in checked.stdout
    assert checked.stderr.strip() == "Error: 1 model(s) failed the check."


def test_a_warm_listing_imports_no_torch(fresh_cache):
    catalog.read_catalog()  # fills the cache
    probe = (
        "import sys\nfrom attnexplain.cli import main\n"
        "main.main(['models', '--json'], standalone_mode=False)\n"
        "print('torch' in sys.modules, 'timm' in sys.modules, file=sys.stderr)"
    )
    env = {**os.environ, plugin_cache.CACHE_ENV: str(fresh_cache), "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.split() == ["False", "False"]
    assert len(json.loads(done.stdout)["models"]) == len(catalog.catalog_entries())


def test_a_torchvision_arch_imports_neither_timm_nor_transformers(tmp_path, fresh_cache):
    timm = pytest.importorskip("timm")
    import torch
    import torchvision

    from attnexplain.loading import load_model

    for name, model in (
        ("resnet18", torchvision.models.resnet18(num_classes=3)),
        ("convnext_tiny", torchvision.models.convnext_tiny(num_classes=3)),
        ("resnet10t", timm.create_model("resnet10t", num_classes=3)),
    ):
        torch.save(model.state_dict(), tmp_path / f"{name}.pt")
    # The first look-up asks timm's plugin once for its names (the cache is empty); later ones read them.
    plugin_cache._builder_names_for_key.cache_clear()
    assert [plugin.name for plugin, _ in plugin_cache.plugins_for_arch("resnet18")][0] == "torchvision"
    # convnext_tiny is a name both build: torchvision's fits, so timm's plugin is never asked.
    probe = (
        "import sys\nfrom attnexplain.loading import load_model\n"
        f"for name in ('resnet18', 'convnext_tiny'):\n"
        f"    loaded = load_model({str(tmp_path)!r} + f'/{{name}}.pt', arch=name)\n"
        "    print(type(loaded.module).__module__, file=sys.stderr)\n"
        "print('timm' in sys.modules, 'transformers' in sys.modules, file=sys.stderr)"
    )
    env = {**os.environ, plugin_cache.CACHE_ENV: str(fresh_cache), "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr
    assert done.stderr.split()[-4:] == ["torchvision.models.resnet", "torchvision.models.convnext", "False", "False"]
    # A name only timm builds is found through the cache; a cache file that lies (holds no name)
    # costs time, never a name: every plugin is then asked.
    assert type(load_model(tmp_path / "resnet10t.pt", arch="resnet10t").module).__module__ == "timm.models.resnet"
    [names] = [
        path
        for path in (fresh_cache / "builders").iterdir()
        if "timm:resnet18" in json.loads(path.read_text())["entries"]
    ]
    names.write_text(json.dumps({"key": json.loads(names.read_text())["key"], "entries": []}))
    plugin_cache._builder_names_for_key.cache_clear()
    assert [plugin.name for plugin, _ in plugin_cache.plugins_for_arch("resnet10t")] == ["torchvision"]
    assert type(load_model(tmp_path / "resnet10t.pt", arch="resnet10t").module).__module__ == "timm.models.resnet"
    plugin_cache._builder_names_for_key.cache_clear()  # the lie stays with this test's cache folder


def test_piped_listing_is_one_whole_line_per_model():
    listed = _json("models")["models"]
    result = CliRunner().invoke(main, ["models"], env={"COLUMNS": "40"})
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split("\t") == ["model", "task", "plugin", "input", "status"]
    rows = [line.split("\t") for line in lines[1:]]
    assert all(len(row) == 5 for row in rows) and len(rows) == len(listed)
    assert [row[0] for row in rows] == [m["spec"] or m["name"] for m in listed]
    longest = max((m["spec"] or m["name"] for m in listed), key=len)
    assert len(longest) > 40 and any(row[0] == longest for row in rows)


def test_models_filters_by_pattern_glob_plugin_and_task():
    names = lambda *args: [m["spec"] or m["name"] for m in _json("models", *args)["models"]]  # noqa: E731
    found = names("resnet18")
    assert {"timm:resnet18", "timm:legacy_seresnet18", "torchvision:resnet18"} <= set(found)
    assert all("resnet18" in name for name in found)
    assert names("*:resnet18") == ["timm:resnet18", "torchvision:resnet18"]
    assert names("--plugin", "torchvision", "RESNET1*") == [
        "torchvision:resnet101",
        "torchvision:resnet152",
        "torchvision:resnet18",
    ]
    assert names("timm:vit_base_patch16_384") == ["timm:vit_base_patch16_384"]
    assert len(names("--task", "detection")) == 12
    assert names("no-such-model") == []
    unknown = _invoke("models", "--plugin", "nosuch")
    assert unknown.exit_code == 1 and "No plugin named 'nosuch' is installed" in unknown.stderr


def test_models_details_say_the_default_method_and_layer():
    listed = {m["name"]: m for m in _json("models", "--plugin", "torchvision", "--details", "swin_t")["models"]}
    assert listed["swin_t"]["method"] == "rollout"
    detector = _json("models", "--details", "maskrcnn_resnet50_fpn")["models"][0]
    assert (detector["method"], detector["layer"]) == ("layercam", "backbone.body.layer4")


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        '{"key": "KEY", "entries": [{"name": "forged\\nrow", "task": "classification", "input_size": 224,'
        ' "supported": true, "note": "", "default_size": null}]}',
        '{"key": "KEY", "entries": [{"name": "x", "task": "classification", "input_size": 1000000000,'
        ' "supported": true, "note": "", "default_size": null}]}',
        '{"key": "KEY", "entries": [{"name": "x", "task": "classification", "input_size": 224,'
        ' "supported": "yes", "note": "", "default_size": null, "build": "os.system"}]}',
        '{"key": "KEY", "entries": {"name": "x"}}',
        "[1, 2, 3]",
    ],
    ids=["not-json", "newline-in-name", "huge-size", "wrong-types", "not-a-list", "not-a-dict"],
)
def test_a_hostile_cache_file_is_ignored_and_rewritten(fresh_cache, content):
    info = next(info for info in plugin_infos() if info.name == "attention-cnn")
    catalog.read_catalog("attention-cnn")
    [path] = [p for p in (fresh_cache / "catalogs").iterdir()]
    path.write_text(content.replace("KEY", plugin_cache.cache_key(info)))
    listed = _json("models", "--plugin", "attention-cnn")["models"]
    assert [m["name"] for m in listed] == ["AttentionPoolingCNN", "CBAMCNN"]
    assert [m["input_size"] for m in listed] == [128, 128]
    assert json.loads(path.read_text())["entries"][0]["name"] == "AttentionPoolingCNN"


def test_a_huge_cache_file_is_not_read(fresh_cache, monkeypatch):
    catalog.read_catalog("attention-cnn")
    [path] = list((fresh_cache / "catalogs").iterdir())
    monkeypatch.setattr(plugin_cache, "_CACHE_MAX_BYTES", path.stat().st_size - 1)
    monkeypatch.setattr(catalog, "write_cache", lambda *args: None)
    asked = []
    plugin = _plugin("attention-cnn")
    original = plugin.catalog
    monkeypatch.setattr(plugin, "catalog", lambda: asked.append(1) or original())
    catalog._live_catalog.cache_clear()
    assert [entry.name for _, entry in catalog.read_catalog("attention-cnn").entries] == [
        "AttentionPoolingCNN",
        "CBAMCNN",
    ]
    assert asked == [1]


def test_an_unwritable_cache_folder_still_lists(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(plugin_cache.CACHE_ENV, str(blocker / "cache"))
    assert [m["name"] for m in _json("models", "--plugin", "attention-cnn")["models"]] == [
        "AttentionPoolingCNN",
        "CBAMCNN",
    ]


def test_a_broken_catalog_is_reported_and_the_others_listed(monkeypatch):
    def broken():
        raise ImportError("its library is missing")

    monkeypatch.setattr(_plugin("attention-cnn"), "catalog", broken)
    monkeypatch.setattr(_plugin("timm"), "catalog", lambda: ["not an entry"])
    result = _invoke("models", "--json")
    assert result.exit_code == 0
    listed = json.loads(result.stdout)
    assert listed["errors"]["attention-cnn"] == "ImportError: its library is missing"
    assert "not a CatalogEntry" in listed["errors"]["timm"]
    assert {m["plugin"] for m in listed["models"]} >= {"torchvision"}
    assert not {m["plugin"] for m in listed["models"]} & {"attention-cnn", "timm"}
    assert "Warning: plugin attention-cnn's models cannot be listed" in result.stderr
    plugins = {p["name"]: p for p in _json("plugins")}
    assert plugins["attention-cnn"]["models"] is None and "its library is missing" in plugins["attention-cnn"]["error"]


def test_plugins_json_lists_every_plugin_with_its_model_count():
    listed = {plugin["name"]: plugin for plugin in _json("plugins")}
    assert set(listed) == {info.name for info in plugin_infos()}
    for name in ("torchvision", "timm", "attention-cnn"):
        assert listed[name]["models"] == len(_live(name)) and listed[name]["error"] is None
    assert listed["torchvision"]["distribution"] == "attnexplain"
    assert listed["timm"]["source_prefix"] == "timm" and listed["attention-cnn"]["source_prefix"] is None
    result = _invoke("plugins")
    header, *rows = result.stdout.splitlines()
    assert header.split("\t") == ["plugin", "version", "distribution", "models", "families", "status"]
    assert {row.split("\t")[0]: row.split("\t")[3] for row in rows}["torchvision"] == "98"


def test_methods_json_lists_builtin_and_plugin_methods(monkeypatch):
    from attnexplain.methods import METHODS

    gradcam = METHODS["gradcam"]
    own = dataclasses.replace(gradcam, name="own_map", summary="The plugin's own map.")
    monkeypatch.setattr(_plugin("attention-cnn"), "methods", lambda: [own])
    monkeypatch.setattr(_plugin("timm"), "methods", lambda: [dataclasses.replace(gradcam)])  # a taken name

    def broken():
        raise RuntimeError("cannot say")

    monkeypatch.setattr(_plugin("torchvision"), "methods", broken)
    result = _invoke("methods", "--json")
    assert result.exit_code == 0
    listed = json.loads(result.stdout)
    by_name = {method["name"]: method for method in listed["methods"]}
    for name, method in METHODS.items():
        assert by_name[name] == {
            "name": name,
            "family": method.family,
            "summary": method.summary,
            "applies_to": method.applies_to,
            "cost": method.cost,
            "paper": method.paper,
            "needs_gradient": method.needs_gradient,
            "plugin": None,
        }
    assert by_name["own_map"]["plugin"] == "attention-cnn"
    assert by_name["own_map"]["summary"] == "The plugin's own map."
    assert "has the name of a built-in method" in listed["errors"]["timm"]
    assert listed["errors"]["torchvision"] == "its methods() raised RuntimeError: cannot say"
    assert "Warning: plugin torchvision's methods cannot be listed" in result.stderr
    table = _invoke("methods")
    row = next(line.split("\t") for line in table.stdout.splitlines() if line.startswith("own_map\t"))
    assert row[-1] == "attention-cnn"


def test_layers_json(resnet_state_dict_file):
    listed = _json("layers", str(resnet_state_dict_file), "--arch", "resnet18", "--size", "64")
    assert listed["size"] == [64, 64] and listed["default"] == "layer4"
    layers = {layer["name"]: layer for layer in listed["layers"]}
    assert layers["layer4"]["default"] and not layers["layer3"]["default"]
    assert layers["layer4"]["shape"] == [1, 512, 2, 2] and layers["layer4"]["map_shape"] == [1, 512, 2, 2]
    assert "fc" not in layers and "avgpool" not in layers  # not spatial: only with --all
    everything = _json("layers", str(resnet_state_dict_file), "--arch", "resnet18", "--size", "64", "--all")
    assert {"fc", "avgpool"} <= {layer["name"] for layer in everything["layers"]}


def test_terminal_listing_keeps_every_name_on_one_line(monkeypatch, capsys):
    from attnexplain.cli.printing import print_listing

    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    long_name = "timm:" + "x" * 60
    print_listing("Models by name (2)", ["model", "input"], [[long_name, 224], ["short", 96]])
    title, header, first, second = capsys.readouterr().out.splitlines()
    assert title == "Models by name (2)" and header.split() == ["model", "input"]
    assert first.split() == [long_name, "224"] and second.split() == ["short", "96"]
    assert first.index("224") == second.index("96") == header.index("input")  # aligned


def test_the_cache_follows_the_libraries_the_plugin_requires(monkeypatch):
    import importlib.metadata

    from attnexplain.plugins import CatalogEntry

    plugin = _plugin("attention-cnn")
    catalog.read_catalog("attention-cnn")  # cached: one entry
    original = plugin.catalog
    monkeypatch.setattr(
        plugin, "catalog", lambda: [*original(), CatalogEntry("Newer", "classification", 64, lambda: None)]
    )
    catalog._live_catalog.cache_clear()
    names = lambda: [entry.name for _, entry in catalog.read_catalog("attention-cnn").entries]  # noqa: E731
    assert names() == ["AttentionPoolingCNN", "CBAMCNN"]  # same plugin file, same versions: the cache answers
    # attnexplain-attention-cnn requires torch: another torch version is another catalog.
    version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.1" if name == "torch" else version(name))
    assert names() == ["AttentionPoolingCNN", "CBAMCNN", "Newer"]
