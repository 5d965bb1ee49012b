"""Object composites: objects cut from scikit-image's bundled photos pasted onto its textures.

A small, fully offline, deterministic image-classification data set for the sample models. Each
image shows one object (an astronaut, a cat, a coffee cup or a rocket) cut out of a scikit-image
sample photo with a hand-drawn mask, scaled so that its longer side spans 30%–60% of the image,
maybe mirrored, and pasted at a random place onto a random crop of a grayscale texture (brick,
grass or gravel) with random brightness, contrast and tint. Because the pasted pixels are known, each
image comes with the ground-truth mask of where the object is — the thing a saliency map should
point at.

Only numpy, scikit-image and OpenCV are used, so tests can import this file on its own.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np
import skimage.data

LABELS = ["astronaut", "cat", "coffee", "rocket"]
TEXTURES = ["brick", "grass", "gravel"]

TRAIN_SEED = 0  # make_composites(n, TRAIN_SEED) is what the sample models were trained on
TEST_SEED = 1  # held out: only used to measure test accuracy
SAMPLE_SEED = 2  # held out: the pictures in samples/images/
BACKGROUND_SEED = 3  # make_backgrounds(n, BACKGROUND_SEED): object-free training images

OBJECT_SCALE = (0.30, 0.60)  # longer side of the pasted object, as a fraction of the image side

# Outlines of each object in its source photo's pixel coordinates (x, y), drawn by hand.
# Each shape is ("poly", [(x, y), ...]) or ("ellipse", (cx, cy), (half_width, half_height)).
_OUTLINES: dict[str, tuple[str, list]] = {
    # Eileen Collins: hair and face, the helmet ring around the neck, the suit's upper body.
    "astronaut": (
        "astronaut",
        [
            ("ellipse", (226, 78), (75, 64)),
            ("ellipse", (225, 130), (50, 50)),
            ("ellipse", (208, 218), (96, 72)),
            ("poly", [(125, 240), (70, 275), (45, 330), (35, 400), (360, 400), (358, 320), (345, 280), (295, 245)]),
        ],
    ),
    # Chelsea: the cat's head and chest, without the grey background on the right and at the top.
    "cat": (
        "chelsea",
        [
            (
                "poly",
                [
                    (0, 40),
                    (30, 12),
                    (75, 0),
                    (120, 0),
                    (180, 0),
                    (290, 0),
                    (330, 10),
                    (360, 0),
                    (400, 0),
                    (392, 50),
                    (380, 110),
                    (372, 170),
                    (350, 225),
                    (330, 265),
                    (300, 300),
                    (0, 300),
                ],
            ),
        ],
    ),
    # The espresso cup on its saucer, with the spoon.
    "coffee": (
        "coffee",
        [
            ("ellipse", (278, 238), (202, 148)),
            ("ellipse", (292, 88), (118, 68)),
            ("poly", [(174, 88), (410, 88), (400, 230), (180, 230)]),
            ("poly", [(398, 75), (410, 66), (423, 72), (412, 110), (404, 115)]),
        ],
    ),
    # Falcon 9 with DSCOVR on the pad: the rocket and the launch mount under it.
    "rocket": (
        "rocket",
        [
            ("ellipse", (322, 146), (14, 22)),
            ("poly", [(309, 150), (336, 150), (338, 372), (307, 372)]),
            ("poly", [(290, 362), (356, 362), (362, 406), (286, 406)]),
            ("poly", [(266, 404), (380, 404), (380, 427), (266, 427)]),
        ],
    ),
}

_CUTOUT_SIDE = 192  # cutouts are cached with this longer side, then scaled down per image


def _outline_mask(shape: tuple[int, int], outline: list) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    for kind, *geometry in outline:
        if kind == "poly":
            cv2.fillPoly(mask, [np.array(geometry[0], np.int32)], 1)
        else:
            (cx, cy), (ax, ay) = geometry
            cv2.ellipse(mask, (cx, cy), (ax, ay), 0, 0, 360, 1, thickness=-1)
    return mask.astype(bool)


@lru_cache(maxsize=None)
def object_cutout(label: str) -> tuple[np.ndarray, np.ndarray]:
    """The object for ``label`` cropped to its mask's box: (RGB uint8 (h, w, 3), alpha float32 (h, w)).

    The longer side is ``_CUTOUT_SIDE`` pixels; alpha is 1 on the object and 0 elsewhere, with
    anti-aliased edges from the downscaling. Computed once per label, then cached (read-only).
    """
    photo_name, outline = _OUTLINES[label]
    photo = getattr(skimage.data, photo_name)()
    mask = _outline_mask(photo.shape[:2], outline)
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    rgb = photo[y0:y1, x0:x1]
    alpha = mask[y0:y1, x0:x1].astype(np.float32)
    scale = _CUTOUT_SIDE / max(rgb.shape[:2])
    new_size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
    rgb = cv2.resize(rgb, new_size, interpolation=cv2.INTER_AREA)
    alpha = cv2.resize(alpha, new_size, interpolation=cv2.INTER_AREA)
    rgb.flags.writeable = False
    alpha.flags.writeable = False
    return rgb, alpha


@lru_cache(maxsize=None)
def _texture(name: str) -> np.ndarray:
    texture = getattr(skimage.data, name)()
    texture.flags.writeable = False
    return texture


def _background(rng: np.random.Generator, texture_name: str, size: int) -> np.ndarray:
    """A random crop of a grayscale texture, rotated, with random brightness/contrast/tint: float RGB."""
    texture = _texture(texture_name)
    side = int(rng.integers(160, texture.shape[0] + 1))
    y = int(rng.integers(0, texture.shape[0] - side + 1))
    x = int(rng.integers(0, texture.shape[1] - side + 1))
    crop = cv2.resize(texture[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_AREA)
    crop = np.rot90(crop, int(rng.integers(0, 4))).astype(np.float32) / 255.0
    contrast = rng.uniform(0.6, 1.3)
    brightness = rng.uniform(-0.15, 0.15)
    gray = (crop - crop.mean()) * contrast + crop.mean() + brightness
    tint = rng.uniform(0.75, 1.2, size=3).astype(np.float32)
    return np.clip(gray[..., None] * tint, 0.0, 1.0)


def make_composite(
    rng: np.random.Generator, label: int, texture: int, size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """One composite of object ``LABELS[label]`` on texture ``TEXTURES[texture]``.

    Returns the RGB uint8 image (size, size, 3) and the bool mask (size, size) of the object's
    pasted pixels. Everything random is drawn from ``rng``.
    """
    image = _background(rng, TEXTURES[texture], size)
    mask = _paste_object(rng, image, label, size)
    return np.round(image * 255.0).astype(np.uint8), mask


def _paste_object(rng: np.random.Generator, image: np.ndarray, label: int, size: int) -> np.ndarray:
    """Paste object ``LABELS[label]`` onto float RGB ``image`` in place, scaled, maybe mirrored and
    lit at random from ``rng``; returns the bool mask of its pasted pixels."""
    rgb, alpha = object_cutout(LABELS[label])
    fraction = rng.uniform(*OBJECT_SCALE)
    scale = fraction * size / max(rgb.shape[:2])
    w = max(2, round(rgb.shape[1] * scale))
    h = max(2, round(rgb.shape[0] * scale))
    obj = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    obj_alpha = cv2.resize(alpha, (w, h), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        obj, obj_alpha = obj[:, ::-1], obj_alpha[:, ::-1]
    obj = np.clip(obj * rng.uniform(0.8, 1.2), 0.0, 1.0)  # lighting of the object
    y = int(rng.integers(0, size - h + 1))
    x = int(rng.integers(0, size - w + 1))
    region = image[y : y + h, x : x + w]
    region[:] = region * (1.0 - obj_alpha[..., None]) + obj * obj_alpha[..., None]
    mask = np.zeros((size, size), bool)
    mask[y : y + h, x : x + w] = obj_alpha >= 0.5
    return mask


def make_composites(n: int, seed: int, size: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` object composites, deterministic given ``(n, seed, size)``.

    Returns images uint8 (n, size, size, 3) RGB, labels int64 (n,) indexing ``LABELS`` (classes as
    balanced as ``n`` allows, in shuffled order), and masks bool (n, size, size), True where the
    object was pasted. Use ``TRAIN_SEED`` for training data and ``TEST_SEED`` for held-out data.
    """
    images, labels, _, masks = make_composites_with_textures(n, seed, size)
    return images, labels, masks


def make_composites_with_textures(
    n: int, seed: int, size: int = 128
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`make_composites`'s images, labels and masks (the same draws), and each one's
    background: textures int64 (n,) indexing ``TEXTURES``, for captions such as
    :func:`caption` ("a cat on grass") and for the background's ground truth (``~mask``)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(LABELS)).astype(np.int64)
    textures = np.empty(n, np.int64)
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), bool)
    for i, label in enumerate(labels):
        textures[i] = int(rng.integers(0, len(TEXTURES)))
        images[i], masks[i] = make_composite(rng, int(label), int(textures[i]), size)
    return images, labels, textures, masks


def caption(label: int, texture: int) -> str:
    """The caption of a composite of object ``LABELS[label]`` on ``TEXTURES[texture]``:
    "a cat on grass", "an astronaut on brick"."""
    name = LABELS[label]
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name} on {TEXTURES[texture]}"


def write_caption_composites(folder, n: int, seed: int = TEST_SEED, size: int = 128) -> list[str]:
    """Write ``n`` composites (``make_composites_with_textures(n, seed, size)``) as
    ``folder/images/NNNN.png`` with, for ``attnexplain evaluate`` on a captioner, each caption
    word's mask ``folder/masks/NNNN/<word>.png`` (white = the word's region): the object's for its
    noun, the background (every pixel but the object's) for its texture word. Returns the captions."""
    from pathlib import Path

    folder = Path(folder)
    images, labels, textures, masks = make_composites_with_textures(n, seed, size)
    captions = []
    for i in range(n):
        name = f"{i:04d}"
        word_masks = folder / "masks" / name
        word_masks.mkdir(parents=True, exist_ok=True)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / "images" / f"{name}.png"), cv2.cvtColor(images[i], cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(word_masks / f"{LABELS[labels[i]]}.png"), masks[i].astype(np.uint8) * 255)
        cv2.imwrite(str(word_masks / f"{TEXTURES[textures[i]]}.png"), (~masks[i]).astype(np.uint8) * 255)
        captions.append(caption(int(labels[i]), int(textures[i])))
    return captions


def make_backgrounds(n: int, seed: int, size: int = 128) -> np.ndarray:
    """``n`` textures with no object (uint8 (n, size, size, 3) RGB), drawn like the composites'.

    Training on these with a uniform target makes every class need evidence on its object:
    without them, a model can learn the smallest object (the rocket) as "none of the others".
    """
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        texture = int(rng.integers(0, len(TEXTURES)))
        images[i] = np.round(_background(rng, TEXTURES[texture], size) * 255.0).astype(np.uint8)
    return images


MULTILABEL_TRAIN_SEED = (
    10  # make_two_object_composites(n, MULTILABEL_TRAIN_SEED): the multi-label sample's training data
)
MULTILABEL_TEST_SEED = 11  # held out: its figures in samples/README.md


def make_two_object_composites(n: int, seed: int, size: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` composites holding two different objects each, for a multi-label model.

    Returns images uint8 (n, size, size, 3), pairs int64 (n, 2) indexing ``LABELS`` (every pair
    of objects equally often, in shuffled order) and masks bool (n, 2, size, size): each object's
    visible pixels (the second is pasted over the first, so the first's mask loses what it hides).
    """
    rng = np.random.default_rng(seed)
    pairs = [(a, b) for a in range(len(LABELS)) for b in range(len(LABELS)) if a != b]
    chosen = rng.permutation(np.arange(n) % len(pairs))
    objects = np.array([pairs[i] for i in chosen], np.int64).reshape(n, 2)
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, 2, size, size), bool)
    for i, (first, second) in enumerate(objects):
        image = _background(rng, TEXTURES[int(rng.integers(0, len(TEXTURES)))], size)
        masks[i, 0] = _paste_object(rng, image, int(first), size)
        masks[i, 1] = _paste_object(rng, image, int(second), size)
        masks[i, 0] &= ~masks[i, 1]
        images[i] = np.round(image * 255.0).astype(np.uint8)
    return images, objects, masks
