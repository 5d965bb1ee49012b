"""How one ``--target`` text names several classes: ``cat,dog``, each name stripped; a name that
holds a comma (or starts with a quote) is quoted as a CSV field is, ``"a, b",c``, a quote inside it
doubled (``""``). The text is the user's: a malformed one is one line of error, never a
traceback, however long."""

from __future__ import annotations

import csv

from .errors import MethodError, shown

#: A ``--target`` text longer than this is no list of class names (csv's own field limit is larger).
MAX_TARGET_TEXT = 100_000


def target_names(text: str) -> list[str]:
    """The class names ``text`` lists (see the module's docstring), empty ones left out."""
    if '"' not in text:
        return [part.strip() for part in text.split(",") if part.strip()]
    if len(text) > MAX_TARGET_TEXT:
        raise MethodError(f"The target list is over {MAX_TARGET_TEXT:,} characters; name the classes to explain.")
    try:
        rows = list(csv.reader([text], skipinitialspace=True, strict=True))
    except csv.Error as error:
        raise MethodError(
            f"The targets {shown(text)} are not comma-separated names quoted as in CSV ({error}): quote a name "
            f'that holds a comma, "a, b",c, with no space after its closing quote and a quote inside it doubled.'
        ) from None
    return [name.strip() for row in rows for name in row if name.strip()]


def unquoted_target(text: str) -> str:
    """A single target's class name: ``text`` itself, or the name it quotes (``"a, b"``)."""
    if not text.lstrip().startswith('"'):
        return text
    names = target_names(text)
    if len(names) != 1:
        raise MethodError(f"{shown(text)} names {len(names)} classes where one target is asked for.")
    return names[0]
