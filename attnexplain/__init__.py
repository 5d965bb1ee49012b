"""attnexplain: show where a trained vision model looks.

>>> import attnexplain
>>> result = attnexplain.explain("model.pt", "photo.jpg")   # doctest: +SKIP
>>> result.save("out/photo")                                # doctest: +SKIP

The public names are imported lazily so that ``import attnexplain`` (and the CLI's ``--help``)
does not pay for importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and editors see; at run time __getattr__ imports on first use
    from .captioning import CaptionExplanation, explain_caption
    from .errors import AttnExplainError
    from .explanation import Explanation, explain
    from .figures import figure
    from .images import LoadedImage, load_image
    from .loading import LoadedModel, load_model
    from .methods import METHODS
    from .options import MethodOptions
    from .plugins import ModelPlugin

__all__ = [
    "explain",
    "Explanation",
    "figure",
    "explain_caption",
    "CaptionExplanation",
    "load_model",
    "LoadedModel",
    "load_image",
    "LoadedImage",
    "MethodOptions",
    "ModelPlugin",
    "AttnExplainError",
    "METHODS",
]

_HOMES = {
    "explain": "explanation",
    "Explanation": "explanation",
    "figure": "figures",
    "explain_caption": "captioning",
    "CaptionExplanation": "captioning",
    "load_model": "loading",
    "LoadedModel": "loading",
    "load_image": "images",
    "LoadedImage": "images",
    "ModelPlugin": "plugins",
    "AttnExplainError": "errors",
    "METHODS": "methods",
    "MethodOptions": "options",
}


if not TYPE_CHECKING:  # hidden from type checkers, which then flag a name attnexplain does not export

    def __getattr__(name: str) -> Any:
        if name in _HOMES:
            return getattr(import_module(f".{_HOMES[name]}", __name__), name)
        raise AttributeError(f"module 'attnexplain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
