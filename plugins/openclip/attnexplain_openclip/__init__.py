"""attnexplain plugin for OpenCLIP: see :mod:`attnexplain_openclip.plugin`.

Importing this package imports neither torch nor open_clip: discovering the plugin costs nothing.
"""

__version__ = "0.1.0"
