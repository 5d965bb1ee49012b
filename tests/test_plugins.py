"""Plugins: discovery through entry points, priority, override, and broken plugins."""

from __future__ import annotations

import textwrap

import pytest
import torchvision
from click.testing import CliRunner

from attnexplain import explain
from attnexplain.cli import main
from attnexplain.errors import PluginError
from attnexplain.plugins import ModelPlugin, plugin_infos, select_plugin

PLUGIN_SOURCE = """
from attnexplain.plugins import ModelPlugin


class ResNetSpecialist(ModelPlugin):
    name = "specialist"
    families = ("torchvision ResNet, explained with LayerCAM",)

    def specificity(self, model):
        return 30 if type(model).__name__ == "ResNet" else None

    def default_method(self, model):
        return "layercam"

    def default_layer(self, model):
        return "layer3"


class SameScore(ModelPlugin):
    name = "aaa-tie"

    def specificity(self, model):
        return 30 if type(model).__name__ == "ResNet" else None


specialist = ResNetSpecialist()
tie = SameScore()
"""


@pytest.fixture
def extra_plugins(tmp_path, monkeypatch):
    """A fake installed distribution with a working, a tying and a broken plugin."""
    (tmp_path / "fake_plugins.py").write_text(PLUGIN_SOURCE)
    (tmp_path / "fake_broken.py").write_text("raise ImportError('needs a library that is missing')\n")
    info = tmp_path / "fake_attnexplain_plugins-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-attnexplain-plugins\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent("""\
        [attnexplain.plugins]
        specialist = fake_plugins:specialist
        tie = fake_plugins:tie
        broken = fake_broken:plugin
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin_infos(reload=True)
    yield
    monkeypatch.undo()
    plugin_infos(reload=True)


def test_torchvision_support_is_a_plugin_found_by_its_entry_point():
    infos = {info.name: info for info in plugin_infos(reload=True)}
    assert infos["torchvision"].distribution == "attnexplain" and infos["torchvision"].error is None
    assert select_plugin(torchvision.models.resnet18()).name == "torchvision"


def test_a_model_no_plugin_claims_gets_the_generic_behaviour():
    import torch

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    )
    plugin = select_plugin(model)
    assert type(plugin) is ModelPlugin and plugin.name == "generic"
    assert explain(model, __import__("numpy").zeros((32, 32, 3), "uint8") + 100, size=32).layer == "1"


def test_most_specific_plugin_wins_and_ties_break_by_name(extra_plugins):
    # specialist (30) and aaa-tie (30) beat torchvision (10); of the two, the name sorts first.
    assert select_plugin(torchvision.models.resnet18()).name == "aaa-tie"
    assert select_plugin(torchvision.models.mobilenet_v3_small()).name == "torchvision"


def test_plugin_override_by_name(extra_plugins, photo):
    model = torchvision.models.resnet18(num_classes=3).eval()
    assert select_plugin(model, "specialist").name == "specialist"
    with pytest.raises(PluginError, match="No plugin named 'nope'"):
        select_plugin(model, "nope")


def test_plugin_choices_reach_the_explanation(extra_plugins, tmp_path, photo):
    import torch

    path = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), path)
    result = CliRunner().invoke(
        main,
        [
            "run",
            str(path),
            str(photo),
            "--arch",
            "resnet18",
            "--plugin",
            "specialist",
            "--size",
            "64",
            "--out",
            str(tmp_path / "o"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    import json

    report = json.loads(result.output)
    assert report["model"]["plugin"] == "specialist"
    assert report["method"] == "layercam" and report["layer"] == "layer3"


def test_broken_plugin_is_listed_and_everything_else_works(extra_plugins, tmp_path, photo):
    infos = {info.name: info for info in plugin_infos()}
    assert infos["broken"].plugin is None and "needs a library that is missing" in infos["broken"].error
    listing = CliRunner().invoke(main, ["plugins"])
    assert listing.exit_code == 0
    rows = listing.output.splitlines()[1:]
    broken_line = next(line for line in rows if line.split("\t")[0] == "broken")
    assert "fake-attnexplain-plugins" in broken_line and "needs a library that is missing" in broken_line
    assert "1.2.3" in listing.output and "torchvision" in listing.output
    result = explain(torchvision.models.resnet18(num_classes=3), photo, "gradcam", size=64)
    assert result.heatmap.shape == (64, 64)
