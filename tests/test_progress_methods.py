"""Progress of the methods that cost many forwards: the Python API's callback counts the images the
model really scores, up to the total; ``run`` shows a bar on a terminal's stderr, nothing when
stderr is piped or with --quiet."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import attnexplain
from attnexplain.options import MethodOptions

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
CAM_METHODS = ("scorecam", "sscam", "iscam", "ablationcam", "smoothgradcampp")
SLOW_METHODS = CAM_METHODS + (
    "occlusion",
    "rise",
    "integrated_gradients",
    "smoothgrad",
    "gradientshap",
    "feature_ablation",
    "kernelshap",
    "lime",
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread is as fast, and far faster on a machine whose cores are busy."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_photo(photo):
    from PIL import Image

    return np.asarray(Image.open(photo).convert("RGB").resize((48, 32)))


@pytest.mark.parametrize("method", SLOW_METHODS)
def test_callback_counts_the_images_the_model_scores_up_to_the_total(method, small_resnet, small_photo):
    # The model's own count: rows out of its last layer, whatever calls it (Captum included).
    scored = []
    hook = small_resnet.fc.register_forward_hook(lambda module, inputs, output: scored.append(output.shape[0]))
    calls: list[tuple[int, int]] = []
    try:
        attnexplain.explain(
            small_resnet,
            small_photo,
            method,
            layer="layer1" if method in CAM_METHODS else None,
            size=32,
            # SS-CAM and IS-CAM score every channel once per sample: 2 samples are 128 images.
            options=MethodOptions(samples=2 if method in ("sscam", "iscam") else 6, steps=5, batch_size=4),
            progress=lambda done, total: calls.append((done, total)),
        )
    finally:
        hook.remove()
    done = [d for d, _ in calls]
    totals = [t for _, t in calls]
    # It moves: more than a start and an end (GradientSHAP scores an image's copies in one call).
    assert len(calls) >= (2 if method == "gradientshap" else 3)
    assert done == sorted(done) and totals == sorted(totals)
    assert all(d <= t for d, t in calls)
    assert calls[-1][0] == calls[-1][1]  # ends at the total
    # The total is the work done: every image the model scored but the prediction's and the
    # gradient's own forward.
    assert calls[-1][1] <= sum(scored) <= calls[-1][1] + 2, (calls[-1], sum(scored))


def test_a_fast_method_and_no_callback_report_nothing(small_resnet, small_photo, capfd):
    calls = []
    attnexplain.explain(small_resnet, small_photo, "gradcam", size=32, progress=lambda d, t: calls.append((d, t)))
    assert calls == []  # one forward and one backward: nothing to follow
    attnexplain.explain(small_resnet, small_photo, "scorecam", layer="layer1", size=32)
    assert capfd.readouterr().err == ""  # no callback: the API shows nothing


class _Terminal:
    """A pseudo-terminal: ``stream`` writes to its slave side (isatty() is true), a thread drains
    the master side into ``text``."""

    def __init__(self) -> None:
        master, slave = pty.openpty()
        self.stream = open(slave, "w", encoding="utf-8", closefd=True)
        self.master = master
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self.chunks.append(data)

    def text(self) -> str:
        self.stream.flush()
        self.stream.close()
        self.reader.join(timeout=10)
        os.close(self.master)
        return b"".join(self.chunks).decode("utf-8", "replace")


def _run(monkeypatch, stderr, *extra: str, out: Path) -> int:
    """``attnexplain run`` in this process, its stderr ``stderr``."""
    from attnexplain.cli import main

    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setenv("TERM", "xterm")
    model, image = SAMPLES / "models" / "resnet-composites.pt", SAMPLES / "images" / "cat-on-grass.png"
    arguments = ["run", str(model), str(image), "--method", "scorecam", "--layer", "layer1", "--size", "64"]
    arguments += ["--out", str(out)]
    try:
        main([*arguments, "--batch-size", "16", *extra], standalone_mode=False)
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


def test_run_shows_progress_on_a_terminal_only(monkeypatch, tmp_path, capsys):
    terminal = _Terminal()
    assert _run(monkeypatch, terminal.stream, out=tmp_path / "tty") == 0
    shown = terminal.text()
    # layer1 of the sample ResNet has 64 channels: 64 masked images, the bar ends full.
    assert "scorecam" in shown and "64/64" in shown and "100%" in shown
    assert re.search(r"(?<!\d)(16|32|48)/64", shown)  # and it moved on the way

    piped = io.StringIO()  # not a terminal: a log, a pipe
    assert _run(monkeypatch, piped, out=tmp_path / "piped") == 0
    assert "/64" not in piped.getvalue() and "forwards" not in piped.getvalue()

    quiet = _Terminal()
    assert _run(monkeypatch, quiet.stream, "--quiet", out=tmp_path / "quiet") == 0
    assert "/64" not in quiet.text()
    assert (tmp_path / "quiet" / "cat-on-grass" / "report.json").exists()


@pytest.mark.heavy
def test_run_under_a_real_terminal_shows_the_bar_and_piped_shows_none(tmp_path):
    """The command as a person runs it, its stderr a pseudo-terminal, then a pipe."""
    model, image = SAMPLES / "models" / "resnet-composites.pt", SAMPLES / "images" / "cat-on-grass.png"
    command = [sys.executable, "-m", "attnexplain", "run", str(model), str(image), "--method", "scorecam"]
    command += ["--layer", "layer1"]
    env = dict(os.environ, TERM="xterm", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    master, slave = pty.openpty()
    process = subprocess.Popen([*command, "--out", str(tmp_path / "a")], stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert process.wait(timeout=300) == 0
    assert "64/64" in b"".join(chunks).decode("utf-8", "replace")
    piped = subprocess.run([*command, "--out", str(tmp_path / "b")], capture_output=True, text=True, env=env)
    assert piped.returncode == 0 and "/64" not in piped.stderr
