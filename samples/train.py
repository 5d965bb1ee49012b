"""Train the sample models on object composites, deterministically, on CPU in a few minutes.

    .venv/bin/python samples/train.py [--out samples/models] [--only ARCH]

Writes ``resnet-composites.pt`` (torchvision ResNet, BasicBlock [1, 1, 1, 1]),
``vit-composites.pt`` (torchvision VisionTransformer, 16 px patches at 128 px) and
``attention-cnn-composites.pt`` (the attention-pooling CNN of the example plugin
plugins/attention-cnn, which must be installed: ``pip install -e plugins/attention-cnn``) and
``cbam-composites.pt`` (the same plugin's CBAM CNN) as plain
dicts that load with ``torch.load(path, weights_only=True)``; see samples/README.md for the format.
``--only clip`` trains the sample CLIP instead (samples/train_clip.py: a Hugging Face folder,
``clip-composites/``, for ``--prompt``/``--prompts``).
The reported test accuracy is measured after the fp16 round trip, on what was saved.
``--only captioner`` trains the same plugin's Show, Attend and Tell captioner instead
(``captioner-composites.pt``; samples/train_captioner.py).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import BasicBlock, ResNet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from composites import (
    BACKGROUND_SEED,
    LABELS,
    TEST_SEED,
    TRAIN_SEED,  # noqa: E402
    make_backgrounds,
    make_composites,
)

SIZE = 128
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
THREADS = 2  # fixed, because the thread count can change float summation order

RESNET_KWARGS = {"block": "BasicBlock", "layers": [1, 1, 1, 1], "num_classes": len(LABELS)}
VIT_KWARGS = {
    "image_size": SIZE,
    "patch_size": 16,
    "num_layers": 4,
    "num_heads": 4,
    "hidden_dim": 96,
    "mlp_dim": 192,
    "num_classes": len(LABELS),
}
ATTENTION_CNN_KWARGS = {
    "channels": [32, 64, 128],
    "convs_per_stage": 2,
    "attention_dim": 64,
    "dropout": 0.1,
    "image_size": SIZE,
    "num_classes": len(LABELS),
}
CBAM_KWARGS = {"channels": [16, 32, 64, 96], "reduction": 8, "image_size": SIZE, "num_classes": len(LABELS)}
#: Short names accepted by --only besides the architecture names.
ALIASES = {"attention-cnn": "AttentionPoolingCNN", "cbam": "CBAMCNN"}
#: Convolutional models: trained channels-last (faster convolutions on CPU).
CONVOLUTIONAL = ("ResNet", "AttentionPoolingCNN", "CBAMCNN")


def build(arch: str) -> torch.nn.Module:
    if arch == "ResNet":
        kwargs = dict(RESNET_KWARGS, block=BasicBlock)
        return ResNet(**kwargs)
    if arch == "AttentionPoolingCNN":
        try:
            from attnexplain_attention_cnn.model import AttentionPoolingCNN
        except ImportError:
            sys.exit("AttentionPoolingCNN comes from the example plugin: pip install -e plugins/attention-cnn first.")
        return AttentionPoolingCNN(**ATTENTION_CNN_KWARGS)
    if arch == "CBAMCNN":
        try:
            from attnexplain_attention_cnn.cbam import CBAMCNN
        except ImportError:
            sys.exit("CBAMCNN comes from the example plugin: pip install -e plugins/attention-cnn first.")
        return CBAMCNN(**CBAM_KWARGS)
    return torchvision.models.VisionTransformer(**VIT_KWARGS)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, h, w, 3) RGB -> normalized float32 (n, 3, h, w)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def augment(x: torch.Tensor, rng: np.random.Generator, shift: int) -> torch.Tensor:
    """Random horizontal flips and translations by up to ``shift`` pixels (reflect padding)."""
    n, _, h, w = x.shape
    flips = rng.random(n) < 0.5
    offsets = rng.integers(0, 2 * shift + 1, size=(n, 2))
    padded = F.pad(x, (shift, shift, shift, shift), mode="reflect")
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = offsets[i]
        crop = padded[i, :, dy : dy + h, dx : dx + w]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), 200):
            logits = model(x[start : start + 200])
            correct += int((logits.argmax(1) == y[start : start + 200]).sum())
    return correct / len(x)


def soft_targets(labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """One-hot targets with label smoothing; label -1 (a background, no object) gets uniform."""
    classes = len(LABELS)
    targets = torch.full((len(labels), classes), smoothing / classes)
    has_object = labels >= 0
    targets[has_object, labels[has_object]] += 1.0 - smoothing
    targets[~has_object] = 1.0 / classes
    return targets


def train(
    arch: str,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    warmup_epochs: float,
    shift: int,
    label_smoothing: float,
    seed: int,
    targets: torch.Tensor | None = None,
    loss_function=F.cross_entropy,
) -> None:
    """``targets``: (n, classes) float targets for ``loss_function`` (default: :func:`soft_targets`
    of ``y`` for the cross-entropy; the multi-label sample gives 0/1 per class and a BCE)."""
    rng = np.random.default_rng(seed)
    targets = soft_targets(y, label_smoothing) if targets is None else targets
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = len(x) // batch_size
    total = epochs * steps_per_epoch
    warmup = max(1, int(warmup_epochs * steps_per_epoch))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    channels_last = arch in CONVOLUTIONAL
    for epoch in range(epochs):
        model.train()
        started = time.perf_counter()
        order = rng.permutation(len(x))
        running = 0.0
        for step in range(steps_per_epoch):
            index = torch.from_numpy(order[step * batch_size : (step + 1) * batch_size])
            batch = augment(x[index], rng, shift)
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            loss = loss_function(model(batch), targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            running += float(loss.detach())
        print(
            f"  {arch} epoch {epoch + 1}/{epochs}: loss {running / steps_per_epoch:.3f} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )


def fp16_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in model.state_dict().items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "models")
    parser.add_argument("--train-images", type=int, default=6000)
    parser.add_argument(
        "--background-images", type=int, default=1500, help="object-free textures trained towards a uniform prediction"
    )
    parser.add_argument("--test-images", type=int, default=400)
    parser.add_argument("--resnet-epochs", type=int, default=2)
    parser.add_argument("--vit-epochs", type=int, default=6)
    parser.add_argument("--attention-cnn-epochs", type=int, default=2)
    parser.add_argument("--cbam-epochs", type=int, default=2)
    parser.add_argument(
        "--only",
        choices=[
            "ResNet",
            "VisionTransformer",
            "AttentionPoolingCNN",
            "CBAMCNN",
            *ALIASES,
            "captioner",
            "clip",
            "multilabel",
        ],
        default=None,
        help="train one model (attention-cnn = AttentionPoolingCNN, cbam = CBAMCNN; captioner: the Show, "
        "Attend and Tell captioner of samples/train_captioner.py, not trained without --only; clip: the "
        "sample CLIP, samples/train_clip.py, needs transformers; multilabel: samples/train_multilabel.py's "
        "two-object model)",
    )
    args = parser.parse_args()
    if args.only == "captioner":
        from train_captioner import main as train_captioner

        train_captioner(["--out", str(args.out)])
        return
    if args.only == "multilabel":
        from train_multilabel import train_multilabel

        train_multilabel(args.out)
        return
    args.only = ALIASES.get(args.only, args.only)
    if args.only == "clip":
        import train_clip

        train_clip.main(["--out", str(args.out)])
        return

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    train_images, train_labels, _ = make_composites(args.train_images, TRAIN_SEED, SIZE)
    backgrounds = make_backgrounds(args.background_images, BACKGROUND_SEED, SIZE)
    test_images, test_labels, _ = make_composites(args.test_images, TEST_SEED, SIZE)
    x_train = to_tensor(np.concatenate([train_images, backgrounds]))
    y_train = torch.from_numpy(np.concatenate([train_labels, np.full(len(backgrounds), -1)]))
    x_test, y_test = to_tensor(test_images), torch.from_numpy(test_labels)
    del train_images, backgrounds, test_images
    print(
        f"data: {args.train_images} train composites + {args.background_images} backgrounds, "
        f"{len(x_test)} test composites "
        f"({time.perf_counter() - started:.0f} s)",
        flush=True,
    )

    plans = {
        "ResNet": dict(
            file="resnet-composites.pt",
            kwargs=RESNET_KWARGS,
            epochs=args.resnet_epochs,
            lr=2e-3,
            weight_decay=1e-4,
            batch_size=64,
            warmup_epochs=0.5,
            shift=12,
            label_smoothing=0.0,
            seed=1,
        ),
        "VisionTransformer": dict(
            file="vit-composites.pt",
            kwargs=VIT_KWARGS,
            epochs=args.vit_epochs,
            lr=1e-3,
            weight_decay=0.05,
            batch_size=64,
            warmup_epochs=1.0,
            shift=16,
            label_smoothing=0.1,
            seed=2,
        ),
        "AttentionPoolingCNN": dict(
            file="attention-cnn-composites.pt",
            kwargs=ATTENTION_CNN_KWARGS,
            epochs=args.attention_cnn_epochs,
            lr=2e-3,
            weight_decay=1e-4,
            batch_size=64,
            warmup_epochs=0.5,
            shift=12,
            label_smoothing=0.0,
            seed=3,
        ),
        "CBAMCNN": dict(
            file="cbam-composites.pt",
            kwargs=CBAM_KWARGS,
            epochs=args.cbam_epochs,
            lr=2e-3,
            weight_decay=1e-4,
            batch_size=64,
            warmup_epochs=0.5,
            shift=12,
            label_smoothing=0.0,
            seed=4,
        ),
    }
    for arch, plan in plans.items():
        if args.only and arch != args.only:
            continue
        torch.manual_seed(plan["seed"])
        model = build(arch)
        if arch in CONVOLUTIONAL:
            model = model.to(memory_format=torch.channels_last)
        arch_started = time.perf_counter()
        train(
            arch,
            model,
            x_train,
            y_train,
            epochs=plan["epochs"],
            lr=plan["lr"],
            weight_decay=plan["weight_decay"],
            batch_size=plan["batch_size"],
            warmup_epochs=plan["warmup_epochs"],
            shift=plan["shift"],
            label_smoothing=plan["label_smoothing"],
            seed=plan["seed"],
        )
        fp32_accuracy = evaluate(model, x_test, y_test)

        state_dict = fp16_state_dict(model)
        reloaded = build(arch)
        reloaded.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
        accuracy = evaluate(reloaded, x_test, y_test)
        checkpoint = {
            "arch": arch,
            "arch_kwargs": plan["kwargs"],
            "state_dict": state_dict,
            "labels": list(LABELS),
            "preprocessing": {"size": [SIZE, SIZE], "mean": MEAN, "std": STD},
            "metrics": {
                "test_accuracy": accuracy,
                "train_images": len(x_train),  # backgrounds included
                "test_images": len(x_test),
                "epochs": plan["epochs"],
            },
        }
        path = args.out / plan["file"]
        torch.save(checkpoint, path)
        print(
            f"{arch}: test accuracy {accuracy:.4f} (fp32 {fp32_accuracy:.4f}), "
            f"{time.perf_counter() - arch_started:.0f} s, {path} "
            f"({path.stat().st_size / 1e6:.1f} MB)",
            flush=True,
        )
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
