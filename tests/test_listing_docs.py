"""docs/plugins.md's API reference says what the code does: every hook with its real signature,
every field of the plugin API's data classes, and error texts the code really prints."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from attnexplain import plugins
from attnexplain.plugins import ModelPlugin
from attnexplain.preprocess import Preprocessing

DOCS = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text(encoding="utf-8")
REFERENCE = DOCS.split("\n## API reference\n", 1)[1]
SECTIONS = {heading.split("\n", 1)[0]: heading for heading in REFERENCE.split("\n### ")[1:]}
HOOKS = sorted(name for name, value in vars(ModelPlugin).items() if callable(value) and not name.startswith("_"))


def _section(title_part: str) -> str:
    [text] = [text for title, text in SECTIONS.items() if title_part in title]
    return text


def _signature(name: str) -> str:
    """``name(a, b, *, c=False)``: the hook's parameters after ``self``, as the reference writes them."""
    parts: list[str] = []
    for parameter in list(inspect.signature(getattr(ModelPlugin, name)).parameters.values())[1:]:
        if parameter.kind is parameter.KEYWORD_ONLY and "*" not in parts:
            parts.append("*")
        default = "" if parameter.default is parameter.empty else f"={parameter.default!r}"
        parts.append(parameter.name + default)
    return f"{name}({', '.join(parts)})"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_in_the_reference_with_its_signature(hook):
    assert f"| `{_signature(hook)}` |" in REFERENCE


def test_the_reference_names_no_hook_the_code_lacks():
    documented = re.findall(r"^\| `(\w+)\(", REFERENCE, flags=re.MULTILINE)
    assert sorted(documented) == HOOKS


def test_every_plugin_attribute_is_in_the_reference():
    attributes = [name for name, value in vars(ModelPlugin).items() if not name.startswith("_") and not callable(value)]
    assert sorted(attributes) == ["api_version", "families", "name", "source_prefix"]
    for name in attributes:
        assert f"| `{name}` |" in _section("`ModelPlugin` attributes")


@pytest.mark.parametrize(
    "cls",
    [
        plugins.NamedModel,
        plugins.CatalogEntry,
        Preprocessing,
        plugins.TokenGrid,
        plugins.WindowedAttention,
        plugins.SpatialAttention,
        plugins.TokenReadout,
        plugins.Detections,
    ],
    ids=lambda cls: cls.__name__,
)
def test_every_field_of_the_plugin_data_classes_is_in_the_reference(cls):
    section = _section(f"`{cls.__name__}`")
    documented = re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE)
    assert documented == [field.name for field in dataclasses.fields(cls)]


def test_the_quoted_rollout_refusal_is_the_text_attnexplain_prints():
    import torch

    from attnexplain.methods.attention import _require_self_attention

    with pytest.raises(ValueError) as refused:
        _require_self_attention(torch.zeros(1, 1, 1, 256))  # one query, the sample CNN's 16×16 keys
    # explanation.py turns it into MethodError(f"{method.name}: {error}."), printed after "Error: ".
    assert f"\nError: rollout: {refused.value}.\n" in DOCS


def test_the_other_quoted_errors_are_the_codes():
    import torch

    from attnexplain.errors import MethodError, PluginError

    with pytest.raises(PluginError) as unknown:
        plugins.select_plugin(torch.nn.Linear(1, 1), "nosuch")
    shown = str(unknown.value).split("(installed: ")[0]
    assert f"# Error: {shown}(installed: attention-cnn, ...)." in DOCS
    with pytest.raises(MethodError) as unscored:
        plugins.classification_logits(torch.zeros(1, 3, 4, 4))
    quoted = re.search(r'\("\.\.\. (.+?)"\)', _section("classification_logits"), flags=re.DOTALL).group(1)
    assert str(unscored.value).endswith(quoted.replace("\n", " "))


def test_the_name_clash_rule_is_attnexplains_own_plugins_first():
    order = [plugin.name for plugin in plugins.builder_order()]
    assert order[0] == "torchvision"
    assert "attnexplain's\nown plugins (those of the `attnexplain` distribution: torchvision) are asked first" in DOCS
    assert "sorts first wins" not in DOCS.split("## 5.")[0]
