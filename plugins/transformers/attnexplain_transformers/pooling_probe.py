"""SigLIP's attention recorded around its pooling probe, so that rollout, raw attention and Chefer
read the probe as they read a class token.

SigLIP's vision tower has no class token: its encoder's tokens are the patches, and an attention-
pooling head (``vision_model.head``) lets one learned query, the probe, attend over them (an
``nn.MultiheadAttention``); the pooled vector is the image embedding. The probe's attention row is
what a class token's row is to a ViT, one layer past the encoder. To chain it with the encoder's
self-attention, every layer is recorded over N + 1 tokens, the probe first:

- an encoder layer's (B, heads, N, N) probabilities sit at [1:, 1:]; the probe, absent there,
  attends to itself alone (row 0 and column 0 are the unit vector e₀);
- the head's (B, heads, 1, N) probabilities are row 0 over the patches [0, 1:]; the patches do
  not pass through the head (rows 1: are zero).

With the grid's one prefix token and query 0, rollout's row of the probe is then ½·a·R (a the
probe's attention, R the encoder's rollout: the probe has no residual of its own, its share
of itself is dropped with the prefix token), Chefer's is Ā·R over the encoder's relevance,
and raw attention's last layer is the probe's attention itself.

Each recorded (N + 1)-token tensor is the one the model computes with: the layer's softmax is
replaced by a slice of it, so gradients with respect to it (Chefer, LeGrad) are the model's, zero
at the padding.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from functools import cache
from typing import TYPE_CHECKING, Any, Iterator

from attnexplain.plugin_api import MethodError

if TYPE_CHECKING:
    import torch

#: The pooling head's attention module, under the prompt classifier's vision tower.
HEAD_ATTENTION = "vision_model.head.attention"


@contextmanager
def capture_with_probe(
    model: Any, encoder_names: list[str], head_name: str | None, sink: dict[str, "torch.Tensor"]
) -> Iterator[None]:
    """Record the encoder's and the pooling head's attention over [probe, patches] (see the
    module's docstring) into ``sink``, by name, for the duration."""
    import torch.nn.functional as F

    # Here, not at the top: the plugin is discovered (and listings answer) without importing torch.
    from attnexplain.plugin_api import replaced_forward

    def encoder_padding(probabilities: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        padded = F.pad(probabilities, (1, 0, 1, 0))  # (B, heads, N + 1, N + 1)
        corner = padded.new_zeros(padded.shape[-2:])
        corner[0, 0] = 1.0
        padded = padded + corner
        return padded, padded[..., 1:, 1:]

    def head_forward(original, query, key, value, *args: Any, **kwargs: Any):
        masks = [kwargs.get(name) for name in ("key_padding_mask", "attn_mask")] + [args[0] if args else None]
        if any(mask is not None for mask in masks):
            raise MethodError("SigLIP's pooling head was called with a mask, which its recording does not apply.")
        output, padded = probe_attention(model.get_submodule(head_name), query, key, value, probe_row)
        sink[head_name] = padded
        return output, None

    def wrapper(name: str, padding: Any):
        def run(original, *args, **kwargs):
            replacement = _softmax_replacement(padding)
            with replacement:
                output = original(*args, **kwargs)
            if len(replacement.recorded) != 1:
                raise MethodError(
                    f"Layer {name!r} computed {len(replacement.recorded)} softmaxes in one call, not one."
                )
            sink[name] = replacement.recorded[0]
            return output

        return run

    with ExitStack() as stack:
        for name in encoder_names:
            stack.enter_context(replaced_forward(model.get_submodule(name), wrapper(name, encoder_padding)))
        if head_name is not None:
            stack.enter_context(replaced_forward(model.get_submodule(head_name), head_forward))
        yield


def probe_row(probabilities: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """The pooling head's (B, heads, 1, N) probabilities as row 0 of (B, heads, N + 1, N + 1) over
    [probe, patches] (the module's docstring), and the slice of it the head computes with."""
    import torch.nn.functional as F

    tokens = probabilities.shape[-1]
    padded = F.pad(probabilities, (1, 0, 0, tokens))  # row 0: [0, a]; rows 1..N: 0
    return padded, padded[..., :1, 1:]


def pooled_by_head(head: Any, tokens: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """SigLIP's pooling head (``SiglipMultiheadAttentionPoolingHead``) applied to (B, N, C) tokens:
    (the pooled (B, C) vector, the probe's attention it was computed from, as :func:`probe_row`
    pads it). LeGrad's reading of an intermediate block."""
    probe = head.probe.repeat(tokens.shape[0], 1, 1)
    attended, padded = probe_attention(head.attention, probe, tokens, tokens, probe_row)
    pooled = attended + head.mlp(head.layernorm(attended))
    return pooled[:, 0], padded


def probe_attention(attention: Any, query: "torch.Tensor", key: "torch.Tensor", value: "torch.Tensor", padding: Any):
    """``nn.MultiheadAttention``'s forward for SigLIP's head (batch first, packed projections, no
    mask), written out so that its softmax can be handed on padded: (output, padded probabilities).

    ``torch.nn.functional.multi_head_attention_forward`` dispatches as a whole to a torch-function
    mode, which would hide the softmax inside it; the computation is the same."""
    import torch.nn.functional as F

    packed = attention.batch_first and attention._qkv_same_embed_dim
    if not packed or attention.bias_k is not None or attention.add_zero_attn:
        raise MethodError("SigLIP's pooling head is not the batch-first, packed MultiheadAttention it is known as.")
    batch, queries, width = query.shape
    heads = attention.num_heads
    weights = attention.in_proj_weight.chunk(3)
    biases = attention.in_proj_bias.chunk(3) if attention.in_proj_bias is not None else (None, None, None)

    def split(tensor: "torch.Tensor", index: int) -> "torch.Tensor":
        projected = F.linear(tensor, weights[index], biases[index])
        return projected.reshape(batch, tensor.shape[1], heads, width // heads).transpose(1, 2)

    q, k, v = split(query, 0), split(key, 1), split(value, 2)
    probabilities = F.softmax(q @ k.transpose(-2, -1) * (width // heads) ** -0.5, dim=-1)
    padded, used = padding(probabilities)
    mixed = (used @ v).transpose(1, 2).reshape(batch, queries, width)
    return attention.out_proj(mixed), padded


@cache
def _replacement_class() -> type:
    from torch.nn import functional as F
    from torch.overrides import TorchFunctionMode

    class SoftmaxReplacement(TorchFunctionMode):
        """Hands the module a slice of the padded softmax instead of the softmax, and keeps the
        padded tensor: what the module computes is unchanged, and the padded tensor is in its graph."""

        def __init__(self, padding: Any) -> None:
            super().__init__()
            self.padding = padding
            self.recorded: list[Any] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            output = func(*args, **(kwargs or {}))
            if func is F.softmax:
                padded, used = self.padding(output)
                self.recorded.append(padded)
                return used
            return output

    return SoftmaxReplacement


def _softmax_replacement(padding: Any) -> Any:
    """A :class:`SoftmaxReplacement`, its class defined on first use (importing the plugin imports no torch)."""
    return _replacement_class()(padding)
