"""attnexplain plugin for Hugging Face transformers: see :mod:`attnexplain_transformers.plugin`.

Importing this package imports neither torch nor transformers: discovering the plugin costs nothing.
"""

__version__ = "0.1.0"
