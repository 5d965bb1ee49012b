"""Every torchvision builder, explained out of the box: `attnexplain models` and its check."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from attnexplain.catalog import catalog_entries, check_entry
from attnexplain.cli import main

ENTRIES = {(plugin.name, entry.name): (plugin, entry) for plugin, entry in catalog_entries()}
TORCHVISION = [key for key in ENTRIES if key[0] == "torchvision"]
QUICK = {"resnet18", "mobilenet_v3_small", "squeezenet1_1", "lraspp_mobilenet_v3_large"}


def test_catalog_lists_every_torchvision_builder():
    import torchvision

    names = {name for plugin, name in TORCHVISION}
    for module, count in ((torchvision.models, 80), (torchvision.models.segmentation, 6),
                          (torchvision.models.detection, 12)):
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
@pytest.mark.parametrize("key", sorted(key for key in TORCHVISION if ENTRIES[key][1].supported),
                         ids=lambda key: key[1])
def test_every_supported_builder_explains(key):
    row = check_entry(*ENTRIES[key])
    assert row.status == "ok", row.status


def test_models_command_prints_the_table_and_checks():
    listing = CliRunner().invoke(main, ["models"], env={"COLUMNS": "300"})
    assert listing.exit_code == 0
    assert "vit_b_16" in listing.output and "fcn_resnet50" in listing.output
    assert "maskrcnn_resnet50_fpn" in listing.output and "not supported" in listing.output
    checked = CliRunner().invoke(main, ["models", "--check", "--name", "shufflenet_v2_x0_5"],
                                 env={"COLUMNS": "300"})
    assert checked.exit_code == 0, checked.output
    assert "shufflenet_v2_x0_5" in checked.output and "ok (" in checked.output
