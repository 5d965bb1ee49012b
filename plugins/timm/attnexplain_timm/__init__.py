"""attnexplain plugin for timm (PyTorch Image Models): see :mod:`attnexplain_timm.plugin`."""

__version__ = "0.1.0"
