"""Batches explained at once on replicas of the model (attnexplain.replicas, batch --parallel-batches)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from attnexplain.batch import run_batch
from attnexplain.batch_stages import BatchSettings
from attnexplain.cli import main
from attnexplain.errors import AttnExplainError
from attnexplain.explanation import MethodOptions
from attnexplain.formats import RESULTS_JSONL
from attnexplain.loading import load_model
from attnexplain.ray_engine import RayCluster
from attnexplain.records import read_results
from attnexplain.replicas import ModelReplicas, available_memory, default_parallel_batches, replicate


class TiedNet(nn.Module):
    """A small CNN whose head reuses the embedding's weight (tied parameters) and holds a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.embed = nn.Linear(8, 8)
        self.head = nn.Linear(8, 8)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.ones(1))

    def forward(self, x):
        return self.head(self.embed(self.features(x).mean(dim=(2, 3)))) * self.scale


def test_a_replica_shares_the_weights_but_not_their_flags_or_buffers():
    torch.manual_seed(0)
    model = TiedNet().eval()
    copy = replicate(model)
    assert copy is not None and copy is not model
    for (name, original), (_, replica) in zip(model.named_parameters(), copy.named_parameters()):
        assert replica is not original, name
        assert replica.data_ptr() == original.data_ptr(), name  # the same memory: no second model
    assert copy.head.weight is copy.embed.weight  # tied in the original, tied in the replica
    copy.features[0].weight.requires_grad_(False)  # a pass freezing its replica's parameters...
    assert model.features[0].weight.requires_grad  # ...leaves the original's alone
    assert copy.scale.data_ptr() != model.scale.data_ptr()  # buffers are the replica's own
    batch = torch.rand(2, 3, 8, 8)
    assert torch.equal(copy(batch), model(batch))


class Unpicklable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.lock = threading.Lock()  # copy.deepcopy refuses locks

    def forward(self, x):
        return self.layer(x.mean(dim=(2, 3)))


class Closures(nn.Module):
    """Keeps a lambda over ``self``: a deepcopy shares the function, whose ``self`` is the original."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.block = lambda x: torch.relu(self.conv(x))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.block(x).mean(dim=(2, 3)))


def test_a_model_that_cannot_be_its_own_replica_runs_one_batch_at_a_time():
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 2, 1)).eval())
    assert replicate(scripted) is None
    assert replicate(nn.Sequential(nn.Conv2d(3, 2, 1), scripted)) is None  # TorchScript inside
    assert replicate(Unpicklable()) is None
    assert replicate(Closures()) is None  # its replica would run the original's layers
    hooked = nn.Linear(3, 2)
    seen = []
    hooked.register_forward_hook(lambda module, args, output: seen.append(output))  # a closure
    assert replicate(hooked) is None
    kept_function = nn.Sequential(nn.Linear(3, 2))
    kept_function.activation = torch.relu  # a function without a closure is the same in any copy
    assert replicate(kept_function) is not None
    loaded = load_model(Unpicklable())
    with ModelReplicas(loaded, 2) as replicas:
        assert replicas.count == 1
        assert replicas.submit(lambda model: threading.current_thread()).result() is threading.current_thread()
    assert default_parallel_batches("cpu", 2) == 2
    assert default_parallel_batches("cpu", 1) == 1  # OMP_NUM_THREADS=1 or one core: the user's limit holds
    assert default_parallel_batches("cuda", 16) == 1


@pytest.fixture(params=["torch's own", 3])
def torch_threads(request):
    """torch's thread count as the process has it, and an odd one."""
    before = torch.get_num_threads()
    if isinstance(request.param, int):
        torch.set_num_threads(request.param)
    yield torch.get_num_threads()
    torch.set_num_threads(before)


def test_replicas_run_at_once_each_on_its_share_of_the_threads(torch_threads):
    """Two batches meet at a barrier inside the forward: only two that really run at the same time
    get past it (one replica after the other would wait out the barrier's timeout and fail)."""
    threads_before = torch_threads
    meeting = threading.Barrier(2, timeout=30)
    seen: list[tuple[str, int]] = []

    class Meeting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(3, 2)

        def forward(self, x):
            seen.append((threading.current_thread().name, torch.get_num_threads()))
            meeting.wait()
            return self.layer(x)

    loaded = load_model(Meeting())
    with ModelReplicas(loaded, 2) as replicas:
        assert replicas.count == 1  # until the first has shown that a second one fits in memory
        alone = replicas.submit(lambda model: torch.get_num_threads()).result()
        assert replicas.count == 2  # a Linear layer's batch fits
        futures = [replicas.submit(lambda model, x: model.module(x), torch.rand(1, 3)) for _ in range(2)]
        outputs = [future.result() for future in futures]
    assert alone == threads_before  # the first function, alone, on all of torch's threads
    assert [tuple(output.shape) for output in outputs] == [(1, 2), (1, 2)]
    assert len({name for name, _ in seen}) == 2
    assert all(name.startswith("attnexplain-model") for name, _ in seen)
    assert sorted(threads for _, threads in seen) == sorted(
        [max(1, threads_before // 2), max(1, threads_before - threads_before // 2)]
    )
    # Restored for the rest of the process: a thread that first uses torch now gets the count the
    # process had (torch gives it the last count set on any thread, a replica's without the restore).
    later: list[int] = []
    fresh = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    fresh.start()
    fresh.join()
    assert later == [threads_before]
    assert not loaded.module._forward_pre_hooks  # the stop checks are gone with the replicas


def test_leaving_stops_a_batch_that_is_still_running():
    """An interrupted run does not wait for the batch a replica explains: it stops at its next
    layer. Without the stop, the loop below runs to its end and returns its count."""
    loaded = load_model(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)).eval())
    started = threading.Event()

    def endless(model, x):
        for calls in range(200_000):
            model.module(x)
            started.set()
        return calls

    with ModelReplicas(loaded, 2) as replicas:
        running = replicas.submit(endless, torch.rand(1, 3))
        assert started.wait(30)
    assert running.done()
    assert running.exception() is not None and not isinstance(running.exception(), Exception)


def _photos(folder: Path, count: int) -> Path:
    from skimage import data

    folder.mkdir(parents=True)
    sources = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    for index in range(count):
        photo = Image.fromarray(sources[index % len(sources)])
        side = 96 + 24 * index
        photo.thumbnail((side, side))
        photo.save(folder / f"photo{index}.jpg", quality=90)
    return folder


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory) -> Path:
    import torchvision
    from conftest import with_random_batchnorm_statistics

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("replicas-model") / "resnet18.pt"
    model = with_random_batchnorm_statistics(torchvision.models.resnet18(num_classes=6).eval())
    torch.save(model.state_dict(), path)
    return path


def test_parallel_batches_give_the_maps_of_one_batch_at_a_time(tmp_path, resnet_file):
    """A state_dict saved to disk and loaded back, real photos of several sizes, three batches; a
    method drawing from the global generators (GradientSHAP, through Captum) among them: two at
    once on replicas write what one at a time writes."""
    photos = _photos(tmp_path / "in", 6)
    loaded = load_model(resnet_file, arch="resnet18")
    spec = {"model": str(resnet_file), "arch": "resnet18"}
    outs = {}
    for parallel in (1, 2):
        settings = BatchSettings(
            method="gradcam,gradientshap,occlusion",
            size=(48, 48),
            images_per_batch=2,
            workers=1,
            parallel_batches=parallel,
            options=MethodOptions(samples=4),
        )
        outs[parallel] = tmp_path / f"out{parallel}"
        summary = run_batch(loaded, spec, [str(photos)], outs[parallel], settings, quiet=True)
        assert (summary.ok, summary.failed) == (6, 0)
    assert [json.loads((outs[p] / "report.json").read_text())["run"]["parallel_batches"] for p in (1, 2)] == [
        1,
        2,
    ]  # two replicas did run
    records = [{r["image"]: r for r in read_results(outs[p] / RESULTS_JSONL)} for p in (1, 2)]
    assert set(records[0]) == set(records[1]) and len(records[0]) == 6
    for image, one in records[0].items():
        two = records[1][image]
        assert one["key"] == two["key"]  # --parallel-batches is not part of the fingerprint
        assert [p["index"] for p in one["predictions"]] == [p["index"] for p in two["predictions"]]
        for method, files in one["files"].items():
            heatmaps = [np.load(outs[p] / one["output"] / files["heatmap"]) for p in (1, 2)]
            assert np.allclose(*heatmaps, atol=1e-5), (image, method)


def test_a_second_batch_starts_only_if_it_fits_in_memory(tmp_path, resnet_file, monkeypatch):
    """The first batch runs alone and measures what it took; with no memory to spare (Score-CAM on
    ResNet-50 two at once was killed for memory on a 24 GB machine) the run goes on one batch at a
    time, and says so."""
    import attnexplain.replicas

    monkeypatch.setattr(attnexplain.replicas, "available_memory", lambda: 0)
    with ModelReplicas(load_model(nn.Linear(3, 2)), 2) as replicas:
        threads = [replicas.submit(lambda model: torch.get_num_threads()).result() for _ in range(3)]
    assert replicas.count == 1
    assert threads == [torch.get_num_threads()] * 3  # one at a time, each on all of torch's threads
    photos = _photos(tmp_path / "in", 4)
    settings = BatchSettings(
        method="gradcam", size=(32, 32), images_per_batch=1, workers=1, parallel_batches=2, options=MethodOptions()
    )
    spec = {"model": str(resnet_file), "arch": "resnet18"}
    summary = run_batch(
        load_model(resnet_file, arch="resnet18"), spec, [str(photos)], tmp_path / "out", settings, quiet=True
    )
    assert (summary.ok, summary.failed) == (4, 0)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["run"]["parallel_batches"] == 1


@pytest.mark.parametrize(
    "limit_file, usage_file, unlimited",
    [
        ("memory.max", "memory.current", "max"),  # cgroup v2
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "9223372036854771712"),  # v1
    ],
)
def test_available_memory_keeps_to_a_containers_limit(tmp_path, monkeypatch, limit_file, usage_file, unlimited):
    import attnexplain.replicas

    monkeypatch.setattr(attnexplain.replicas, "CGROUP_ROOT", tmp_path)
    (tmp_path / "memory").mkdir()
    (tmp_path / limit_file).write_text("3000000\n")
    (tmp_path / usage_file).write_text("1000000\n")
    assert available_memory() == 2_000_000  # the container's limit, far below the machine's memory
    (tmp_path / limit_file).write_text(unlimited + "\n")
    assert available_memory() > 2_000_000  # no limit: what the machine has
    (tmp_path / limit_file).unlink()
    assert available_memory() > 2_000_000  # not in a container


def test_a_model_with_torchscript_inside_is_explained_one_batch_at_a_time(tmp_path):
    """TorchScript modules take no hooks: such a model runs as before, with a full report, and its
    modules keep no hook of the replicas'."""
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        torch.jit.script(nn.Sequential(nn.ReLU())),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()
    photos = _photos(tmp_path / "in", 3)
    settings = BatchSettings(
        method="saliency", size=(32, 32), images_per_batch=1, workers=1, parallel_batches=2, options=MethodOptions()
    )
    summary = run_batch(
        load_model(module), {"model": "scripted-inside"}, [str(photos)], tmp_path / "out", settings, quiet=True
    )
    assert (summary.ok, summary.failed) == (3, 0)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["run"]["parallel_batches"] == 1 and report["run"]["complete"] is True
    assert not any(m._forward_pre_hooks for m in module.modules() if not isinstance(m, torch.jit.ScriptModule))


def test_parallel_batches_option(tmp_path, resnet_file):
    photos = _photos(tmp_path / "in", 3)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "batch",
            str(resnet_file),
            str(photos),
            "--arch",
            "resnet18",
            "--size",
            "32",
            "--images-per-batch",
            "1",
            "--parallel-batches",
            "2",
            "--quiet",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert len([r for r in read_results(out / RESULTS_JSONL) if r["status"] == "ok"]) == 3
    for wrong, says in (
        (["--parallel-batches", "0"], "0 is not in the range x>=1"),
        (["--parallel-batches", "2", "--engine", "ray"], "--parallel-batches is for --engine local"),
    ):
        result = CliRunner().invoke(
            main,
            ["batch", str(resnet_file), str(photos), "--arch", "resnet18", "--out", str(tmp_path / "refused"), *wrong],
        )
        assert result.exit_code == 2 and says in result.output, result.output
        assert not (tmp_path / "refused").exists()
    settings = BatchSettings(parallel_batches=2, options=MethodOptions())
    with pytest.raises(AttnExplainError, match="parallel_batches is for the local engine"):
        run_batch(
            load_model(resnet_file, arch="resnet18"),
            {"model": str(resnet_file), "arch": "resnet18"},
            [str(photos)],
            tmp_path / "refused",
            settings,
            cluster=RayCluster(),
        )
    assert not (tmp_path / "refused").exists()
