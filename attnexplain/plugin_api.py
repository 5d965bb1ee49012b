"""The plugin API: everything a model plugin imports from attnexplain, in one module.

A plugin (``docs/plugins.md``) imports from here alone::

    from attnexplain.plugin_api import CatalogEntry, ModelPlugin, TokenGrid

The names live in the core's modules; this is their one address for plugins, so the core may
reorganise itself without breaking a plugin. attnexplain's own torchvision plugin
(:mod:`attnexplain.default_plugins`) and the plugins shipped in ``plugins/`` import from here too,
exactly as a third party's would, and ``tests/test_plugin_api.py`` holds them to it.

Importing this module does not import torch: attnexplain imports every installed plugin to list them
(``attnexplain plugins``), and a listing must stay cheap. The names that need torch (the capture
helpers, ``Method`` and the methods' functions) are imported when first used, so import them inside
the hook that needs them (or under ``if TYPE_CHECKING:`` for annotations).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Files: why a path a plugin is about to read is not a regular file (a FIFO blocks, a device never
# ends), checked before opening it; None for a file.
from ._files import not_a_regular_file

# Errors: what a plugin raises for what the user can fix, one sentence each (the CLI prints one
# line). ModelLoadError (building, loading; UntrustedModelError: loading would run the file's code),
# MethodError (methods, layers), PluginError (a hook the plugin does not provide), all
# AttnExplainErrors. shown() quotes a value read from a file in such a message, cut short.
from .errors import AttnExplainError, MethodError, ModelLoadError, PluginError, UntrustedModelError, shown

# The answers of ModelPlugin.layer_layout: how a layer's 4-D output is laid out.
from .layout import CHANNELS_FIRST, CHANNELS_LAST, NOT_A_MAP

# The plugin. Subclass ModelPlugin, override the hooks that apply (each defaults to "don't know")
# and publish an instance under the entry-point group ``attnexplain.plugins``; leave api_version at
# PLUGIN_API_VERSION. The data classes are what the hooks return: CatalogEntry (catalog), NamedModel
# (load_named, load_path), TokenGrid (token_grid), TokenReadout (token_readout), Detections
# (detections), and what capture_attention records when attention is not one (batch, heads,
# queries, keys) tensor: WindowedAttention (inside windows of a token map), SpatialAttention (over a
# layer's own grid), EncoderDecoderAttention (a layer of an encoder–decoder transformer, with its
# role). vit_cam_block picks a class-token ViT's default CAM block (default_layer); classification_logits
# reads logits off a classifier's output (what class_scores does by default).
# Captioning (captioning) says how a captioner generates, scores a word and records its per-step
# attention over the image; CaptionSteps is what its generation recorded (generate_recorded) and
# CaptionAttention a teacher-forced forward's attention for the encoder–decoder relevance.
# Tests: use_plugins makes attnexplain see the given plugins (ModelPlugin instances, or PluginInfo
# rows with a distribution or an error) as the installed ones inside a ``with`` block.
from .plugins import (
    PLUGIN_API_VERSION,
    CaptionAttention,
    Captioning,
    CaptionSteps,
    CatalogEntry,
    Detections,
    EncoderDecoderAttention,
    ModelPlugin,
    NamedModel,
    PluginInfo,
    SpatialAttention,
    TokenGrid,
    TokenReadout,
    WindowedAttention,
    classification_logits,
    use_plugins,
    vit_cam_block,
)

# Preprocessing, what the preprocessing hook and NamedModel carry, and the helpers that check the
# values a plugin reads from a model's files or a library's config: sizes (normalize_size, with
# FILE_MAX_SIZE as the limit for a file's word), mean and std (normalization_values), and a
# torchvision weights preset's transforms (from_torchvision_transforms).
from .preprocess import FILE_MAX_SIZE, Preprocessing, from_torchvision_transforms, normalization_values, normalize_size

#: The names that need torch, imported on first use: name → its module in the package.
_NEEDS_TORCH = {
    # Recording, for capture_attention and capture_gates: a softmax computed inside a module
    # (capture_softmax), nn.MultiheadAttention's weights and squeeze-and-excitation gates (the
    # defaults), a module's forward replaced for the duration (replaced_forward), the positions of
    # a Swin-style shifted-window partition (for WindowedAttention), and the gradient with respect
    # to a recording (attention_gradients: to test that a recording is the tensor the model used).
    "capture_softmax": "capture",
    "capture_multihead_attention": "capture",
    "capture_channel_gates": "capture",
    "replaced_forward": "capture",
    "shifted_window_positions": "capture",
    "attention_gradients": "capture",
    # A method under a name of the plugin's own (ModelPlugin.methods): its registry row, and the
    # attention family's function for attention recorded as SpatialAttention.
    "Method": "methods",
    "spatial_attention": "methods.attention",
    # A prompt classifier's base (with_prompts): the prompts' text embeddings, the model's scale and
    # bias, its logits and what they mean (softmax, sigmoid, one prompt's cosine).
    "PromptLogits": "prompt_logits",
}

if TYPE_CHECKING:
    from .capture import (
        attention_gradients,
        capture_channel_gates,
        capture_multihead_attention,
        capture_softmax,
        replaced_forward,
        shifted_window_positions,
    )
    from .methods import Method
    from .methods.attention import spatial_attention
    from .prompt_logits import PromptLogits

__all__ = [
    # the plugin
    "ModelPlugin",
    "PLUGIN_API_VERSION",
    "CatalogEntry",
    "NamedModel",
    "TokenGrid",
    "TokenReadout",
    "Detections",
    "WindowedAttention",
    "SpatialAttention",
    "EncoderDecoderAttention",
    "vit_cam_block",
    "classification_logits",
    "Captioning",
    "CaptionSteps",
    "CaptionAttention",
    # layouts
    "CHANNELS_FIRST",
    "CHANNELS_LAST",
    "NOT_A_MAP",
    # preprocessing
    "Preprocessing",
    "normalize_size",
    "normalization_values",
    "from_torchvision_transforms",
    "FILE_MAX_SIZE",
    # errors
    "AttnExplainError",
    "ModelLoadError",
    "UntrustedModelError",
    "MethodError",
    "PluginError",
    "shown",
    # files
    "not_a_regular_file",
    # recording (needs torch)
    "capture_softmax",
    "capture_multihead_attention",
    "capture_channel_gates",
    "replaced_forward",
    "shifted_window_positions",
    "attention_gradients",
    # methods (needs torch)
    "Method",
    "spatial_attention",
    # prompts (needs torch)
    "PromptLogits",
    # tests
    "use_plugins",
    "PluginInfo",
]


if not TYPE_CHECKING:  # hidden from type checkers, which then flag a name the API does not have

    def __getattr__(name: str) -> Any:
        """A name that needs torch, imported from its module when a plugin first asks for it."""
        module = _NEEDS_TORCH.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", __package__), name)
        globals()[name] = value  # found directly from now on
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
