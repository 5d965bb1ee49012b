"""batch keeps the model's thread fed: decoding runs ahead of the model, writing behind it, and
neither the reports nor the workers' number are the model thread's business.

The model here is a device that costs no CPU (its forward waits, as a GPU's does). Overlap is shown
by a rendezvous: forward k waits until the decoding of batch k+1 and the writing of batch k-1 have
started, and those wait until forward k has started. Only stages that run at the same time get
past both waits; a pipeline that runs them one after another waits out the timeouts, and the
recorded order of events says so. Nothing here asserts on a duration.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import attnexplain.batch as batch
from attnexplain.batch import available_cores, default_workers, run_batch
from attnexplain.batch_ledger import RunLedger
from attnexplain.batch_stages import BatchSettings
from attnexplain.explanation import MethodOptions
from attnexplain.formats import RESULTS_JSONL
from attnexplain.loading import LoadedModel, _finish
from attnexplain.records import read_results

PER_BATCH = 4
BATCHES = 4
#: How long a forward waits for the overlap before it gives up (the test then fails on the order).
PATIENCE_S = 20.0


class Recorder:
    """Events of each batch's first image and of each forward, in the order they happened, from
    every thread; one flag per (event, batch) to wait for."""

    def __init__(self, names: list[str]) -> None:
        ordered = sorted(names)
        self.batch_of = {name: index // PER_BATCH for index, name in enumerate(ordered)}
        self.firsts = set(ordered[::PER_BATCH])
        self.events: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.flags: dict[tuple[str, int], threading.Event] = {}

    def flag(self, event: str, batch_index: int) -> threading.Event:
        with self.lock:
            return self.flags.setdefault((event, batch_index), threading.Event())

    def record(self, event: str, batch_index: int) -> None:
        with self.lock:
            self.events.append((event, batch_index))
        self.flag(event, batch_index).set()

    def first(self, event: str, batch_index: int) -> int:
        return self.events.index((event, batch_index))

    def stage(self, name: str, image: str, meet: int, work):
        """Run ``work`` as the stage ``name`` of ``image``; the first image of its batch records
        its start and end and, in between, waits for forward ``meet`` to start."""
        batch_index = self.batch_of[image]
        if image not in self.firsts:
            return work()
        self.record(f"{name}-start", batch_index)
        if 0 <= meet < BATCHES:
            self.flag("forward-start", meet).wait(PATIENCE_S)
        try:
            return work()
        finally:
            self.record(f"{name}-end", batch_index)


class WaitingNet(torch.nn.Module):
    """A small CNN whose forward on batch k waits until batch k+1's decoding and batch k-1's
    writing have started."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU()
        )
        self.head = torch.nn.Linear(8, 5)
        self.recorder = recorder
        self.forwards = 0

    def forward(self, x):
        real = x.device.type != "meta"  # the default-layer probe runs on the meta device
        if real:
            index, self.forwards = self.forwards, self.forwards + 1
            self.recorder.record("forward-start", index)
            if index + 1 < BATCHES:
                self.recorder.flag("decode-start", index + 1).wait(PATIENCE_S)
            if index > 0:
                self.recorder.flag("write-start", index - 1).wait(PATIENCE_S)
        result = self.head(self.features(x).mean(dim=(2, 3)))
        if real:
            self.recorder.record("forward-end", index)
        return result


@pytest.fixture
def photos(tmp_path) -> Path:
    rng = np.random.default_rng(3)
    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(PER_BATCH * BATCHES):
        pixels = rng.integers(0, 255, (40 + index, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"photo{index:02d}.jpg", quality=90)
    return folder


def _recorded_run(photos: Path, out: Path, monkeypatch, workers: int | None) -> Recorder:
    recorder = Recorder([path.name for path in photos.iterdir()])
    read_image, write_image = batch.read_image, batch.write_image

    def reading(item, *args, **kwargs):  # batch k+1 meets forward k
        return recorder.stage(
            "decode", item.relative, recorder.batch_of[item.relative] - 1, lambda: read_image(item, *args, **kwargs)
        )

    def writing(out_folder, decoded, *args, **kwargs):  # batch k-1 meets forward k
        image = decoded.item.relative
        return recorder.stage(
            "write", image, recorder.batch_of[image] + 1, lambda: write_image(out_folder, decoded, *args, **kwargs)
        )

    monkeypatch.setattr(batch, "read_image", reading)
    monkeypatch.setattr(batch, "write_image", writing)
    torch.manual_seed(0)
    loaded = LoadedModel(WaitingNet(recorder), "waiting-net", "module")
    _finish(loaded, None, "cpu")
    settings = BatchSettings(
        method="gradcam", size=(32, 32), images_per_batch=PER_BATCH, workers=workers, options=MethodOptions()
    )
    result = run_batch(loaded, {"model": "waiting-net"}, [str(photos)], out, settings, quiet=True, device="cpu")
    assert (result.ok, result.failed) == (PER_BATCH * BATCHES, 0)
    return recorder


@pytest.mark.parametrize("workers", [1, None])
def test_next_batch_decodes_and_last_batch_writes_while_the_model_runs(photos, tmp_path, monkeypatch, workers):
    recorder = _recorded_run(photos, tmp_path / "out", monkeypatch, workers)
    for index in range(BATCHES):
        started, ended = recorder.first("forward-start", index), recorder.first("forward-end", index)
        if index + 1 < BATCHES:  # the next batch was being decoded while this one ran
            assert recorder.first("decode-start", index + 1) < ended, recorder.events
            assert recorder.first("decode-end", index + 1) > started, recorder.events
        if index > 0:  # and the previous one written
            assert recorder.first("write-start", index - 1) < ended, recorder.events
            assert recorder.first("write-end", index - 1) > started, recorder.events
        # Writes wait for their batch's maps: none of batch k starts before forward k ends.
        assert recorder.first("write-start", index) > ended, recorder.events
    records = read_results(tmp_path / "out" / RESULTS_JSONL)
    assert sorted(r["image"] for r in records) == sorted(p.name for p in photos.iterdir())
    assert all((tmp_path / "out" / r["output"] / "detail.html").is_file() for r in records)


def test_periodic_reports_are_refreshed_off_the_model_thread(photos, tmp_path, monkeypatch):
    threads: list[str] = []
    refresh = RunLedger.refresh

    def recording(self, complete: bool) -> None:
        threads.append(threading.current_thread().name)
        refresh(self, complete)

    monkeypatch.setattr(RunLedger, "refresh", recording)
    loaded = LoadedModel(
        torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(4, 3),
        ),
        "small",
        "module",
    )
    _finish(loaded, None, "cpu")
    settings = BatchSettings(method="gradcam", size=(32, 32), images_per_batch=2, workers=1, options=MethodOptions())
    run_batch(
        loaded, {"model": "small"}, [str(photos)], tmp_path / "out", settings, quiet=True, device="cpu", refresh_every=1
    )
    periodic, final = threads[:-1], threads[-1]
    assert periodic and all(name.startswith("attnexplain-report") for name in periodic)
    assert final == threading.main_thread().name  # the last one, after every write, complete


def test_worker_count_follows_the_cores_and_the_device():
    assert available_cores() == len(os.sched_getaffinity(0))
    # The model's threads take the CPU's cores; a GPU leaves them to decoding and writing.
    assert [default_workers("cpu", cores) for cores in (1, 2, 8, 16, 64)] == [2, 2, 2, 4, 16]
    assert [default_workers("cuda", cores) for cores in (1, 2, 8, 16, 64)] == [2, 2, 3, 7, 31]
