"""Writes every figure of docs/attention-on-images.md, docs/notebook.md and the README's
screenshots, from attnexplain's own outputs on the shipped samples (samples/models, samples/images).

    .venv/bin/python docs/make_figures.py            # needs the attention-cnn example plugin
                                                     # (plugins/attention-cnn) and, for the
                                                     # screenshots, Debian's chromium + Playwright
    .venv/bin/python docs/make_figures.py notebook   # only those named (attention_cnn, vit,
                                                     # resnet, notebook, screenshots)

Deterministic: the sample models are fixed and every method here is too.
"""

from __future__ import annotations

import csv
import shutil
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
IMAGES = REPO / "samples" / "images"
MODELS = REPO / "samples" / "models"
OUT = REPO / "docs" / "images"

import attnexplain  # noqa: E402  (the repository's own copy, first on the path)
from attnexplain.render import (  # noqa: E402
    normalize_heatmap,
    render_attention_grid,
    render_overlay,  # noqa: E402
)


def _labelled(picture: np.ndarray, text: str, side: int = 160) -> np.ndarray:
    """A tile: the picture at ``side`` px with a caption strip under it."""
    tile = cv2.resize(picture, (side, side), interpolation=cv2.INTER_AREA)
    strip = np.full((26, side, 3), 255, np.uint8)
    cv2.putText(strip, text, (4, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (30, 30, 30), 1, cv2.LINE_AA)
    return np.vstack([tile, strip])


def _row(tiles: list[np.ndarray], gap: int = 6) -> np.ndarray:
    height = max(t.shape[0] for t in tiles)
    spacer = np.full((height, gap, 3), 255, np.uint8)
    parts = []
    for tile in tiles:
        parts += [tile, spacer]
    return np.hstack(parts[:-1])


def _save(name: str, picture: np.ndarray, width: int | None = None, colors: int = 128) -> None:
    """A small PNG: shrunk to ``width`` and a palette of ``colors`` (the repository keeps them)."""
    from PIL import Image

    if width is not None and picture.shape[1] > width:
        height = round(picture.shape[0] * width / picture.shape[1])
        picture = cv2.resize(picture, (width, height), interpolation=cv2.INTER_AREA)
    Image.fromarray(picture).quantize(colors=colors).save(OUT / name, optimize=True)
    print(OUT / name)


def attention_cnn() -> None:
    """Show-Attend-Tell-style pooling: α over the 16×16 feature positions, beside Grad-CAM."""
    image = attnexplain.load_image(IMAGES / "coffee-on-gravel.png")
    result = attnexplain.explain(str(MODELS / "attention-cnn-composites.pt"), image, "attention,gradcam")
    alpha = result.maps["attention"].attention_grid[0, 0]  # the raw α, 16×16, sums to 1
    raw = cv2.resize(normalize_heatmap(alpha), (160, 160), interpolation=cv2.INTER_NEAREST)
    from attnexplain.render import colorize

    _save(
        "attention-cnn-alpha.png",
        _row(
            [
                _labelled(image.pixels, "photo"),
                _labelled(colorize(raw), f"alpha, {alpha.shape[0]}x{alpha.shape[1]} positions"),
                _labelled(result.overlay(0.5, "attention"), "alpha over the photo"),
                _labelled(result.overlay(0.5, "gradcam"), "Grad-CAM, same model"),
            ]
        ),
    )


def captioner() -> None:
    """Show, Attend and Tell: each word's α over the photo, and for the noun e → softmax → α.
    Prints the numbers docs/attention-on-images.md quotes (e's range, α's peak and mass on the
    object, the gate β and the context vector, word by word)."""
    import torch
    from PIL import Image

    from attnexplain.render import colorize

    name = "coffee-on-gravel"
    image = attnexplain.load_image(IMAGES / f"{name}.png")
    model = attnexplain.load_model(MODELS / "captioner-composites.pt")
    recorded: dict[str, list] = {"context": [], "gate": []}
    hooks = [
        model.module.attention.register_forward_hook(lambda m, a, out: recorded["context"].append(out[0].detach())),
        model.module.gate.register_forward_hook(lambda m, a, out: recorded["gate"].append(torch.sigmoid(out).detach())),
    ]
    try:
        result = attnexplain.explain_caption(model, image)
    finally:
        for hook in hooks:
            hook.remove()
    mask = np.asarray(Image.open(REPO / "samples" / "masks" / f"{name}.png").convert("L")) > 127
    mask = cv2.resize(mask.astype(np.uint8), result.words[0].attention.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    # generate() ran first, then the teacher-forced pass: the last len(steps) records are that pass's.
    contexts = recorded["context"][-(len(result.caption) + 1) :]
    gates = recorded["gate"][-(len(result.caption) + 1) :]
    print(f"caption: {result.text!r}; grid {result.grid}; object share {mask.mean():.3f}")
    for word, context, gate in zip(result.words, contexts, gates):
        e, alpha = word.alignment_scores, word.attention_grid
        mass = float((word.attention * mask).sum() / word.attention.sum())
        print(
            f"  {word.word:>7}: p {word.probability:.4f}; e from {e.min():.2f} to {e.max():.2f} (mean {e.mean():.2f}); "
            f"α max {alpha.max():.4f} min {alpha.min():.2e}; α mass on the object {mass:.1%}; "
            f"β {float(gate):.3f}; |Σ α a| {float(context.norm()):.2f}"
        )
    for first, second in zip(range(len(contexts) - 1), range(1, len(contexts))):
        cosine = float(torch.nn.functional.cosine_similarity(contexts[first], contexts[second]))
        print(f"  cos(context {first + 1}, context {second + 1}) = {cosine:.3f}")

    def overlay(heatmap: np.ndarray) -> np.ndarray:
        return render_overlay(image.pixels, heatmap, result.box, 0.5)

    tiles = [_labelled(image.pixels, "photo")]
    tiles += [_labelled(overlay(word.attention), f"alpha for '{word.word}'") for word in result.words]
    _save("captioner-strip.png", _row(tiles))
    noun = result.words[1]

    def grid(values: np.ndarray) -> np.ndarray:
        return cv2.resize(colorize(normalize_heatmap(values)), (160, 160), interpolation=cv2.INTER_NEAREST)

    e = noun.alignment_scores
    _save(
        "captioner-scores.png",
        _row(
            [
                _labelled(grid(e), f"e, {e.min():.1f} to {e.max():.1f}"),
                _labelled(grid(noun.attention_grid), f"softmax(e): max {noun.attention_grid.max():.3f}"),
                _labelled(overlay(noun.attention), f"alpha for '{noun.word}'"),
                _labelled(overlay(noun.gradcam), f"Grad-CAM, log p('{noun.word}')"),
            ]
        ),
    )


def vit() -> None:
    """The ViT: per layer and head, the class token's attention; rollout through 1..L layers."""
    image = attnexplain.load_image(IMAGES / "cat-on-grass.png")
    result = attnexplain.explain(str(MODELS / "vit-composites.pt"), image, "attention,rollout")
    grid = result.maps["attention"].attention_grid  # (layers, heads, 8, 8)
    mosaic = render_attention_grid(grid, cell=76, gap=4)
    layers, heads = grid.shape[:2]
    margin_left, margin_top = 70, 24
    canvas = np.full((mosaic.shape[0] + margin_top, mosaic.shape[1] + margin_left, 3), 255, np.uint8)
    canvas[margin_top:, margin_left:] = mosaic
    for head in range(heads):
        cv2.putText(
            canvas,
            f"head {head + 1}",
            (margin_left + head * 80 + 12, 17),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.45,
            (30, 30, 30),
            1,
            cv2.LINE_AA,
        )
    for layer in range(layers):
        cv2.putText(
            canvas,
            f"layer {layer + 1}",
            (6, margin_top + layer * 80 + 42),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.45,
            (30, 30, 30),
            1,
            cv2.LINE_AA,
        )
    _save("vit-heads.png", canvas)
    depths = result.maps["rollout"].depth_maps
    _save(
        "vit-rollout-depth.png",
        _row(
            [_labelled(image.pixels, "photo")]
            + [
                _labelled(
                    render_overlay(image.pixels, depths[depth], result.box, 0.5), f"rollout, layers 1-{depth + 1}"
                )
                for depth in range(depths.shape[0])
            ]
        ),
    )


def resnet() -> None:
    """A plain CNN has no attention to show: Grad-CAM says where its evidence for the class lies."""
    tiles = []
    for name in ("rocket-on-brick.png", "astronaut-on-grass.png"):
        image = attnexplain.load_image(IMAGES / name)
        result = attnexplain.explain(str(MODELS / "resnet-composites.pt"), image, "gradcam")
        tiles += [
            _labelled(image.pixels, "photo"),
            _labelled(result.overlay(0.5), f"Grad-CAM: {result.target.label} {result.target.prob:.0%}"),
        ]
    _save("resnet-gradcam.png", _row(tiles))


def notebook() -> None:
    """docs/notebook.md: what a notebook shows of a result (its _repr_png_; the HTML has the same
    pictures), and the matplotlib figures of attnexplain.figures, as the page's code makes them."""
    import io

    def figure_pixels(fig) -> np.ndarray:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        return cv2.imdecode(np.frombuffer(buffer.getvalue(), np.uint8), cv2.IMREAD_COLOR)[..., ::-1].copy()

    result = attnexplain.explain(
        str(MODELS / "resnet-composites.pt"), IMAGES / "cat-on-grass.png", "gradcam,layercam,scorecam"
    )
    shown = cv2.imdecode(np.frombuffer(result._repr_png_(), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    _save("notebook-inline.png", np.ascontiguousarray(shown), width=800, colors=256)
    _save("notebook-figure.png", figure_pixels(result.figure()), width=800, colors=256)
    vit_results = [
        attnexplain.explain(str(MODELS / "vit-composites.pt"), IMAGES / name, "rollout,attention")
        for name in ("rocket-on-brick.png", "cat-on-grass.png")
    ]
    _save("notebook-grid.png", figure_pixels(attnexplain.figure(vit_results)), width=640, colors=256)
    _save("notebook-depth.png", figure_pixels(vit_results[0].depth_figure()), width=640, colors=256)


def screenshots() -> None:
    """The README's pictures of report.html and of a gallery, as a reader's browser shows them."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("no chromium: screenshots left as they are")
        return
    from click.testing import CliRunner
    from playwright.sync_api import sync_playwright

    from attnexplain.cli import main

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        run = CliRunner().invoke(
            main,
            [
                "run",
                str(MODELS / "vit-composites.pt"),
                str(IMAGES / "cat-on-grass.png"),
                "--method",
                "rollout,attention",
                "--out",
                str(work / "run"),
            ],
        )
        assert run.exit_code == 0, run.output
        truth = work / "truth.csv"
        with truth.open("w", newline="") as handle:
            csv.writer(handle).writerows(
                [
                    ("image", "class"),
                    ("astronaut-on-grass.png", "astronaut"),
                    ("cat-on-grass.png", "cat"),
                    ("chelsea.jpg", "cat"),
                    ("coffee-on-gravel.png", "coffee"),
                    ("rocket-on-brick.png", "rocket"),
                ]
            )
        batch = CliRunner().invoke(
            main,
            [
                "batch",
                str(MODELS / "resnet-composites.pt"),
                str(IMAGES),
                "--out",
                str(work / "batch"),
                "--method",
                "gradcam,saliency",
                "--truth",
                str(truth),
                "--quiet",
            ],
        )
        assert batch.exit_code in (0, 3), batch.output
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            for address, name in (
                ((work / "run" / "cat-on-grass" / "report.html").as_uri(), "report.png"),
                ((work / "batch" / "index.html").as_uri(), "gallery.png"),
            ):
                page.goto(address)
                page.wait_for_timeout(400)
                shot = cv2.imdecode(np.frombuffer(page.screenshot(), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
                _save(name, np.ascontiguousarray(shot), width=800)
            browser.close()


FIGURES = {
    "attention_cnn": attention_cnn,
    "captioner": captioner,
    "vit": vit,
    "resnet": resnet,
    "notebook": notebook,
    "screenshots": screenshots,
}

if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for name in sys.argv[1:] or FIGURES:
        FIGURES[name]()
