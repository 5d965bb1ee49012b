"""Errors a person can act on.

Every failure that comes from the user's input (a file that is not an image, a model that cannot be
loaded, a layer that does not exist) is raised as an :class:`AttnExplainError`. The CLI prints its
message as one line and exits non-zero; the Python API lets it propagate.
"""

from __future__ import annotations


class AttnExplainError(Exception):
    """Base class: the message is a complete sentence shown to the user as is."""

    def __init__(self, message: str) -> None:
        # One line, always: the CLI promises a single-line error.
        super().__init__(" ".join(str(message).split()))


def error_line(error: BaseException, limit: int | None = None) -> str:
    """``Type: message``, its first line only (cut to ``limit`` characters), for an error that must
    not break the others: a broken plugin in a listing."""
    line = f"{type(error).__name__}: {error}".splitlines()[0]
    return line if limit is None else line[:limit]


def shown(value: object, limit: int = 80) -> str:
    """An untrusted value (from a file, a record) for an error line: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ImageError(AttnExplainError):
    """The image is missing, empty, truncated, too large or not an image."""


class ModelLoadError(AttnExplainError):
    """The model file or specification cannot be turned into a model."""


class UntrustedModelError(ModelLoadError):
    """The file is a pickled object whose loading could run arbitrary code."""


class WeightsDoNotFit(ModelLoadError):
    """The architecture's tensors differ from the state_dict's; ``detail`` says how."""

    def __init__(self, arch: str, detail: str) -> None:
        super().__init__(f"The weights do not fit {arch}: {detail}. Is --arch right?")
        self.detail = detail


class MethodError(AttnExplainError):
    """The explanation method does not apply to this model, layer or target."""


class PluginError(AttnExplainError):
    """A plugin is missing, broken, or does not handle the model."""


class NothingToExplain(MethodError):
    """The model scores no class in this image (a detector found no box): an outcome of the image,
    so a batch records it for the images concerned and goes on."""

    def __init__(
        self,
        message: str = "The model scores no class above 0 in this image (a detector "
        "found no box above its score threshold), so there is "
        "nothing to explain.",
    ) -> None:
        super().__init__(message)


class ModelRunError(AttnExplainError):
    """The model failed while running: it raised, ended the program, or returned scores that
    cannot be explained (NaN, no classes, the wrong batch size)."""


class OutputError(AttnExplainError):
    """The output folder cannot be created or written (a file in the way, read-only, full disk)."""
