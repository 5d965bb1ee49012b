"""The passes through a captioner that :func:`attnexplain.captioning.explain_caption` runs.

- :func:`recorded_generation`: the model's own generation, which hands back every step's attention
  and log-probability (:attr:`Captioning.generate_recorded`): all words' attention from that one
  pass.
- :func:`teacher_forced`: one forward on the caption's words with the encoder's feature map kept
  in the autograd graph, for the gradient maps (one partial backward per word, down to the feature
  map and the attention only), and for the attention of a caption the user gives.

Why a teacher-forced forward for the gradients rather than generation under grad: a generator
searches (beam search keeps several hypotheses, most discarded; Hugging Face's ``generate`` runs
under ``no_grad`` and re-feeds one token at a time through its cache), so its graph would hold work
no word depends on; the teacher-forced forward's graph holds exactly the caption's words, in one
parallel pass for a transformer decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from .errors import MethodError, ModelRunError, error_line
from .running import model_failures

if TYPE_CHECKING:
    from .plugins import CaptionAttention, Captioning, CaptionSteps


@dataclass
class TeacherForced:
    """What one teacher-forced forward recorded."""

    tokens: torch.Tensor  # the feature layer's output, in the graph (gradients are taken here)
    log_probs: torch.Tensor  # (1, T, V)
    steps: "CaptionSteps | None"  # each step's attention when recorded in this pass, else None
    attention: "CaptionAttention | None"  # every attention map in the graph (score_attention)
    #: The output of the layer the CAM methods read (``layer``), in the graph: ``tokens`` by default.
    layer_output: torch.Tensor | None = None


def feature_map(captioning: "Captioning", tokens: torch.Tensor) -> torch.Tensor:
    """The feature layer's output as its (B, C, h, w) map (a token map laid on its grid)."""
    if captioning.feature_grid is None:
        return tokens
    try:
        grid = captioning.feature_grid(tokens)
    except Exception as error:  # the plugin's code
        raise ModelRunError(
            f"The captioner's plugin could not lay its feature tokens on their grid: {error_line(error, 200)}"
        ) from None
    return grid


def recorded_generation(
    module: torch.nn.Module, captioning: "Captioning", batch: torch.Tensor, plugin: str
) -> "CaptionSteps":
    """The model's own caption with every step's attention and log-probability, from one pass."""
    assert captioning.generate_recorded is not None
    with torch.no_grad(), model_failures(module):
        steps = captioning.generate_recorded(batch)
    count = len(steps.ids)
    shape = tuple(steps.attention.shape)
    cells = steps.grid[0] * steps.grid[1]
    scores = steps.alignment_scores
    if (
        steps.attention.dim() != 4
        or shape[0] != count
        or shape[-1] != cells
        or tuple(steps.log_probabilities.shape) != (count,)
        or (scores is not None and tuple(scores.shape) != shape)
    ):
        raise ModelRunError(
            f"Plugin {plugin}'s captioning().generate_recorded gave {count} words with attention {shape}, "
            f"log-probabilities {tuple(steps.log_probabilities.shape)} on a {steps.grid} grid; it must give "
            f"(words, layers, heads, h·w) and (words,)."
        )
    return steps


def teacher_forced(
    module: torch.nn.Module,
    captioning: "Captioning",
    batch: torch.Tensor,
    steps: list[int],
    plugin: str,
    record_attention: bool,
    layer: str | None = None,
    select: Callable[[str, Any], torch.Tensor | None] | None = None,
) -> TeacherForced:
    """One teacher-forced forward under grad with the feature map recorded, and, when
    ``record_attention``, each step's attention (``attention_module``'s (α, e), or the cross-attention
    of ``score_attention``). ``layer``: a module of the encoder whose output is recorded too, in the
    graph, for the CAM methods (``select``: which tensor of a module's several outputs)."""
    from .capture import capture_activations
    from .plugins import CaptionSteps

    recorded: dict[str, Any] = {}
    alphas: list[torch.Tensor] = []
    scores: list[torch.Tensor | None] = []

    def keep_features(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
        if not isinstance(output, torch.Tensor):
            raise ModelRunError(
                f"The captioner's feature layer {captioning.feature_layer!r} gave "
                f"{type(output).__name__}, not a tensor."
            )
        if not output.requires_grad:  # frozen weights: a leaf of our own, the same values
            output = output.detach().requires_grad_()
        recorded["tokens"] = output
        return output

    def keep_attention(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        try:
            alpha, score = captioning.read_attention(output)
            if alpha.dim() != 2 or (score is not None and score.shape != alpha.shape):
                shapes = f"α {tuple(alpha.shape)} and e {None if score is None else tuple(score.shape)}"
                raise ValueError(f"{shapes} are not both (batch, positions)")
        except Exception as error:  # the plugin's code, run inside the model's forward
            raise ModelRunError(
                f"Plugin {plugin}'s captioning().read_attention failed on the output of "
                f"{captioning.attention_module!r}: {error_line(error, 200)}"
            ) from error
        alphas.append(alpha)
        scores.append(score)

    hooks = [(captioning.feature_layer, keep_features)]
    if record_attention and captioning.score_attention is None:
        hooks.append((captioning.attention_module, keep_attention))
    try:
        modules = [(module.get_submodule(name), hook) for name, hook in hooks]
    except AttributeError as error:
        raise MethodError(f"The captioner's plugin names a layer the model does not have: {error}") from None
    handles = [submodule.register_forward_hook(hook) for submodule, hook in modules]
    words = torch.tensor([steps], dtype=torch.long, device=batch.device)
    attention = None
    other = layer is not None and layer != captioning.feature_layer
    captured: dict[str, torch.Tensor] = {}
    try:
        with (
            torch.enable_grad(),
            model_failures(module),
            capture_activations(module, [layer] if other else [], captured, select),  # type: ignore[list-item]
        ):
            if captioning.score_attention is not None:
                attention = captioning.score_attention(batch, words)
                log_probs = attention.log_probabilities
            else:
                log_probs = captioning.score(batch, words)
    finally:
        for handle in handles:
            handle.remove()
    if attention is not None:
        maps = [*attention.encoder, *attention.decoder, *attention.cross]
        if not maps or not all(map_.requires_grad for map_ in maps) or len(attention.decoder) != len(attention.cross):
            raise ModelRunError(
                f"Plugin {plugin}'s captioning().score_attention gave attention maps outside the autograd graph "
                f"(or as many decoder self-attention as cross-attention layers): no relevance can be computed."
            )
    tokens = recorded.get("tokens")
    if tokens is None:
        raise ModelRunError(
            "The captioner recorded no feature map; its plugin's captioning() does not describe its forward."
        )
    grid = feature_map(captioning, tokens)
    if grid.dim() != 4:
        raise ModelRunError(
            f"The captioner's feature layer {captioning.feature_layer!r} gave {tuple(grid.shape)}, "
            f"not a (batch, channels, height, width) map."
        )
    height, width = int(grid.shape[-2]), int(grid.shape[-1])
    cells = height * width
    if tuple(log_probs.shape[:2]) != (1, len(steps)):
        raise ModelRunError(
            f"The captioner scored {tuple(log_probs.shape)} for {len(steps)} words; (1, words, vocabulary) expected."
        )
    chosen = log_probs[0, torch.arange(len(steps), device=words.device), words[0]].detach()  # each word's
    recorded_steps = None
    if record_attention and attention is not None:
        start = attention.grid_start
        cross = torch.stack(
            [layer[0, :, :, start : start + cells] for layer in attention.cross]
        )  # (layers, heads, T, L)
        recorded_steps = CaptionSteps(
            ids=steps,
            log_probabilities=chosen,
            attention=cross.permute(2, 0, 1, 3).detach(),
            grid=(height, width),
        )
    elif record_attention:
        if len(alphas) != len(steps):
            raise ModelRunError(
                f"The captioner recorded {len(alphas)} attention steps for {len(steps)} words; "
                f"its plugin's captioning() does not describe its forward."
            )
        if alphas[0].shape[-1] != cells:
            raise ModelRunError(
                f"The captioner's attention has {alphas[0].shape[-1]} positions, its feature map "
                f"{(height, width)} has {cells}."
            )
        with_scores = all(score is not None for score in scores)
        recorded_steps = CaptionSteps(
            ids=steps,
            log_probabilities=chosen,
            attention=torch.stack([alpha[0] for alpha in alphas]).detach()[:, None, None, :],
            grid=(height, width),
            alignment_scores=torch.stack([s[0] for s in scores]).detach()[:, None, None, :]  # type: ignore[index]
            if with_scores
            else None,
        )
    if other and layer not in captured:
        raise MethodError(f"The layer {layer!r} was not called while the captioner scored its caption.")
    layer_output = captured[layer] if other else tokens  # type: ignore[index]
    return TeacherForced(
        tokens=tokens, log_probs=log_probs, steps=recorded_steps, attention=attention, layer_output=layer_output
    )
