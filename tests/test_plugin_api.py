"""The plugin API is one module: the shipped plugins import attnexplain through attnexplain.plugin_api
alone, everything it offers imports (without torch until asked for) and is documented in
docs/plugins.md, and use_plugins installs plugins for a test and puts the installed ones back."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from attnexplain import plugin_api, plugins
from attnexplain.plugin_api import ModelPlugin, PluginInfo, use_plugins

REPO = Path(__file__).resolve().parents[1]
#: Every shipped plugin's package: attnexplain's own (registered like a third party's) and plugins/*.
PLUGIN_PACKAGES = [REPO / "attnexplain" / "default_plugins", *sorted(REPO.glob("plugins/*/attnexplain_*"))]
DOCS = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")


def _package_name(folder: Path) -> str:
    return "attnexplain.default_plugins" if folder.name == "default_plugins" else folder.name


def _imports(path: Path, package: str) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, names) of every import in ``path``, function-level and
    ``TYPE_CHECKING`` ones included; ``package`` is the package ``path`` is a module of."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            found.append((node.lineno, module, [alias.name for alias in node.names]))
    return found


def test_the_shipped_plugins_are_all_checked():
    names = {_package_name(folder) for folder in PLUGIN_PACKAGES}
    assert {
        "attnexplain.default_plugins",
        "attnexplain_attention_cnn",
        "attnexplain_timm",
        "attnexplain_transformers",
        "attnexplain_openclip",
    } <= names


@pytest.mark.parametrize("folder", PLUGIN_PACKAGES, ids=_package_name)
def test_a_shipped_plugin_imports_attnexplain_only_through_the_plugin_api(folder):
    package = _package_name(folder)
    wrong = []
    for path in sorted(folder.rglob("*.py")):
        for line, module, names in _imports(path, package):
            if module == package or module.startswith(package + "."):
                continue  # the plugin's own modules
            if module != "attnexplain" and not module.startswith("attnexplain."):
                continue  # torch, the model library, the standard library
            if module != "attnexplain.plugin_api" or not set(names) <= set(plugin_api.__all__):
                wrong.append(f"{path.relative_to(REPO)}:{line}: {module} {names}")
    assert not wrong, "\n".join(wrong)


def test_everything_the_plugin_api_offers_imports():
    assert len(set(plugin_api.__all__)) == len(plugin_api.__all__)
    for name in plugin_api.__all__:
        namespace: dict = {}
        exec(f"from attnexplain.plugin_api import {name}", namespace)
        assert namespace[name] is getattr(plugin_api, name)
        assert not name.startswith("_")
    with pytest.raises(AttributeError, match="has no attribute 'nonsense'"):
        plugin_api.nonsense  # noqa: B018


def test_the_plugin_api_re_exports_the_cores_own_objects():
    from attnexplain.capture import capture_softmax
    from attnexplain.methods import Method

    assert plugin_api.ModelPlugin is plugins.ModelPlugin and plugin_api.Method is Method
    assert plugin_api.capture_softmax is capture_softmax


def test_importing_the_plugin_api_imports_no_torch():
    probe = (
        "import sys\nimport attnexplain.plugin_api\nprint('torch' in sys.modules)\n"
        "from attnexplain.plugin_api import capture_softmax\nprint('torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]  # torch only once a name that needs it is asked for


def test_docs_plugins_md_documents_exactly_the_plugin_api():
    section = DOCS.split("\n### What `attnexplain.plugin_api` holds\n", 1)[1].split("\n## ", 1)[0]
    section = section.split("\n### ", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE)
    assert sorted(documented) == sorted(plugin_api.__all__)
    assert "from attnexplain.plugin_api import" in DOCS


class _Tiny(ModelPlugin):
    name = "tiny-test"


def test_use_plugins_installs_plugins_for_the_block_and_puts_the_installed_back():
    before = plugins.plugin_infos()
    tiny = _Tiny()
    with use_plugins(tiny):
        assert plugins.installed_plugins() == [tiny] and plugins.plugin_named("tiny-test") is tiny
        [info] = plugins.plugin_infos()
        assert (info.entry_point, info.distribution, info.version, info.error) == ("tiny-test", None, None, None)
    assert plugins.plugin_infos() is before
    with pytest.raises(RuntimeError), use_plugins(tiny):
        raise RuntimeError("a failing test")
    assert plugins.plugin_infos() is before


def test_use_plugins_keeps_the_installed_ones_when_asked_and_takes_plugin_infos_as_they_are():
    broken = PluginInfo("broken", "some-dist", "1.0", None, "ImportError: missing")
    tiny = _Tiny()
    with use_plugins(tiny, broken, keep_installed=True):
        infos = plugins.plugin_infos()
        assert infos[-1] is broken and infos[-2].plugin is tiny
        assert "torchvision" in [plugin.name for plugin in plugins.installed_plugins()]
        assert plugins.installed_plugins()[-1] is tiny
    assert tiny not in plugins.installed_plugins()


def test_a_plugin_is_no_captioner_unless_it_says_so():
    """``captioning`` defaults to None (not a captioner), so every plugin written before it keeps
    its behaviour; ``Captioning`` is importable without torch, like the other data classes."""
    assert ModelPlugin().captioning(object()) is None  # type: ignore[arg-type]
    assert plugin_api.Captioning is plugins.Captioning
    assert "Captioning" in plugin_api.__all__ and "Captioning" not in plugin_api._NEEDS_TORCH


def test_captioning_v2_fields_are_optional_so_a_version_1_captioner_still_builds():
    """API v2's captioning additions (generate_recorded, feature_grid, encode, score_attention)
    default to None, and CaptionSteps and CaptionAttention are importable without torch."""
    fields = {"vocabulary": ("<end>",), "end": 0, "feature_layer": "f", "attention_module": "a"}
    captioning = plugin_api.Captioning(**fields, generate=list, score=max, read_attention=tuple)  # type: ignore[arg-type]
    assert (captioning.generate_recorded, captioning.feature_grid, captioning.encode, captioning.score_attention) == (
        None,
        None,
        None,
        None,
    )
    for name in ("CaptionSteps", "CaptionAttention"):
        assert name in plugin_api.__all__ and name not in plugin_api._NEEDS_TORCH
        assert getattr(plugin_api, name) is getattr(plugins, name)
