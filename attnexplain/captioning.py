"""Explaining a captioner: its caption, and for each word where the model looked.

A captioning model's plugin says how it writes a caption and scores a word and which module
attends over the image at each step (:class:`attnexplain.plugins.Captioning`). For a caption — the
model's own (generated as the model does) or one the user gives (``--caption``, scored by teacher
forcing) — one forward records, for every word:

- α, the model's learned attention over the feature map's positions (the weights its context
  vector is the average under), and e, the alignment scores α is the softmax of;
- the word's log-probability, whose gradient with respect to the feature map gives Grad-CAM
  (Selvaraju et al. 2017) of that word: one backward per word, down to the feature map only.

Nothing here names a model: the plugin answers every model-specific question.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from .errors import MethodError, ModelRunError, NothingToExplain, error_line, shown
from .formats import DEFAULT_COLORMAP
from .images import LoadedImage, image_from
from .loading import LoadedModel, load_model
from .methods.cam import cam_map, gradcam
from .methods.combine import upsample
from .planning import plan_preprocessing
from .preprocess import Preprocessing, prepare
from .running import model_device, model_failures

if TYPE_CHECKING:
    from .plugins import Captioning


@dataclass
class WordExplanation:
    """One word of the caption: its probability and where the model looked for it."""

    word: str
    position: int  # 0-based place in the caption
    probability: float  # p(word | image, the words before it)
    attention: np.ndarray  # α, upsampled to the model's input (H, W); sums to 1 on the grid
    attention_grid: np.ndarray  # α on the feature map's grid (h, w)
    alignment_scores: np.ndarray  # e on the grid (h, w): α = softmax(e)
    gradcam: np.ndarray  # Grad-CAM of the word's log-probability, at the model's input (H, W)

    @property
    def log_probability(self) -> float:
        return float(np.log(max(self.probability, 1e-45)))


@dataclass
class CaptionExplanation:
    """A caption and, for each explained word, its maps: what :func:`explain_caption` returns."""

    image: LoadedImage
    model: LoadedModel
    caption: list[str]  # every word of the caption, in order
    generated: bool  # True: the model's own caption; False: one the user gave, scored
    words: list[WordExplanation]  # the explained words (all of them, or the --target's)
    probabilities: list[float]  # every word's probability, in caption order
    end_probability: float | None  # p(end | the caption): None when the model stopped at its length limit
    grid: tuple[int, int]  # the feature map's (h, w)
    feature_layer: str
    score_formula: str
    box: tuple[float, float, float, float]  # region of the photo the model saw
    preprocessing: Preprocessing
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return " ".join(self.caption)

    def to_dict(self) -> dict[str, Any]:
        """The report's fields (without output paths: :meth:`save` adds them)."""
        from .report import versions

        return {
            "image": {"path": str(self.image.path.resolve()) if self.image.path else None, **self.image.describe()},
            "model": self.model.describe(),
            "task": "captioning",
            "caption": self.text,
            "caption_source": "generated" if self.generated else "given",
            "words": [
                {
                    "word": word.word,
                    "position": word.position,
                    "probability": word.probability,
                    "log_probability": word.log_probability,
                    "attention_peak": _peak(word.attention_grid),
                    "attention_max": float(word.attention_grid.max()),
                    "alignment_scores": {
                        "min": float(word.alignment_scores.min()),
                        "max": float(word.alignment_scores.max()),
                        "mean": float(word.alignment_scores.mean()),
                        "std": float(word.alignment_scores.std()),
                    },
                }
                for word in self.words
            ],
            "word_probabilities": [
                {"word": word, "probability": probability}
                for word, probability in zip(self.caption, self.probabilities)
            ],
            "end_probability": self.end_probability,
            "log_probability": float(sum(np.log(max(p, 1e-45)) for p in self.probabilities))
            + (float(np.log(max(self.end_probability, 1e-45))) if self.end_probability is not None else 0.0),
            "grid": list(self.grid),
            "feature_layer": self.feature_layer,
            "alignment_score_formula": self.score_formula,
            "preprocessing": self.preprocessing.as_dict(),
            "timings": {key: round(value, 6) for key, value in self.timings.items()},
            "versions": versions(),
        }

    def save(
        self, directory: str | Path, alpha: float = 0.5, overlay_format: str = "png", colormap: str = DEFAULT_COLORMAP
    ) -> dict[str, Any]:
        """Write each word's overlays and maps, the attention strip, report.json and report.html
        into ``directory``, all or nothing. Returns the report as written to report.json."""
        from .caption_report import save_caption_explanation

        return save_caption_explanation(self, Path(directory), alpha, overlay_format, colormap)


def _peak(grid: np.ndarray) -> list[int]:
    """(row, column) of a grid's largest value."""
    row, column = np.unravel_index(int(np.argmax(grid)), grid.shape)
    return [int(row), int(column)]


def captioning_of(loaded: LoadedModel) -> "Captioning | None":
    """What the model's plugin says about it as a captioner; None for a model that is not one."""
    return loaded.plugin.captioning(loaded.module)


def refuse_captioner(loaded: LoadedModel, command: str, instead: str = "`attnexplain run MODEL IMAGE`") -> None:
    """A one-line :class:`MethodError` where ``command`` does not handle captioners (yet), naming
    what does (``instead``)."""
    if captioning_of(loaded) is not None:
        raise MethodError(
            f"{command} does not handle captioning models yet; {instead} explains an image's caption word by word."
        )


def caption_ids(captioning: "Captioning", caption: str) -> list[int]:
    """A caption the user gives, as word ids; a :class:`MethodError` names a word not in the
    model's vocabulary."""
    words = caption.split()
    if not words:
        raise MethodError("The caption to score is empty; give its words, e.g. --caption 'a cat on grass'.")
    vocabulary = {word: index for index, word in enumerate(captioning.vocabulary)}
    for word in words:
        if word not in vocabulary:
            known = ", ".join(w for w in captioning.vocabulary if not (w.startswith("<") and w.endswith(">")))
            raise MethodError(
                f"The word {shown(word)} is not in the captioner's vocabulary "
                f"({len(captioning.vocabulary)} words: {shown(known, 200)})."
            )
    return [vocabulary[word] for word in words]


def explain_caption(
    model: LoadedModel | torch.nn.Module | str | Path,
    image: Any,
    *,
    caption: str | None = None,
    target: str | None = None,
    size: Sequence[int] | int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> CaptionExplanation:
    """Caption ``image`` with a captioning ``model`` and explain each word.

    ``caption``: score these words (teacher forcing) instead of the model's own caption. ``target``:
    explain only this word (each place it appears); the caption's other words keep their
    probabilities. ``model`` and ``image`` are what :func:`attnexplain.explain` accepts.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    picture = image_from(image)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    captioning = captioning_of(loaded)
    if captioning is None:
        raise MethodError(
            f"Plugin {loaded.plugin.name} does not know this {type(loaded.module).__name__} as a captioner, "
            f"so it has no caption to explain."
        )
    module = loaded.module
    preprocessing = plan_preprocessing(loaded, size=size, mean=mean, std=std)
    prepared = prepare(picture.pixels, preprocessing)
    batch = prepared.tensor.to(model_device(module))
    timings["preprocess_s"] = time.perf_counter() - started

    started = time.perf_counter()
    if caption is not None:
        ids, generated = caption_ids(captioning, caption), False
        finished = True
    else:
        with torch.no_grad(), model_failures(module):
            ids = [int(i) for i in captioning.generate(batch)]
        generated = True
        finished = bool(ids) and ids[-1] == captioning.end
        ids = ids[:-1] if finished else ids
        if not ids:
            raise NothingToExplain("The model's caption for this image is empty, so there is no word to explain.")
    timings["generate_s"] = time.perf_counter() - started
    words = [captioning.vocabulary[i] for i in ids]
    explained = list(range(len(words)))
    if target is not None:
        explained = [t for t, word in enumerate(words) if word == target]
        if not explained:
            raise MethodError(f"The word {shown(target)} is not in the caption {shown(' '.join(words))}.")

    started = time.perf_counter()
    steps = ids + [captioning.end] if finished else ids
    features, alphas, scores, log_probs = _teacher_forced(module, captioning, batch, steps, loaded.plugin.name)
    timings["score_s"] = time.perf_counter() - started

    started = time.perf_counter()
    height, width = features.shape[-2:]
    input_size = (int(batch.shape[-2]), int(batch.shape[-1]))
    word_log_probs = [log_probs[0, t, steps[t]] for t in range(len(steps))]
    results = []
    for t in explained:
        (gradient,) = torch.autograd.grad(word_log_probs[t], features, retain_graph=True)
        cam = cam_map(gradcam(features.detach(), gradient))
        alpha_grid = alphas[t][:1].detach().reshape(1, height, width)
        results.append(
            WordExplanation(
                word=words[t],
                position=t,
                probability=float(word_log_probs[t].detach().exp()),
                attention=upsample(alpha_grid, input_size)[0].cpu().numpy(),
                attention_grid=alpha_grid[0].cpu().numpy(),
                alignment_scores=scores[t][:1].detach().reshape(height, width).cpu().numpy(),
                gradcam=upsample(cam, input_size)[0].cpu().numpy(),
            )
        )
    timings["explain_s"] = time.perf_counter() - started
    probabilities = [float(p.detach().exp()) for p in word_log_probs]
    return CaptionExplanation(
        image=picture,
        model=loaded,
        caption=words,
        generated=generated,
        words=results,
        probabilities=probabilities[: len(words)],
        end_probability=probabilities[-1] if finished else None,
        grid=(int(height), int(width)),
        feature_layer=captioning.feature_layer,
        score_formula=captioning.score_formula,
        box=prepared.box,
        preprocessing=preprocessing,
        timings=timings,
    )


def _teacher_forced(
    module: torch.nn.Module, captioning: "Captioning", batch: torch.Tensor, steps: list[int], plugin: str
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """One teacher-forced forward with the feature map and every step's (α, e) recorded:
    (features (1, C, h, w), α per step, e per step, log-probabilities (1, T, V))."""
    recorded: dict[str, Any] = {}
    alphas: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []

    def keep_features(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            raise ModelRunError(
                f"The captioner's feature layer {captioning.feature_layer!r} gave "
                f"{type(output).__name__}, not a (batch, channels, height, width) map."
            )
        if not output.requires_grad:  # frozen weights: a leaf of our own, the same values
            output = output.detach().requires_grad_()
        recorded["features"] = output
        return output

    def keep_attention(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        try:
            alpha, score = captioning.read_attention(output)
            if alpha.dim() != 2 or score.shape != alpha.shape:
                raise ValueError(f"α {tuple(alpha.shape)} and e {tuple(score.shape)} are not both (batch, positions)")
        except Exception as error:  # the plugin's code, run inside the model's forward
            raise ModelRunError(
                f"Plugin {plugin}'s captioning().read_attention failed on the output of "
                f"{captioning.attention_module!r}: {error_line(error, 200)}"
            ) from error
        alphas.append(alpha)
        scores.append(score)

    try:
        feature_module = module.get_submodule(captioning.feature_layer)
        attention_module = module.get_submodule(captioning.attention_module)
    except AttributeError as error:
        raise MethodError(f"The captioner's plugin names a layer the model does not have: {error}") from None
    handles = [
        feature_module.register_forward_hook(keep_features),
        attention_module.register_forward_hook(keep_attention),
    ]
    try:
        with torch.enable_grad(), model_failures(module):
            log_probs = captioning.score(batch, torch.tensor([steps], dtype=torch.long, device=batch.device))
    finally:
        for handle in handles:
            handle.remove()
    features = recorded.get("features")
    if features is None or len(alphas) != len(steps):
        raise ModelRunError(
            f"The captioner recorded {len(alphas)} attention steps for {len(steps)} words"
            + ("" if features is not None else " and no feature map")
            + "; its plugin's captioning() does not describe its forward."
        )
    cells = features.shape[-2] * features.shape[-1]
    if alphas[0].shape[-1] != cells:
        raise ModelRunError(
            f"The captioner's attention has {alphas[0].shape[-1]} positions, its feature map "
            f"{tuple(features.shape[-2:])} has {cells}."
        )
    return features, alphas, scores, log_probs
