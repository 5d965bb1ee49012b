"""Every torchvision builder, explained out of the box: `attnexplain models` and its check."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from attnexplain.catalog import catalog_entries, check_entry
from attnexplain.cli import main

ENTRIES = {(plugin.name, entry.name): (plugin, entry) for plugin, entry in catalog_entries()}
TORCHVISION = [key for key in ENTRIES if key[0] == "torchvision"]
QUICK = {
    "resnet18",
    "mobilenet_v3_small",
    "squeezenet1_1",
    "lraspp_mobilenet_v3_large",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "retinanet_resnet50_fpn",
}


def test_catalog_lists_every_torchvision_builder():
    import torchvision

    names = {name for plugin, name in TORCHVISION}
    for module, count in (
        (torchvision.models, 80),
        (torchvision.models.segmentation, 6),
        (torchvision.models.detection, 12),
    ):
        listed = torchvision.models.list_models(module=module)
        assert len(listed) == count and set(listed) <= names


@pytest.mark.parametrize("name", sorted(QUICK))
def test_representative_builders_explain(name):
    row = check_entry(*ENTRIES[("torchvision", name)])
    assert row.status == "ok", row.status


def test_default_layers_skip_pooling_and_class_score_heads():
    assert check_entry(*ENTRIES[("torchvision", "squeezenet1_1")]).layer == "features"
    assert check_entry(*ENTRIES[("torchvision", "lraspp_mobilenet_v3_large")]).layer == "backbone.16"


@pytest.mark.heavy
@pytest.mark.parametrize("key", sorted(key for key in TORCHVISION if ENTRIES[key][1].supported), ids=lambda key: key[1])
def test_every_supported_builder_explains(key):
    from attnexplain.catalog import RANDOM_UNIFORM

    row = check_entry(*ENTRIES[key])
    assert row.status in ("ok", f"ok: {RANDOM_UNIFORM}"), row.status


def _table_rows(*arguments):
    """`attnexplain models --plugin torchvision ARGS` (piped: tab-separated lines) as builder →
    [task, plugin, input, (method, layer,) status]."""
    listing = CliRunner().invoke(main, ["models", "--plugin", "torchvision", *arguments])
    assert listing.exit_code == 0, listing.output
    header, *rows = listing.output.splitlines()
    assert header.startswith("model\ttask\tplugin\tinput\t")
    return {row.split("\t")[0].removeprefix("torchvision:"): row.split("\t")[1:] for row in rows}


def test_models_command_shows_default_method_and_layer():
    detectors = _table_rows("--task", "detection", "--details")
    assert len(detectors) == 12
    assert detectors["maskrcnn_resnet50_fpn"][3:] == ["layercam", "backbone.body.layer4", "supported"]
    assert _table_rows("--details", "swin_t")["swin_t"][3] == "rollout"
    assert _table_rows("--details", "fcn_resnet50")["fcn_resnet50"][3:5] == ["gradcam", "backbone.layer4"]


@pytest.mark.heavy
def test_models_command_lists_every_builder_as_supported():
    rows = _table_rows("--details")
    assert len(rows) == 98
    assert all(row[5].startswith("supported") for row in rows.values())
    assert rows["maxvit_t"][3] == "rollout" and rows["resnet50"][3:5] == ["gradcam", "layer4"]


def test_models_command_checks():
    checked = CliRunner().invoke(main, ["models", "--check", "torchvision:shufflenet_v2_x0_5"])
    assert checked.exit_code == 0, checked.output
    assert "shufflenet_v2_x0_5" in checked.output and "ok (" in checked.output


def test_a_cache_file_nested_too_deep_to_parse_is_a_stale_cache_not_a_crash(tmp_path):
    """The catalog's and the builder names' cache files are read as if anyone wrote them: JSON nested
    beyond Python's recursion limit is no cache (it raised RecursionError out of the catalog)."""
    from attnexplain.catalog import _read_cache
    from attnexplain.plugin_cache import _read_builder_names

    deep = tmp_path / "cache.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert _read_cache(deep, "key") is None
    assert _read_builder_names(deep, "key") is None
