"""Values that come from files anyone can edit (records of earlier runs, boxes files, label files).

JSON has integers of any length and Python's parser accepts ``NaN`` and ``1e999``: ``float(10**400)``,
``math.isfinite(10**400)`` and ``math.ceil(1e308 + 1e308)`` raise ``OverflowError``, so a number
read from such a file is checked here before anything converts it. Text from them (class names,
file names) may hold control and bidirectional characters that rewrite a terminal's line.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Any

#: Unicode categories a terminal acts on instead of showing: controls (CR, LF, ESC), format
#: characters (U+202E RIGHT-TO-LEFT OVERRIDE, zero-width joiners), line and paragraph separators,
#: and lone surrogates (which cannot even be encoded for the terminal).
_NOT_SHOWN = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite JSON number (an int or float, not a bool, within
    the range of a float), else None."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond 1.8e308
        return None
    return number if math.isfinite(number) else None


def is_finite_number(value: Any) -> bool:
    """Whether :func:`finite_number` accepts ``value``."""
    return finite_number(value) is not None


def terminal_text(value: Any) -> str:
    """``value`` as text for a terminal: every control, bidirectional or other invisible format
    character written as its escape (``\\n``, ``\\x1b``, ``\\u202e``), the rest as it is."""
    text = str(value)
    if text.isprintable():  # the common case, in C
        return text
    return "".join(
        char.encode("unicode_escape").decode("ascii") if unicodedata.category(char) in _NOT_SHOWN else char
        for char in text
    )
