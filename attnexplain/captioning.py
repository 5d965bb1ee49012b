"""Explaining a captioner: its caption, and for each word where the model looked.

A captioning model's plugin says how it writes a caption and scores a word and which module
attends over the image at each step (:class:`attnexplain.plugins.Captioning`). For a caption — the
model's own (generated as the model does) or one the user gives (``--caption``, scored by teacher
forcing) — the core records, for every word:

- α, the model's learned attention over the feature map's positions (the weights its context
  vector is the average under), and e, the alignment scores α is the softmax of (where the model
  exposes them); a transformer decoder's cross-attention per layer and head. For the model's own
  caption they come from its generation itself when the plugin records them there;
- the word's log-probability, whose gradient with respect to the feature map gives Grad-CAM
  (Selvaraju et al. 2017) of that word, and, for an encoder–decoder transformer, Chefer et al.
  2021b's relevance: one teacher-forced forward, then one backward per word, down to the feature
  map and the attention only (:mod:`attnexplain.caption_passes`). ``methods`` and ``layer`` choose
  other maps of it: any CAM of a layer's activation and gradient from that same backward, and
  Captum's attributions to the pixels (:mod:`attnexplain.caption_methods`).

Nothing here names a model: the plugin answers every model-specific question.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from .caption_methods import cam_layer_map, cam_word_maps, caption_methods, input_word_maps, word_scores
from .caption_passes import feature_map, recorded_generation, teacher_forced
from .errors import MethodError, ModelRunError, NothingToExplain, error_line, shown
from .formats import DEFAULT_COLORMAP
from .images import LoadedImage, image_from
from .loading import LoadedModel, load_model
from .methods.combine import upsample
from .methods.encoder_decoder import query_relevance
from .options import MethodOptions
from .planning import plan_preprocessing
from .plugins import EncoderDecoderAttention
from .preprocess import Preprocessing, prepare
from .running import model_device, model_failures

if TYPE_CHECKING:
    from .plugins import CaptionAttention, Captioning


@dataclass
class WordExplanation:
    """One word of the caption: its probability and where the model looked for it."""

    word: str
    position: int  # 0-based place in the caption
    probability: float  # p(word | image, the words before it)
    attention: np.ndarray  # α, upsampled to the model's input (H, W); sums to 1 on the grid
    attention_grid: np.ndarray  # α on the feature map's grid (h, w)
    alignment_scores: np.ndarray | None  # e on the grid (h, w): α = softmax(e); None: the model exposes none
    #: Each chosen gradient method's map of the word's log-probability, at the model's input (H, W),
    #: in the order chosen (:mod:`attnexplain.caption_methods`): Grad-CAM by default.
    maps: dict[str, np.ndarray]
    #: The attention as recorded, (layers, heads, h, w): each decoder layer's and head's attention
    #: over the grid (special tokens dropped; (1, 1, h, w) for a single soft attention).
    layer_attention: np.ndarray | None = None
    #: An encoder–decoder's relevance of the image for the word (Chefer et al. 2021b), at the
    #: model's input (H, W) and on the grid (h, w); None where the plugin gives no score_attention.
    relevance: np.ndarray | None = None
    relevance_grid: np.ndarray | None = None

    @property
    def log_probability(self) -> float:
        return float(np.log(max(self.probability, 1e-45)))

    @property
    def gradcam(self) -> np.ndarray | None:
        """Grad-CAM of the word's log-probability (H, W), where it was chosen."""
        return self.maps.get("gradcam")

    def map_named(self, name: str) -> np.ndarray | None:
        """The word's map called ``name`` at the model's input (H, W): ``attention`` (α),
        ``relevance``, or a chosen method's; None where it has none."""
        if name == "attention":
            return self.attention
        if name == "relevance":
            return self.relevance
        return self.maps.get(name)


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
    attention_layout: tuple[int, int] = (1, 1)  # (layers, heads) of each word's recorded attention
    #: What produced each word's attention: "generation" (recorded while the model wrote its
    #: caption) or "teacher forcing" (a given caption, or a plugin without generate_recorded).
    attention_source: str = "teacher forcing"
    #: The caption's token ids (without the end word): what scores it again, as a tokenizer's text may
    #: not give the same tokens back (a subword, a token with spaces or punctuation in it).
    ids: list[int] = field(default_factory=list)
    #: The gradient methods each word was explained by (their maps: :attr:`WordExplanation.maps`).
    methods: list[str] = field(default_factory=lambda: ["gradcam"])
    #: The layer the CAM methods read: ``feature_layer`` unless another was chosen.
    cam_layer: str | None = None

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
                    "alignment_scores": None
                    if word.alignment_scores is None
                    else {
                        "min": float(word.alignment_scores.min()),
                        "max": float(word.alignment_scores.max()),
                        "mean": float(word.alignment_scores.mean()),
                        "std": float(word.alignment_scores.std()),
                    },
                    "relevance_peak": None if word.relevance_grid is None else _peak(word.relevance_grid),
                    "maps": {
                        name: {"peak": _peak(heatmap), "max": float(heatmap.max())}
                        for name, heatmap in word.maps.items()
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
            "methods": list(self.methods),
            "cam_layer": self.cam_layer or self.feature_layer,
            "alignment_score_formula": self.score_formula,
            "attention_layout": {"layers": self.attention_layout[0], "heads": self.attention_layout[1]},
            "attention_source": self.attention_source,
            "relevance_method": "chefer2021b" if any(w.relevance is not None for w in self.words) else None,
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
    """A caption the user gives, as word ids (by the model's tokenizer where the plugin has one);
    a :class:`MethodError` names a word not in the model's vocabulary."""
    words = caption.split()
    if not words:
        raise MethodError("The caption to score is empty; give its words, e.g. --caption 'a cat on grass'.")
    if captioning.encode is not None:
        try:
            ids = [int(i) for i in captioning.encode(caption)]
        except Exception as error:  # the plugin's tokenizer
            raise MethodError(
                f"The captioner's tokenizer could not read the caption: {error_line(error, 200)}"
            ) from None
        if not ids or not all(0 <= i < len(captioning.vocabulary) for i in ids):
            raise MethodError(f"The captioner's tokenizer gave no word of its vocabulary for {shown(caption)}.")
        return ids
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
    methods: str | Sequence[str] | None = None,
    layer: str | None = None,
    options: MethodOptions | None = None,
) -> CaptionExplanation:
    """Caption ``image`` with a captioning ``model`` and explain each word.

    ``caption``: score these words (teacher forcing) instead of the model's own caption. ``target``:
    explain only this word (each place it appears); the caption's other words keep their
    probabilities. ``model`` and ``image`` are what :func:`attnexplain.explain` accepts.
    ``methods``: each word's gradient maps (names or comma-separated; default Grad-CAM): the CAM
    methods of a layer's activation and gradient, and Captum's input attributions
    (:mod:`attnexplain.caption_methods` says which apply); ``layer``: the encoder's module the CAM
    methods read (default: the plugin's feature map); ``options``: the methods' settings
    (integrated gradients' steps and baseline, ...).

    The model's own caption: every word's attention and probability come from its generation when
    the plugin records them there (``generate_recorded``); one teacher-forced forward then keeps the
    feature map (and every attention) in the graph, and each explained word costs one backward down
    to them: Grad-CAM, and Chefer's encoder–decoder relevance where the plugin gives the attention.
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
    module, plugin = loaded.module, loaded.plugin.name
    chosen = caption_methods(methods, loaded.plugin)
    cam_methods = [m for m in chosen if m.family == "cam"]
    input_methods = [m for m in chosen if m.family == "input"]
    options = options or MethodOptions()
    preprocessing = plan_preprocessing(loaded, size=size, mean=mean, std=std)
    prepared = prepare(picture.pixels, preprocessing)
    batch = prepared.tensor.to(model_device(module))
    black = -torch.tensor(preprocessing.mean) / torch.tensor(preprocessing.std)  # pixel 0, normalised
    timings["preprocess_s"] = time.perf_counter() - started

    started = time.perf_counter()
    recorded = None
    with loaded.plugin.recording(module):
        if caption is not None:
            ids, generated, finished = caption_ids(captioning, caption), False, True
        else:
            if captioning.generate_recorded is not None:
                recorded = recorded_generation(module, captioning, batch, plugin)
                ids = [int(i) for i in recorded.ids]
            else:
                with torch.no_grad(), model_failures(module):
                    ids = [int(i) for i in captioning.generate(batch)]
            generated = True
            finished = bool(ids) and ids[-1] == captioning.end
            ids = ids[:-1] if finished else ids
            if not ids:
                raise NothingToExplain("The model's caption for this image is empty, so there is no word to explain.")
        timings["generate_s"] = time.perf_counter() - started
        words = [captioning.vocabulary[i].strip() for i in ids]
        explained = list(range(len(words)))
        if target is not None:
            explained = [t for t, word in enumerate(words) if word == target]
            if not explained:
                raise MethodError(f"The word {shown(target)} is not in the caption {shown(' '.join(words))}.")

        started = time.perf_counter()
        steps = ids + [captioning.end] if finished else ids
        forward = teacher_forced(
            module,
            captioning,
            batch,
            steps,
            plugin,
            record_attention=recorded is None,
            layer=layer,
            select=lambda name, output: loaded.plugin.select_output(module, name, output),
        )
        timings["score_s"] = time.perf_counter() - started
    recorded = recorded if recorded is not None else forward.steps
    assert recorded is not None

    started = time.perf_counter()
    height, width = recorded.grid
    tokens = forward.tokens
    features = feature_map(captioning, tokens.detach())
    if tuple(features.shape[-2:]) != (height, width):
        raise ModelRunError(
            f"The captioner's attention lies on a {recorded.grid} grid, its feature map on "
            f"{tuple(features.shape[-2:])}."
        )
    input_size = (int(batch.shape[-2]), int(batch.shape[-1]))
    word_log_probs = [forward.log_probs[0, t, steps[t]] for t in range(len(steps))]
    attention_maps = forward.attention
    assert forward.layer_output is not None
    layer_as_map = cam_layer_map(
        loaded, captioning, layer or captioning.feature_layer, forward.layer_output, tokens, batch
    )
    activation = layer_as_map(forward.layer_output.detach()).float()
    if activation.dim() != 4:
        raise MethodError(f"The layer {layer!r} gives {tuple(activation.shape)}, not a (batch, channels, h, w) map.")
    needs_gradient = any(m.needs_gradient for m in cam_methods) or attention_maps is not None
    inputs = [forward.layer_output]
    if attention_maps is not None:
        inputs += [*attention_maps.encoder, *attention_maps.decoder, *attention_maps.cross]
    layers, heads = int(recorded.attention.shape[1]), int(recorded.attention.shape[2])
    # The CAMs without a gradient (Eigen-CAM, KPCA-CAM) are the layer's own: once for every word.
    shared = cam_word_maps([m for m in cam_methods if not m.needs_gradient], activation, None, options.eigen_smooth)
    shared = {name: upsample(grid, input_size)[0] for name, grid in shared.items()}
    results = []
    for t in explained:
        gradients: tuple[torch.Tensor, ...] = ()
        if needs_gradient:  # one partial backward for every CAM and the relevance
            found = torch.autograd.grad(word_log_probs[t], inputs, retain_graph=True, allow_unused=True)
            gradients = tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, found))
        gradient = layer_as_map(gradients[0]).float() if gradients else None
        grids = cam_word_maps([m for m in cam_methods if m.needs_gradient], activation, gradient, options.eigen_smooth)
        word_maps = {**shared, **{name: upsample(grid, input_size)[0] for name, grid in grids.items()}}
        if input_methods:
            with loaded.plugin.recording(module), model_failures(module):
                scored = input_word_maps(input_methods, word_scores(captioning, steps), batch, t, black, options)
            word_maps.update(
                {name: upsample(attribution.float(), input_size)[0] for name, attribution in scored.items()}
            )
        per_layer = recorded.attention[t].float().reshape(layers, heads, height, width)
        averaged = per_layer.mean(dim=(0, 1))
        alpha_grid = (averaged / averaged.sum().clamp_min(1e-30))[None]
        relevance_grid = None
        if attention_maps is not None:
            relevance_grid = _relevance(attention_maps, gradients[1:], t, (height, width))
        scores = recorded.alignment_scores
        results.append(
            WordExplanation(
                word=words[t],
                position=t,
                probability=float(recorded.log_probabilities[t].exp()),
                attention=upsample(alpha_grid, input_size)[0].cpu().numpy(),
                attention_grid=alpha_grid[0].cpu().numpy(),
                alignment_scores=None
                if scores is None
                else scores[t].float().mean(dim=(0, 1)).reshape(height, width).cpu().numpy(),
                maps={m.name: word_maps[m.name].detach().cpu().numpy() for m in chosen},
                layer_attention=per_layer.cpu().numpy(),
                relevance=None
                if relevance_grid is None
                else upsample(relevance_grid[None], input_size)[0].cpu().numpy(),
                relevance_grid=None if relevance_grid is None else relevance_grid.cpu().numpy(),
            )
        )
    timings["explain_s"] = time.perf_counter() - started
    probabilities = [float(p.exp()) for p in recorded.log_probabilities]
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
        attention_layout=(layers, heads),
        attention_source="teacher forcing" if recorded is forward.steps else "generation",
        ids=list(ids),
        methods=[m.name for m in chosen],
        cam_layer=layer,
    )


def _relevance(
    attention: "CaptionAttention", gradients: Sequence[torch.Tensor], t: int, grid: tuple[int, int]
) -> torch.Tensor:
    """Word ``t``'s relevance over the image's grid (h, w), by Chefer et al. 2021b's rules."""
    encoder, decoder = len(attention.encoder), len(attention.decoder)
    if decoder != len(attention.cross):
        raise ModelRunError(
            f"The captioner recorded {decoder} decoder self-attention layers but {len(attention.cross)} "
            f"cross-attention layers."
        )
    # The order the model runs them: the encoder, then per decoder layer its self- and cross-attention.
    layers = [EncoderDecoderAttention(a, "encoder") for a in attention.encoder]
    ordered = list(gradients[:encoder])
    for k in range(decoder):
        layers += [
            EncoderDecoderAttention(attention.decoder[k], "decoder"),
            EncoderDecoderAttention(attention.cross[k], "cross"),
        ]
        ordered += [gradients[encoder + k], gradients[encoder + decoder + k]]
    with torch.no_grad():
        relevance = query_relevance(layers, ordered)
    cells = grid[0] * grid[1]
    return relevance[0, t, attention.grid_start : attention.grid_start + cells].detach().reshape(grid)
