"""The listings as a person reads them on a terminal: `attnexplain methods` at once (no torch, a
plugin's methods read from the cache) in blocks that fit 100 columns, checked under a pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys

import pytest

from attnexplain import catalog, plugin_cache
from attnexplain.methods import METHODS
from attnexplain.plugins import plugin_infos


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache of the test's own, and no catalog remembered from an earlier test."""
    monkeypatch.setenv(plugin_cache.CACHE_ENV, str(tmp_path / "cache"))
    catalog._live_catalog.cache_clear()
    yield tmp_path / "cache"
    catalog._live_catalog.cache_clear()


def _on_a_terminal(code: str, cache, columns: int = 100) -> tuple[str, str]:
    """Run ``code`` in a new Python with its stdout a pseudo-terminal ``columns`` wide: what it
    wrote there (colours and carriage returns removed) and on its stderr (a pipe)."""
    leader, follower = pty.openpty()
    env = {
        **os.environ,
        plugin_cache.CACHE_ENV: str(cache),
        "PYTHONPATH": os.pathsep.join(sys.path),
        "COLUMNS": str(columns),
        "TERM": "xterm",
    }
    env.pop("NO_COLOR", None)
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=follower, stderr=subprocess.PIPE, env=env, text=True
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal is closed once the process has ended
            break
        if not chunk:
            break
        chunks.append(chunk)
    stderr = process.stderr.read() if process.stderr else ""
    assert process.wait(timeout=120) == 0, stderr
    os.close(leader)
    shown = b"".join(chunks).decode()
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown).replace("\r", ""), stderr


def test_methods_answer_without_torch_in_blocks_that_fit_100_columns(fresh_cache):
    listed, _ = catalog.method_listing()  # fills the cache: the plugins are asked once
    assert any(method["plugin"] == "attention-cnn" for method in listed)
    probe = (
        "import sys\nfrom attnexplain.cli import main\n"
        "main.main(['methods'], standalone_mode=False)\n"
        "print(sorted(name for name in ('torch', 'torchvision', 'timm', 'captum') if name in sys.modules), "
        "file=sys.stderr)"
    )
    shown, stderr = _on_a_terminal(probe, fresh_cache)
    assert stderr.split() == ["[]"]  # no torch, torchvision, timm nor Captum imported
    lines = shown.splitlines()
    assert max(map(len, lines)) <= 100
    assert lines[0] == "Explanation methods (--method NAME[,NAME...])"
    headers = [line.split()[0] for line in lines if line and not line.startswith(" ")][1:]
    assert headers == [method["name"] for method in listed]  # one block per method, in the listing's order
    blocks = {block.split()[0]: block for block in shown.split("\n\n")[1:]}
    assert blocks["gradcam"].splitlines() == [
        "gradcam  (cam, gradients, built in)",
        f"  {METHODS['gradcam'].summary}",
        f"  applies to: {METHODS['gradcam'].applies_to}",
        f"  cost:       {METHODS['gradcam'].cost}",
        f"  paper:      {METHODS['gradcam'].paper}",
    ]
    assert blocks["cbam_spatial"].startswith("cbam_spatial  (attention, no gradients, plugin attention-cnn)")
    # A description longer than the terminal wraps under its own indent, every word kept.
    shapley = METHODS["shapleycam"]
    words = " ".join(blocks["shapleycam"].split())
    assert len(blocks["shapleycam"].splitlines()) > 5
    assert f"{shapley.summary} applies to: {shapley.applies_to} cost: {shapley.cost} paper:" in words


def test_a_plugins_methods_are_cached_and_a_hostile_cache_is_rewritten(fresh_cache, monkeypatch):
    info = next(info for info in plugin_infos() if info.name == "attention-cnn")
    first, _ = catalog.method_listing()
    path = fresh_cache / "methods" / next(p.name for p in (fresh_cache / "methods").iterdir() if _holds_cbam(p))
    asked = []
    original = info.plugin.methods
    monkeypatch.setattr(info.plugin, "methods", lambda: asked.append(1) or original())
    assert catalog.method_listing()[0] == first and asked == []  # read from the cache
    key = plugin_cache.cache_key(info)
    record = next(m for m in first if m["name"] == "cbam_spatial")
    forged = {k: v for k, v in record.items() if k != "plugin"}
    for entries in (
        {"methods": [{**forged, "summary": "forged\nline"}], "problem": None},  # would forge a line
        {"methods": [{**forged, "name": "gradcam"}], "problem": None},  # a built-in name
        {"methods": [{**forged, "needs_gradient": "no"}], "problem": None},
        {"methods": [forged]},
        [forged],
    ):
        path.write_text(json.dumps({"key": key, "entries": entries}))
        assert catalog.method_listing()[0] == first
        assert json.loads(path.read_text())["entries"] == {"methods": [forged], "problem": None}
    assert len(asked) == 5


def _holds_cbam(path) -> bool:
    return "cbam_spatial" in path.read_text()


def test_a_plugins_method_named_as_another_plugins_is_refused_from_the_cache_too(monkeypatch):
    from attnexplain.method_registry import refused_plugin_methods

    cbam = next(info.plugin for info in plugin_infos() if info.name == "attention-cnn").methods()[0]
    monkeypatch.setattr(next(i.plugin for i in plugin_infos() if i.name == "timm"), "methods", lambda: [cbam])
    for _ in range(2):  # live, then from the cache
        listed, errors = catalog.method_listing()
        assert errors == refused_plugin_methods()
        assert errors["timm"] == "its method 'cbam_spatial' is plugin attention-cnn's already"
        assert [m["plugin"] for m in listed if m["name"] == "cbam_spatial"] == ["attention-cnn"]
