"""A batch's last line says what was explained now and what an earlier run's records gave
(``--resume``), in the command's real wall time, the model's loading included."""

from __future__ import annotations

import re
import time

import numpy as np
from click.testing import CliRunner
from PIL import Image

from attnexplain.cli import main
from attnexplain.model_spec import ModelSpec


def _batch(model, photos, out, *extra: str):
    arguments = ["batch", str(model), str(photos), "--out", str(out), "--arch", "resnet18", "--size", "32"]
    done = CliRunner().invoke(main, [*arguments, "--device", "cpu", *extra])
    assert done.exit_code == 0, done.output
    return done.stderr.strip().splitlines()[-1]


def test_a_resumed_batch_says_what_it_reused_and_its_real_wall_time(resnet_state_dict_file, tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    generator = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray(generator.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(photos / f"img{index}.png")
    out = tmp_path / "out"
    first = _batch(resnet_state_dict_file, photos, out)
    assert re.match(
        r"2 explained \(0 from an earlier run\), 0 failed, in [\d.]+s: loading the model [\d.]+s, 2 images in "
        r"[\d.]+s \([\d.]+ images/s\)\. Gallery: ",
        first,
    ), first
    # Loading the model takes a second more: the wall time reported counts it.
    load = ModelSpec.load
    monkeypatch.setattr(ModelSpec, "load", lambda self: time.sleep(1.0) or load(self))
    resumed = _batch(resnet_state_dict_file, photos, out, "--resume")
    found = re.match(
        r"2 explained \(2 from an earlier run\), 0 failed, in ([\d.]+)s: loading the model ([\d.]+)s, nothing left "
        r"to explain \(every image reused from the earlier run\)\. Gallery: ",
        resumed,
    )
    assert found, resumed
    wall, loading = map(float, found.groups())
    assert loading >= 1.0 and wall >= loading
