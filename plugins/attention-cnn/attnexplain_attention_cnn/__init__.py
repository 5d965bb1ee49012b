"""attnexplain plugin for a Show-Attend-Tell-style attention-pooling CNN and a CBAM CNN.

``attnexplain_attention_cnn.model`` holds the attention-pooling model (:class:`AttentionPoolingCNN`),
``attnexplain_attention_cnn.cbam`` the CBAM one (:class:`CBAMCNN`),
``attnexplain_attention_cnn.captioner`` a Show, Attend and Tell captioner (:class:`ShowAttendTell`), and
``attnexplain_attention_cnn.plugin`` the :class:`attnexplain.plugins.ModelPlugin` that attnexplain
finds through the ``attnexplain.plugins`` entry point. Importing the package does not import torch
(plugin discovery stays cheap); the model classes load on first use.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["AttentionPoolingCNN", "SoftAttentionPooling", "CBAMCNN", "CBAM", "ShowAttendTell", "AdditiveAttention"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import captioner, cbam, model

        return getattr(next(m for m in (model, cbam, captioner) if hasattr(m, name)), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
