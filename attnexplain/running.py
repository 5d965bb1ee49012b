"""Running the model: the model as every pass calls it (with its plugin's forward arguments), the
device it runs on, and its own failures turned into one-line errors."""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from .capture import replaced_forward
from .errors import AttnExplainError, ModelRunError
from .targets import class_scores

if TYPE_CHECKING:
    from .loading import LoadedModel


@contextmanager
def model_failures(module: torch.nn.Module) -> Iterator[None]:
    """Turn the model's own failures in the block into :class:`ModelRunError` with the cause: an
    exception raised by its forward (named with the input's shape and what to try), and
    ``SystemExit`` from its forward or backward, which would otherwise end the program silently."""

    def guarded(forward, *args, **kwargs):
        try:
            return forward(*args, **kwargs)
        except AttnExplainError:  # ours, raised by a hook inside the forward: already precise
            raise
        except Exception as error:
            raise ModelRunError(_forward_failure(error, args)) from error

    try:
        with replaced_forward(module, guarded):
            yield
    except SystemExit as exiting:
        raise ModelRunError(
            f"The model's code called exit() (SystemExit({exiting.code!r})) while it "
            f"ran; a model must return its scores, not end the program."
        ) from None


_FORWARD_HINTS = (
    (
        re.compile(r"channels", re.I),
        "attnexplain feeds RGB images (3 channels); this model expects another number of channels",
    ),
    (
        re.compile(r"too small|can't be greater than actual input size|non-positive|size \d+ is too", re.I),
        "the input size may be too small for the model's downsampling: try a larger --size "
        "(the size it was trained at)",
    ),
    (
        re.compile(
            r"wrong image (height|width)|image size|shapes cannot be multiplied|size mismatch|"
            r"must match the size|to be equal to \d+, but got \d+",
            re.I,
        ),
        "the model expects another input size: set --size to the size it was trained at",
    ),
)


def _forward_failure(error: Exception, args: tuple[Any, ...]) -> str:
    shape = f" of shape {tuple(args[0].shape)}" if args and isinstance(args[0], torch.Tensor) else ""
    text = " ".join(str(error).split()) or "(no message)"
    if len(text) > 300:
        text = text[:300] + "..."
    hint = next(
        (hint for pattern, hint in _FORWARD_HINTS if pattern.search(text)),
        "check that --arch, --size, --mean and --std fit the model (--debug shows the traceback)",
    )
    end = "" if text.endswith((".", "!", "?")) else "."
    return f"The model raised {type(error).__name__} on an input{shape}: {text}{end} Hint: {hint}."


def model_as_called(loaded: "LoadedModel", input_size: tuple[int, int]) -> Callable[[torch.Tensor], Any]:
    """The model as every pass calls it: ``inputs`` → its raw output, with the keyword arguments its
    plugin asks for at this input size (:meth:`~attnexplain.plugins.ModelPlugin.forward_kwargs`)."""
    module = loaded.module
    kwargs = loaded.plugin.forward_kwargs(module, tuple(input_size))
    if not kwargs:
        return module
    return lambda inputs: module(inputs, **kwargs)


def scores_of(loaded: "LoadedModel", input_size: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model as a function from input to (B, classes) target scores, as its plugin defines them."""
    call = model_as_called(loaded, input_size)
    return lambda inputs: class_scores(loaded, call(inputs))[0]


def probabilities_of(loaded: "LoadedModel", input_size: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model as a function from input to (B, classes) probabilities, as its plugin defines them
    (for a contrast, each less the contrasted class's; negated for target negative: RISE's and the
    metrics' score, :meth:`~attnexplain.scoring.Scoring.explained`)."""
    call = model_as_called(loaded, input_size)
    return lambda inputs: loaded.scoring.explained(class_scores(loaded, call(inputs))[1], loaded.labels)


def model_device(module: Any) -> torch.device:
    """The device ``module``'s parameters are on (the CPU for a model without any): where its inputs go."""
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")
