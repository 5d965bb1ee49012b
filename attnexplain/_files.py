"""What kind of thing a path names, found without opening it.

Opening a FIFO blocks until a writer appears, and reading a device (``/dev/zero``, ``/dev/urandom``)
never ends: every input the user names (model, image, labels, list file) is checked here, with
``os.stat``, before anything reads it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def not_a_regular_file(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as a file ("does not exist", "is a FIFO (named pipe)", ...), or
    None for a regular file (symbolic links are followed)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        try:  # a dangling symbolic link exists but points nowhere
            os.lstat(path)
        except OSError:
            return "does not exist"
        return "is a symbolic link to nothing"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "is a symbolic link loop"
        if error.errno == errno.ENAMETOOLONG:
            return "has a name too long for this system"
        return f"cannot be read ({error.strerror or error})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe), not a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a file"
    return "is not a regular file"
