"""Shared fixtures: small real models and real photos, made offline."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

# Never try to download weights from tests, and never touch the user's torch cache.
os.environ["ATTNEXPLAIN_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
sys.path.insert(0, str(SAMPLES))  # samples/composites.py: the sample data, importable by tests


@pytest.fixture(autouse=True)
def _isolated_torch_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.getbasetemp() / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    # The listings' catalog cache, kept out of the user's home as torch's is.
    monkeypatch.setenv("ATTNEXPLAIN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "attnexplain-cache"))


@pytest.fixture(scope="session")
def photo(tmp_path_factory) -> Path:
    """Chelsea the cat, a real photo bundled with scikit-image (CC0)."""
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("photos") / "chelsea.jpg"
    Image.fromarray(data.chelsea()).save(path, quality=92)
    return path


@pytest.fixture(scope="session")
def small_resnet():
    """A torchvision ResNet-18 with 5 classes and fixed random weights, in eval mode."""
    import torch
    import torchvision

    torch.manual_seed(0)
    return with_random_batchnorm_statistics(torchvision.models.resnet18(num_classes=5).eval())


@pytest.fixture(scope="session")
def plain_cnn():
    """A small VGG-style CNN, every module called once (what Captum's DeepLift and LRP need), 5 classes."""
    import torch
    from torch import nn

    class PlainCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )
            self.pool = nn.AdaptiveAvgPool2d(4)
            self.classifier = nn.Sequential(nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 5))

        def forward(self, x):
            return self.classifier(torch.flatten(self.pool(self.features(x)), 1))  # as VGG flattens

    torch.manual_seed(2)
    return PlainCNN().eval()


def with_random_batchnorm_statistics(model):
    """``model`` with random BatchNorm statistics, so that activations are not trivially uniform."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="session")
def small_vit():
    """A small torchvision VisionTransformer (64 px, 8 px patches, 3 layers) with random weights."""
    import torch
    import torchvision

    torch.manual_seed(1)
    model = torchvision.models.VisionTransformer(
        image_size=64, patch_size=8, num_layers=3, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=6
    ).eval()
    with torch.no_grad():  # torchvision zero-initialises the head; give it real values
        model.heads.head.weight.normal_(0, 0.2)
    return model


@pytest.fixture(scope="session")
def resnet_state_dict_file(small_resnet, tmp_path_factory) -> Path:
    import torch

    path = tmp_path_factory.mktemp("models") / "resnet18-5.pt"
    torch.save(small_resnet.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def sample_resnet_file() -> Path:
    return SAMPLES / "models" / "resnet-composites.pt"


@pytest.fixture(scope="session")
def sample_vit_file() -> Path:
    return SAMPLES / "models" / "vit-composites.pt"


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def sobel_edges(images):
    """(B, H, W) edge strength of (B, 3, H, W) inputs: a map that is the same whatever the model's
    weights, the classic map the randomization check must flag."""
    import torch

    kernel = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    gray = images.float().mean(1, keepdim=True)
    gx = torch.nn.functional.conv2d(gray, kernel[None, None], padding=1)
    gy = torch.nn.functional.conv2d(gray, kernel.t()[None, None], padding=1)
    return (gx**2 + gy**2).sqrt()[:, 0]


def read_gallery_data(out: Path) -> dict:
    """What a batch's gallery-data.js holds (the gallery's records, as the pages read them)."""
    import json

    script = (out / "gallery-data.js").read_text(encoding="utf-8")
    prefix = "window.attnexplainGallery = "
    assert script.startswith(prefix) and script.rstrip().endswith(";")
    return json.loads(script[len(prefix) :].rstrip().rstrip(";"))


def without_blocking(call, fifo: Path, seconds: float = 30.0):
    """``call()``'s result (or its exception), failing the test where it blocks on the FIFO
    ``fifo`` (opened for reading, which waits for a writer for ever): a thread calls it, and after
    ``seconds`` a writer opens and closes the FIFO so that the blocked reader, and the test, end."""
    import threading

    outcome: dict = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the reader gets end-of-file
        thread.join(seconds)
        pytest.fail(f"blocked on the FIFO {fifo} for {seconds:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture
def gallery_images():
    """The image names of a batch's gallery, from its data script."""
    return lambda out: [row[0] for row in read_gallery_data(out)["images"]]
