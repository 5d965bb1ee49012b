"""``python -m attnexplain.cli``, as ``python -m attnexplain``."""

from . import main

main()
