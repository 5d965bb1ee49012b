"""The user's own class as the architecture: ``--arch path/net.py:Net`` or ``package.module:Net``.

Naming one imports it, which runs the user's file: the user named it on the command line, as
``python net.py`` would. A name that a file gives is never imported (see :mod:`.trust`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .._files import not_a_regular_file
from ..errors import AttnExplainError, ModelLoadError
from .failures import load_failures_reported


def class_file(arch: str) -> Path | None:
    """The file ``--arch path/model.py:Class`` names (a Windows path's drive colon aside); None for a
    builder's name or ``package.module:Class``."""
    where = arch.rpartition(":")[0]
    return Path(where) if where.endswith(".py") or "/" in where or "\\" in where else None


def names_a_class(arch: str) -> bool:
    """``path/model.py:Class`` or ``package.module:Class`` (a Windows path's drive colon aside)."""
    where, _, name = arch.rpartition(":")
    return name.isidentifier() and (
        class_file(arch) is not None or all(part.isidentifier() for part in where.split("."))
    )


def user_class(arch: str) -> tuple[str, Callable[..., Any]]:
    """The user's own ``nn.Module`` class named by ``arch``, imported (which runs the user's file:
    the user named it on the command line, as ``python model.py`` would)."""
    import importlib
    import importlib.util
    import sys

    import torch

    where, _, name = arch.rpartition(":")
    path = class_file(arch)
    if path is not None:
        problem = not_a_regular_file(path)
        if problem is not None:
            raise ModelLoadError(f"The model class file {path} {problem} (--arch {arch[:120]}).")
        described = str(path)
        module_name = f"attnexplain_user_model_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ModelLoadError(f"{path} cannot be imported as Python (--arch {arch[:120]}).")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look classes up there
        # Its own imports (``from layers import Block``) are found beside it.
        sys.path.insert(0, str(path.resolve().parent))
        try:
            with load_failures_reported(f"Importing {path} failed"):
                spec.loader.exec_module(module)
        except AttnExplainError:
            sys.modules.pop(module_name, None)
            raise
        finally:
            if str(path.resolve().parent) in sys.path:
                sys.path.remove(str(path.resolve().parent))
    else:
        described = f"module {where}"
        with load_failures_reported(f"Importing {where} (--arch {arch[:120]}) failed"):
            module = importlib.import_module(where)
    found = getattr(module, name, None)
    if found is None:
        classes = sorted(
            key
            for key, value in vars(module).items()
            if isinstance(value, type) and issubclass(value, torch.nn.Module) and value.__module__ == module.__name__
        )
        defined = f"; its nn.Module classes: {', '.join(classes[:8])}" if classes else ""
        raise ModelLoadError(f"{described} has no class {name}{defined}.")
    if not (isinstance(found, type) and issubclass(found, torch.nn.Module)):
        raise ModelLoadError(f"{name} in {described} is a {type(found).__name__}, not a torch.nn.Module class.")
    return arch, found
