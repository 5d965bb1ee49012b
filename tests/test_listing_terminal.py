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
    """An empty cache folder of the test's own (every plugin asked again, as after an install)."""
    catalog._live_catalog.cache_clear()
    folder = tmp_path / "cache"
    monkeypatch.setenv(plugin_cache.CACHE_ENV, str(folder))
    return folder


def _on_a_terminal(code: str, cache, columns: int = 100, stream: str = "stdout") -> tuple[str, str]:
    """Run ``code`` in a new Python with its ``stream`` (stdout or stderr) a pseudo-terminal
    ``columns`` wide: what it wrote there (colours, cursor moves and carriage returns removed) and
    on the other stream (a pipe)."""
    leader, follower = pty.openpty()
    env = {
        **os.environ,
        plugin_cache.CACHE_ENV: str(cache),
        "PYTHONPATH": os.pathsep.join(sys.path),
        "COLUMNS": str(columns),
        "TERM": "xterm",
    }
    env.pop("NO_COLOR", None)
    streams = (
        {"stdout": follower, "stderr": subprocess.PIPE}
        if stream == "stdout"
        else {"stdout": subprocess.PIPE, "stderr": follower}
    )
    process = subprocess.Popen([sys.executable, "-c", code], env=env, text=True, **streams)
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
    piped = process.stderr if stream == "stdout" else process.stdout
    other = piped.read() if piped else ""
    assert process.wait(timeout=300) == 0, other
    os.close(leader)
    shown = b"".join(chunks).decode()
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown).replace("\r\n", "\n").replace("\r", "\n"), other


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
    assert max(map(len, lines)) <= 100 and "Reading" not in shown + stderr  # the cache answered
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


def test_layers_probe_shapes_on_the_meta_device_and_compute_nothing(resnet_state_dict_file):
    """`attnexplain layers` reads every shape from one forward on meta tensors (the probe `run`
    uses): no layer of the model sees a real tensor."""
    import torch
    from click.testing import CliRunner

    from attnexplain.cli import main

    devices = []

    def record(module, args):
        devices.extend(arg.device.type for arg in args if isinstance(arg, torch.Tensor))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        arguments = ["layers", str(resnet_state_dict_file), "--arch", "resnet18", "--size", "64", "--json"]
        result = CliRunner().invoke(main, arguments)
    finally:
        handle.remove()
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["layers"][-1] == {
        "name": "layer4",
        "type": "Sequential",
        "shape": [1, 512, 2, 2],
        "map_shape": [1, 512, 2, 2],
        "default": True,
    }
    assert devices and set(devices) == {"meta"}


def test_the_first_listing_says_which_catalogs_it_reads_on_a_terminal_only(fresh_cache):
    listing = (
        "from attnexplain.cli import main\nmain.main(['models', '--plugin', 'attention-cnn'], standalone_mode=False)"
    )
    said, listed = _on_a_terminal(listing, fresh_cache, stream="stderr")
    assert "Reading plugin attention-cnn's model catalog (1 of 1; cached for later listings)..." in said
    words = " ".join(said.split())
    assert re.search(r"Read the model catalog of 1 plugin \(attention-cnn\) in \d+\.\d s; later listings read", words)
    assert [line.split()[0] for line in listed.splitlines()[1:]] == ["AttentionPoolingCNN", "CBAMCNN"]
    said, _ = _on_a_terminal(listing, fresh_cache, stream="stderr")  # cached: nothing to say
    assert said.strip() == ""
    # Piped, the first listing says nothing either (stderr is a pipe).
    env = {**os.environ, plugin_cache.CACHE_ENV: str(fresh_cache / "another"), "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", listing], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stderr == ""
    assert "AttentionPoolingCNN" in done.stdout
