"""attnexplain: show where a trained vision model looks.

>>> import attnexplain
>>> result = attnexplain.explain("model.pt", "photo.jpg")   # doctest: +SKIP
>>> result.save("out/photo")                                # doctest: +SKIP

The public names are imported lazily so that ``import attnexplain`` (and the CLI's ``--help``)
does not pay for importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "explain",
    "Explanation",
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
    "load_model": "loading",
    "LoadedModel": "loading",
    "load_image": "images",
    "LoadedImage": "images",
    "ModelPlugin": "plugins",
    "AttnExplainError": "errors",
    "METHODS": "methods",
    "MethodOptions": "options",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'attnexplain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
