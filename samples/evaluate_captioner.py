"""Measure the sample captioner on held-out composites: its captions, and where it looks per word.

    .venv/bin/python samples/evaluate_captioner.py [--model samples/models/captioner-composites.pt] [--images 400]

On ``--images`` composites drawn with ``TEST_SEED`` (never trained on), with their masks:

- caption accuracy: greedy captions equal to the true one (exact), and words right at their place;
- for each word of the true caption, fed by teacher forcing: how often its attention α (upsampled to
  the image as ``attnexplain run`` does) peaks on the object's mask (nouns, articles) or on the
  background (texture words), and the same for Grad-CAM of the word's log-probability on the
  encoder's feature map; beside the rate of a random map (its peak a uniformly random pixel: the
  region's share of the image), and the share of α's mass inside the region (a uniform α's would be
  that share too).

The model is loaded from disk as a user would (``attnexplain.loading.load_model``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from composites import LABELS, TEST_SEED, TEXTURES, make_composites_with_textures  # noqa: E402
from train import SIZE, to_tensor  # noqa: E402
from train_captioner import caption_ids  # noqa: E402

from attnexplain.loading import load_model  # noqa: E402
from attnexplain.methods.cam import cam_map, gradcam  # noqa: E402
from attnexplain.methods.combine import upsample  # noqa: E402

#: The roles of a caption's four words ("a cat on grass"): where each should look.
ROLES = ["article", "noun", "on", "texture"]


def peaks_in(maps: torch.Tensor, regions: np.ndarray) -> np.ndarray:
    """For (n, H, W) maps and (n, H, W) bool regions: whether each map's largest pixel is in its region."""
    flat = maps.flatten(1).argmax(dim=1).numpy()
    return regions.reshape(len(regions), -1)[np.arange(len(regions)), flat]


def keep_as_leaf(output: torch.Tensor, kept: list[torch.Tensor]) -> torch.Tensor:
    """A forward hook's body: the feature map as a leaf that takes gradients (load_model freezes the
    weights), kept and returned in place of the output (the same values)."""
    kept.append(output.detach().requires_grad_())
    return kept[-1]


def mass_in(maps: torch.Tensor, regions: np.ndarray) -> np.ndarray:
    """For (n, H, W) non-negative maps: the share of each map's total inside its region."""
    inside = (maps * torch.from_numpy(regions)).flatten(1).sum(1)
    return (inside / maps.flatten(1).sum(1).clamp_min(1e-12)).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", type=Path, default=Path(__file__).resolve().parent / "models" / "captioner-composites.pt"
    )
    parser.add_argument("--images", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(1)

    model = load_model(args.model).module.eval()
    images, labels, textures, masks = make_composites_with_textures(args.images, TEST_SEED, SIZE)
    x, words = to_tensor(images), caption_ids(labels, textures)
    end = model.vocabulary.index("<end>")

    generated = []
    for start in range(0, len(x), 100):
        generated += model.generate(x[start : start + 100])
    truth = words.tolist()
    exact = np.mean([g == t for g, t in zip(generated, truth)])
    per_word = np.mean(
        [[t < len(g) and g[t] == w for t, w in enumerate(row)] for g, row in zip(generated, truth)], axis=0
    )
    nouns_right = np.mean([len(g) > 1 and g[1] == t[1] for g, t in zip(generated, truth)])
    textures_right = np.mean([len(g) > 3 and g[3] == t[3] for g, t in zip(generated, truth)])

    # Teacher forcing on the true caption: every image has its noun and texture step.
    alpha_hits = {role: [] for role in ROLES}
    alpha_mass = {role: [] for role in ROLES}
    cam_hits = {role: [] for role in ROLES}
    regions = {role: (masks if role in ("article", "noun") else ~masks) for role in ROLES}
    for start in range(0, len(x), 100):
        batch, target = x[start : start + 100], words[start : start + 100]
        features: list[torch.Tensor] = []
        handle = model.get_submodule(model.last_block).register_forward_hook(
            lambda module, args, out, kept=features: keep_as_leaf(out, kept)
        )
        try:
            logits, alphas = model(batch, target)
        finally:
            handle.remove()
        log_probs = torch.log_softmax(logits, dim=-1)
        height, width = features[0].shape[-2:]
        for t, role in enumerate(ROLES):
            alpha_maps = upsample(alphas[:, t].detach().reshape(-1, height, width), (SIZE, SIZE))
            alpha_hits[role].append(peaks_in(alpha_maps, regions[role][start : start + 100]))
            alpha_mass[role].append(mass_in(alpha_maps, regions[role][start : start + 100]))
            # The images are independent (BatchNorm in eval), so one backward of the sum gives each
            # image's gradient of its own word's log-probability.
            chosen = log_probs[:, t].gather(1, target[:, t : t + 1]).sum()
            (gradient,) = torch.autograd.grad(chosen, features[0], retain_graph=True)
            cams = upsample(cam_map(gradcam(features[0].detach(), gradient)), (SIZE, SIZE))
            cam_hits[role].append(peaks_in(cams, regions[role][start : start + 100]))
    assert (words[:, 4] == end).all()

    print(f"held-out composites (TEST_SEED={TEST_SEED}): {len(x)}; vocabulary {len(model.vocabulary)} words")
    print(
        f"caption accuracy: exact {exact:.1%}; per word "
        + ", ".join(f"{r} {a:.1%}" for r, a in zip(ROLES + ["<end>"], per_word))
    )
    print(
        f"noun right {nouns_right:.1%} ({len(LABELS)} objects), "
        f"texture right {textures_right:.1%} ({len(TEXTURES)} textures)"
    )
    print("peak on the word's region (teacher forcing on the true caption):")
    print(f"  {'word':<8} {'region':<11} {'attention α':>12} {'Grad-CAM':>10} {'random map':>11} {'α mass':>8}")
    for role in ROLES:
        where = "object" if role in ("article", "noun") else "background"
        share = regions[role].reshape(len(x), -1).mean()
        alpha_rate = np.concatenate(alpha_hits[role]).mean()
        cam_rate = np.concatenate(cam_hits[role]).mean()
        mass = np.concatenate(alpha_mass[role]).mean()
        print(f"  {role:<8} {where:<11} {alpha_rate:>12.1%} {cam_rate:>10.1%} {share:>11.1%} {mass:>8.1%}")


if __name__ == "__main__":
    main()
