"""The ``attnexplain`` command: parses arguments, calls the Python API, prints.

The group and its error handling are in :mod:`.group`; the options several commands share, which
hand a command the objects the Python API takes, in :mod:`.option_groups`; the commands that
explain and measure (``run``, ``batch``, ``evaluate``, ``merge``) in :mod:`.explaining`, those
that list (``plugins``, ``models``, ``methods``, ``layers``) in :mod:`.listing`; what they print
on the terminal in :mod:`.printing`.

Nothing heavy is imported at module level, so ``attnexplain --help`` answers without loading torch.
"""

from __future__ import annotations

from .explaining import batch, evaluate, merge, run
from .group import main
from .listing import layers, methods, models, plugins

__all__ = ["main"]

for _command in (run, batch, evaluate, merge, plugins, models, methods, layers):
    main.add_command(_command)
