"""Train the sample "Show, Attend and Tell" captioner on object composites with generated captions.

    .venv/bin/python samples/train.py --only captioner      (or this file directly)

Writes ``captioner-composites.pt``: the attention-cnn plugin's :class:`ShowAttendTell` (plugins/
attention-cnn, which must be installed) as a plain dict that loads with ``torch.load(path,
weights_only=True)``, like the other samples. Each composite's caption is ``composites.caption``
("a cat on grass", "an astronaut on brick"). Loss: the words' cross-entropy plus the paper's doubly
stochastic regularisation λ Σ_i (1 − Σ_t α_ti)². The decoder starts from a learned state, not from
the image's mean feature (``init_from_features=False``): everything it learns about the image then
comes through its attention, which is what the sample is for. Deterministic, one thread.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from composites import LABELS, TEST_SEED, TEXTURES, TRAIN_SEED, caption, make_composites_with_textures  # noqa: E402
from train import MEAN, SIZE, STD, augment, fp16_state_dict, to_tensor  # noqa: E402

FILE = "captioner-composites.pt"
VOCABULARY = ["<pad>", "<start>", "<end>", "a", "an", "on", *LABELS, *TEXTURES]
CAPTIONER_KWARGS = {
    "vocabulary": VOCABULARY,
    "channels": [24, 48, 96],
    "convs_per_stage": 2,
    "embedding_dim": 32,
    "hidden_size": 128,
    "attention_dim": 64,
    "init_from_features": False,
    "max_length": 8,
    "image_size": SIZE,
}
#: λ of the doubly stochastic regularisation. With 4-word captions over 256 positions Σ_t α_ti is far
#: below 1 everywhere, so the term mostly asks for spread-out attention; kept small.
PENALTY = 0.05


def build():
    try:
        from attnexplain_attention_cnn.captioner import ShowAttendTell
    except ImportError:
        sys.exit("ShowAttendTell comes from the example plugin: pip install -e plugins/attention-cnn first.")
    return ShowAttendTell(**CAPTIONER_KWARGS)


def caption_ids(labels: np.ndarray, textures: np.ndarray) -> torch.Tensor:
    """(n, T) word ids of each composite's caption, ``<end>`` included (all captions are 4 words)."""
    rows = [
        [VOCABULARY.index(word) for word in caption(int(label), int(texture)).split()] + [VOCABULARY.index("<end>")]
        for label, texture in zip(labels, textures)
    ]
    return torch.tensor(rows, dtype=torch.long)


def exact_accuracy(model: torch.nn.Module, x: torch.Tensor, words: torch.Tensor) -> float:
    """Share of images whose greedy caption is the true one, word for word."""
    model.eval()
    right = 0
    for start in range(0, len(x), 200):
        generated = model.generate(x[start : start + 200])
        right += sum(g == w for g, w in zip(generated, words[start : start + 200].tolist()))
    return right / len(x)


def train(model, x: torch.Tensor, words: torch.Tensor, *, epochs: int, lr: float, batch_size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = len(x) // batch_size
    total = epochs * steps_per_epoch
    warmup = steps_per_epoch // 2

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    from attnexplain_attention_cnn.captioner import doubly_stochastic_penalty

    for epoch in range(epochs):
        model.train()
        started = time.perf_counter()
        order = rng.permutation(len(x))
        running = penalty_sum = 0.0
        for step in range(steps_per_epoch):
            index = torch.from_numpy(order[step * batch_size : (step + 1) * batch_size])
            batch = augment(x[index], rng, 12).contiguous(memory_format=torch.channels_last)
            target = words[index]
            logits, alphas = model(batch, target)
            mask = (target != VOCABULARY.index("<pad>")).float()
            loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=0)
            penalty = doubly_stochastic_penalty(alphas, mask)
            optimizer.zero_grad(set_to_none=True)
            (loss + PENALTY * penalty).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            running += float(loss.detach())
            penalty_sum += float(penalty.detach())
        print(
            f"  captioner epoch {epoch + 1}/{epochs}: loss {running / steps_per_epoch:.3f}, "
            f"penalty {penalty_sum / steps_per_epoch:.1f} ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "models")
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--test-images", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(5)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    images, labels, textures, _ = make_composites_with_textures(args.train_images, TRAIN_SEED, SIZE)
    test_images, test_labels, test_textures, _ = make_composites_with_textures(args.test_images, TEST_SEED, SIZE)
    x, words = to_tensor(images), caption_ids(labels, textures)
    x_test, words_test = to_tensor(test_images), caption_ids(test_labels, test_textures)
    del images, test_images
    print(f"data: {len(x)} train, {len(x_test)} test composites ({time.perf_counter() - started:.0f} s)", flush=True)

    model = build().to(memory_format=torch.channels_last)
    train(model, x, words, epochs=args.epochs, lr=3e-3, batch_size=64, seed=5)
    fp32_accuracy = exact_accuracy(model, x_test, words_test)
    state_dict = fp16_state_dict(model)
    reloaded = build()
    reloaded.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
    accuracy = exact_accuracy(reloaded, x_test, words_test)
    checkpoint = {
        "arch": "ShowAttendTell",
        "arch_kwargs": CAPTIONER_KWARGS,
        "state_dict": state_dict,
        "preprocessing": {"size": [SIZE, SIZE], "mean": MEAN, "std": STD},
        "metrics": {
            "test_caption_accuracy": accuracy,
            "train_images": len(x),
            "test_images": len(x_test),
            "epochs": args.epochs,
        },
    }
    path = args.out / FILE
    torch.save(checkpoint, path)
    print(
        f"ShowAttendTell: test caption accuracy {accuracy:.4f} (fp32 {fp32_accuracy:.4f}), "
        f"{time.perf_counter() - started:.0f} s, {path} ({path.stat().st_size / 1e6:.2f} MB)",
        flush=True,
    )


if __name__ == "__main__":
    main()
