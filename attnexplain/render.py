"""Turning heatmaps into pictures: colormaps, overlays and encoded images. No model code here."""

from __future__ import annotations

import math

import cv2
import numpy as np

from .formats import COLORMAP_NAMES, DEFAULT_COLORMAP

#: A map whose range is below this share of its largest magnitude is constant. float32 carries
#: about 7 significant digits (eps = 1.2e-7): a map computed as sums of many float32 products and
#: upsampled carries rounding noise of a few eps of its magnitude, and stretching that noise over
#: the colormap would draw a pattern that means nothing (Inception-v3 Score-CAM on a 2×2 map has a
#: relative range of 1e-7). 16 eps is above that noise and far below any real map's contrast.
FLAT_RELATIVE_RANGE = 16 * float(np.finfo(np.float32).eps)


def flat_map(heatmap: np.ndarray) -> str | None:
    """Why a map has nothing to draw: ``"all zero"``, ``"constant"`` (to within float32 rounding),
    or None when it has contrast. The one decision for overlays, reports and the terminal."""
    values = np.nan_to_num(np.asarray(heatmap, dtype=np.float32))
    if values.size == 0 or not values.any():
        return "all zero"
    low, high = float(values.min()), float(values.max())
    if high - low <= FLAT_RELATIVE_RANGE * max(abs(low), abs(high)):
        return "constant"
    return None


#: A map whose range is below this share of its mean level varies too little to mean anything.
#: Measured (``(max - min) / |mean|``, docs/methods.md "Nearly flat maps"): every map of the trained
#: sample models, every method, varies by 0.118 (RISE at its mask noise) to 84; maps of untrained
#: weights that look flat but are drawn as strong patterns vary by 0.005-0.061 (the attention CNN's
#: α 0.005-0.017, torchvision Swin-T rollout 0.049-0.061, a Hugging Face ViT's rollout 0.04).
NEARLY_FLAT_VARIATION = 0.1


def nearly_flat(heatmap: np.ndarray) -> float | None:
    """The map's variation, ``(max - min) / |mean|``, where it is below
    :data:`NEARLY_FLAT_VARIATION` (a map whose values all sit far from zero and close together);
    None otherwise, and for a flat map (see :func:`flat_map`) or one centred on zero."""
    values = np.nan_to_num(np.asarray(heatmap, dtype=np.float64))
    if flat_map(values) is not None:
        return None
    level = abs(float(values.mean()))
    variation = (float(values.max()) - float(values.min())) / level if level > 0 else math.inf
    return variation if variation < NEARLY_FLAT_VARIATION else None


def normalize_heatmap(heatmap: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the map's own range; a flat map (see :func:`flat_map`) becomes all zeros."""
    return normalize_each(np.asarray(heatmap)[None])[0]


def normalize_each(maps: np.ndarray) -> np.ndarray:
    """(..., h, w) maps each scaled to [0, 1] by its own range (a weak attention head stays as
    readable as a strong one); flat maps (see :func:`flat_map`) and NaN become zeros."""
    values = np.nan_to_num(np.asarray(maps, dtype=np.float32))
    low, high = values.min(axis=(-2, -1), keepdims=True), values.max(axis=(-2, -1), keepdims=True)
    spread = high - low
    flat = spread <= FLAT_RELATIVE_RANGE * np.maximum(np.abs(low), np.abs(high))
    return np.where(flat, 0.0, (values - low) / np.where(flat, 1.0, spread)).astype(np.float32)


#: Name (see :data:`attnexplain.formats.COLORMAP_NAMES`) → OpenCV's colormap.
COLORMAPS = {name: getattr(cv2, f"COLORMAP_{name.upper()}") for name in COLORMAP_NAMES}


#: Each of :data:`COLORMAPS` as a (256, 1, 3) table in RGB order, the form ``applyColorMap`` takes a
#: table of one's own in: colouring straight into RGB spares a BGR → RGB pass over the picture.
_RGB_TABLES = {
    name: np.ascontiguousarray(cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], code)[:, :, ::-1])
    for name, code in COLORMAPS.items()
}


def _rgb_table(colormap: str) -> np.ndarray:
    if colormap not in COLORMAPS:
        raise ValueError(f"colormap must be one of {', '.join(COLORMAPS)}, not {colormap!r}")
    return _RGB_TABLES[colormap]


def colormap_table(colormap: str = DEFAULT_COLORMAP) -> np.ndarray:
    """(256, 3) uint8 RGB: the colour of each level, so that a page colours maps as the PNGs are."""
    return _rgb_table(colormap).reshape(256, 3).copy()


def colorize(unit_map: np.ndarray, colormap: str = DEFAULT_COLORMAP) -> np.ndarray:
    """[0, 1] map → (H, W, 3) uint8 RGB with one of :data:`COLORMAPS` (low = dark or blue, high =
    bright or red)."""
    table = _rgb_table(colormap)
    values = np.asarray(unit_map, dtype=np.float32)
    # OpenCV's saturating conversion does in one pass what clip, scale and cast do in four with
    # NumPy: ×255 rounded to nearest, below 0 → 0, above 1 → 255, NaN → 0.
    levels = cv2.multiply(np.ascontiguousarray(values.reshape(values.shape[0], -1)), 255.0, dtype=cv2.CV_8U)
    return cv2.applyColorMap(levels, table).reshape(*values.shape, 3)


def render_explained_overlay(
    pixels: np.ndarray,
    heatmap: np.ndarray,
    box: tuple[float, float, float, float],
    alpha: float = 0.5,
    detections: list[dict] | None = None,
    colormap: str = DEFAULT_COLORMAP,
) -> np.ndarray:
    """The overlay ``run`` and ``batch`` write: the blended map and, for a detector, its boxes."""
    blended = render_overlay(pixels, heatmap, box, alpha, colormap)
    return draw_boxes(blended, detections) if detections else blended


def render_overlay(
    pixels: np.ndarray,
    heatmap: np.ndarray,
    box: tuple[float, float, float, float],
    alpha: float = 0.5,
    colormap: str = DEFAULT_COLORMAP,
) -> np.ndarray:
    """Blend the colormapped heatmap over the photo at the photo's own resolution.

    ``box`` is the region of the photo the model saw (left, top, right, bottom); the heatmap is
    stretched over it. Parts of the photo outside it (cropped away by preprocessing) are dimmed.
    """
    height, width = pixels.shape[:2]
    left, top, right, bottom = (int(round(v)) for v in box)
    box_w, box_h = max(1, right - left), max(1, bottom - top)
    # Intersection of the box with the photo, in photo and in box coordinates.
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(right, width), min(bottom, height)
    whole = (x0, y0, x1, y1) == (0, 0, width, height)
    # What the model did not see, dimmed (nothing, when it saw the whole photo).
    result = None if whole else cv2.LUT(np.ascontiguousarray(pixels), _DIMMED)
    if x1 > x0 and y1 > y0:
        colors = colorize(
            _stretched_part(normalize_heatmap(heatmap), (left, top, box_w, box_h), (x0, y0, x1, y1)), colormap
        )
        # OpenCV blends uint8 directly (rounded to nearest): at a photo's resolution, 4× faster
        # than the same arithmetic in float32 NumPy arrays.
        blended = cv2.addWeighted(np.ascontiguousarray(pixels[y0:y1, x0:x1]), 1.0 - alpha, colors, alpha, 0.0)
        if whole:
            return blended
        result[y0:y1, x0:x1] = blended
    return result


def _stretched_part(
    unit_map: np.ndarray, box: tuple[int, int, int, int], visible: tuple[int, int, int, int]
) -> np.ndarray:
    """``unit_map`` stretched over ``box`` (left, top, width, height), only its ``visible`` part
    (x0, y0, x1, y1 in the photo). A letterboxed thin photo's box is a square of its long side
    (padding included): a 1:50 photo of 100 million pixels would stretch the map over 5 billion
    pixels (20 GB of float32) to keep 2% of them, so the part beyond the photo is never computed."""
    left, top, box_w, box_h = box
    x0, y0, x1, y1 = visible
    if (x1 - x0, y1 - y0) == (box_w, box_h):  # the box lies inside the photo: all of it shows
        return cv2.resize(unit_map, (box_w, box_h), interpolation=cv2.INTER_LINEAR)
    height, width = unit_map.shape
    scale_x, scale_y = box_w / width, box_h / height
    # cv2.resize's pixel-centre alignment (source = (target + ½) / scale − ½), shifted to the part.
    transform = np.array(
        [[scale_x, 0.0, 0.5 * scale_x - 0.5 - (x0 - left)], [0.0, scale_y, 0.5 * scale_y - 0.5 - (y0 - top)]]
    )
    return cv2.warpAffine(
        np.ascontiguousarray(unit_map, dtype=np.float32),
        transform,
        (x1 - x0, y1 - y0),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )


#: Dimming of the parts of a photo the model did not see, as a lookup table (uint8 → uint8).
_DIMMED = np.clip(np.arange(256, dtype=np.float32) * 0.4 + 0.5, 0, 255).astype(np.uint8)


def render_model_view(
    pixels: np.ndarray,
    box: tuple[float, float, float, float],
    size: tuple[int, int],
    fill: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """The picture the model saw: the photo's ``box`` (left, top, right, bottom, which may reach past
    the photo, as a letterbox does) stretched to ``size`` (height, width); outside the photo ``fill``
    (RGB 0–255, the padding's colour)."""
    height, width = size
    left, top, right, bottom = box
    scale_x, scale_y = width / max(right - left, 1e-6), height / max(bottom - top, 1e-6)
    transform = np.array([[scale_x, 0.0, -left * scale_x], [0.0, scale_y, -top * scale_y]])
    return cv2.warpAffine(
        np.ascontiguousarray(pixels),
        transform,
        (width, height),
        flags=cv2.INTER_AREA if scale_x < 1 else cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=tuple(float(v) for v in fill),
    )


def encode_image(pixels: np.ndarray, extension: str = ".png", quality: int = 90) -> bytes:
    """RGB uint8 array → encoded file bytes (.png or .jpg)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if extension in (".jpg", ".jpeg") else []
    ok, encoded = cv2.imencode(extension, cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {pixels.shape} image as {extension}")
    return encoded.tobytes()


def downscale(pixels: np.ndarray, longest_side: int) -> np.ndarray:
    """Shrink an (H, W, 3) uint8 picture so that the longest side is at most ``longest_side`` (for
    previews), antialiased."""
    from torchvision.transforms.v2.functional import resize

    from .images import channels_first

    height, width = pixels.shape[:2]
    scale = longest_side / max(height, width)
    if scale >= 1.0:
        return pixels
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    # torchvision's 8-bit antialiased bilinear kernel (Pillow's filter): 4× cheaper than OpenCV's
    # area averaging at a photo's size, for the same look.
    return resize(channels_first(pixels), size, antialias=True).permute(1, 2, 0).numpy()


def render_attention_grid(
    grid: np.ndarray, cell: int = 48, gap: int = 2, colormap: str = DEFAULT_COLORMAP
) -> np.ndarray:
    """(layers, heads, h, w) attention maps → one RGB mosaic, a row per layer and a column per head.

    Each cell is scaled to its own range, so weak and strong heads are both readable. A layer with
    fewer heads than the most has NaN maps in the missing heads: their cells stay blank.
    """
    layers, heads = grid.shape[:2]
    mosaic = np.full((layers * (cell + gap) - gap, heads * (cell + gap) - gap, 3), 255, dtype=np.uint8)
    for row in range(layers):
        for column in range(heads):
            if np.isnan(grid[row, column]).all():
                continue
            tile = cv2.resize(normalize_heatmap(grid[row, column]), (cell, cell), interpolation=cv2.INTER_NEAREST)
            y, x = row * (cell + gap), column * (cell + gap)
            mosaic[y : y + cell, x : x + cell] = colorize(tile, colormap)
    return mosaic


#: Boxes a detector reports below this score are left out of pictures (they stay in the report).
SHOWN_BOX_SCORE = 0.5


def draw_boxes(
    pixels: np.ndarray, detections: list[dict], min_score: float = SHOWN_BOX_SCORE, most: int = 20
) -> np.ndarray:
    """Draw a detector's boxes (``boxes_on_photo`` records, photo pixels, best first) on a copy.

    The explained box is always drawn, thick and white; up to ``most`` others scoring at least
    ``min_score`` are drawn thin, each with its label (or class index) and score.
    """
    picture = np.ascontiguousarray(pixels).copy()
    thickness = max(1, round(max(picture.shape[:2]) / 300))
    # A box clipped to nothing lay in letterbox padding, outside the photo: nothing to draw.
    visible = [d for d in detections if d["box"][2] > d["box"][0] and d["box"][3] > d["box"][1]]
    shown = [d for d in visible if d.get("explained")]
    shown += [d for d in visible if not d.get("explained") and d["score"] >= min_score][:most]
    for detection in reversed(shown):  # the explained box last, on top
        explained = bool(detection.get("explained"))
        color = (255, 255, 255) if explained else (255, 210, 0)
        width = thickness * 2 if explained else thickness
        x0, y0, x1, y1 = (int(round(v)) for v in detection["box"])
        cv2.rectangle(picture, (x0, y0), (x1, y1), (0, 0, 0), width + 2)
        cv2.rectangle(picture, (x0, y0), (x1, y1), color, width)
        name = detection.get("label") or f"class {detection['index']}"
        text = f"{name} {detection['score']:.2f}"
        scale = 0.4 * thickness
        (text_w, text_h), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        y_text = max(y0, text_h + baseline + 2)
        cv2.rectangle(picture, (x0, y_text - text_h - baseline - 2), (x0 + text_w + 4, y_text), color, -1)
        cv2.putText(
            picture, text, (x0 + 2, y_text - baseline), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA
        )
    return picture
