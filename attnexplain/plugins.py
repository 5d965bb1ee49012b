"""Model plugins: where all knowledge of particular model families lives.

A plugin is an object (usually an instance of :class:`ModelPlugin`) published under the entry-point
group ``attnexplain.plugins``. attnexplain's own torchvision support is registered the same way, from
``attnexplain.default_plugins``; the core never names an architecture. This module holds the
contract (:class:`ModelPlugin` and the data classes its hooks return) and the discovery of installed
plugins (with :func:`use_plugins`, which installs plugins for a test); plugins import the contract
through :mod:`attnexplain.plugin_api`.

Discovery uses :mod:`importlib.metadata` directly rather than pluggy: choosing a plugin is a ranking
(the plugin that knows a model most specifically answers every question about it), not a broadcast of
a hook to every implementation, so one object per plugin with plain methods is the simpler contract.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Mapping

from .errors import PluginError, error_line

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .methods import Method
    from .preprocess import Preprocessing

#: Bumped when the plugin API changes; plugins declare the version they were written for.
#: Version 2 added hooks (all with defaults that keep version 1's behaviour), so both are spoken.
PLUGIN_API_VERSION = 2
SUPPORTED_API_VERSIONS = (1, 2)
ENTRY_POINT_GROUP = "attnexplain.plugins"


@dataclass(frozen=True)
class TokenGrid:
    """How a transformer's token sequence maps to image positions."""

    prefix_tokens: int  # tokens before the patches (class token, register tokens)
    height: int  # patches per column
    width: int  # patches per row
    query: int = 0  # the token whose attention is explained (the class token)


@dataclass(frozen=True)
class WindowedAttention:
    """Self-attention computed inside windows of a layer's token map (Swin, MaxViT), recorded with
    where every token of every window lies, so that the core can place it on the image.

    ``positions[w, t]`` is the flat index (row × width + column) on the layer's height × width
    token map of token ``t`` of window ``w`` (its query and its key), or -1 for a padding token the
    model added. Windows may be shifted (Swin) or dilated (MaxViT's grid attention): the positions
    say it all, so the core needs no knowledge of how a family partitions its map.
    """

    probabilities: "torch.Tensor"  # (B, windows, heads, tokens, tokens), rows sum to 1
    positions: "torch.Tensor"  # (windows, tokens) long
    height: int
    width: int


@dataclass(frozen=True)
class SpatialAttention:
    """Attention weights over one layer's own grid of positions, recorded as they are (API v2).

    For attention that is already spatial and does not chain from layer to layer: a CBAM-style
    spatial attention map, a "Show, Attend and Tell" soft-attention pooling over a feature map. Each
    layer keeps its own resolution (32², 16², 8² in one model is fine); the core resizes each to the
    input. Rollout and Chefer need attention between the same tokens at every layer, so they are
    refused for a model whose attention is recorded this way.
    """

    weights: "torch.Tensor"  # (B, H, W) or (B, heads, H, W), non-negative
    height: int
    width: int


@dataclass(frozen=True)
class EncoderDecoderAttention:
    """One attention layer of an encoder–decoder transformer whose decoder's queries read the image's
    tokens (a DETR's object queries), recorded with its role, so that ``chefer`` can apply Chefer et
    al. 2021b's encoder–decoder rules (API v2). A plugin records every attention layer this way, in
    the order the model runs them: the encoder's self-attention among the image tokens
    (``"encoder"``, (B, heads, tokens, tokens)), then per decoder layer its self-attention among the
    queries (``"decoder"``, (B, heads, queries, queries)) and its cross-attention from the queries to
    the image tokens (``"cross"``, (B, heads, queries, tokens)). The image tokens lie on the plugin's
    :class:`TokenGrid`; the explained query is a detector's box (:attr:`Detections.queries`), else
    the grid's ``query``. ``attention`` maps the cross-attention layers."""

    probabilities: "torch.Tensor"  # rows sum to 1; the tensor the model used (gradients flow through it)
    role: str  # "encoder" | "decoder" | "cross"


@dataclass(frozen=True)
class TokenReadout:
    """How a transformer's prediction reads off any block's tokens (what LeGrad differentiates)."""

    blocks: list[str]  # the block after each of ``attention_modules``, same order
    scores: Callable[["torch.Tensor"], "torch.Tensor"]  # (B, tokens, dim) → (B, classes) scores
    #: API v2, optional: a head that pools the tokens by attention of its own (SigLIP's attention-
    #: pooling head), as LeGrad's authors read such a model: (B, tokens, dim) → (the pooled vector
    #: that ``scores`` then reads, the pooling attention it was computed from, laid out as the
    #: recorded attention, (B, heads, T, T)). LeGrad then differentiates each block's score with
    #: respect to the attention of the head applied to that block's tokens, and ``blocks`` need not
    #: match ``attention_modules``.
    pooling: Callable[["torch.Tensor"], tuple["torch.Tensor", "torch.Tensor"]] | None = None
    #: API v2, optional, with ``pooling``: the pooled vector's score (B,) for an empty prompt, whose
    #: LeGrad map, scaled to [0, 1], masks the target's where above ``legrad.REFERENCE_THRESHOLD``
    #: (LeGrad's authors' correction for SigLIP).
    reference: Callable[["torch.Tensor"], "torch.Tensor"] | None = None


@dataclass(frozen=True)
class Detections:
    """One image's detected boxes, as a detector's plugin reads them off the model's output."""

    boxes: "torch.Tensor"  # (N, 4) left, top, right, bottom in model-input pixels
    labels: "torch.Tensor"  # (N,) class indices
    scores: "torch.Tensor"  # (N,) confidences in [0, 1]
    #: Boxes in shares of the input's width and height (a DETR's ``pred_boxes``) rather than in
    #: pixels: the core scales them to the input (API v2; the hook is not told the input's size).
    relative: bool = False
    #: (N,) long: the row of the recorded attention each box's object query is (a DETR's decoder
    #: cross-attention, (batch, heads, queries, image tokens)), so that the attention maps read the
    #: explained box's row (API v2). None: the boxes are not queries of the recorded attention.
    queries: "torch.Tensor | None" = None


@dataclass(frozen=True)
class Captioning:
    """How a captioning model writes a caption and where it looks for each word (API v2), as its
    plugin says (:meth:`ModelPlugin.captioning`); the core explains every word with it.

    ``generate`` writes the caption as the model itself does (greedy, beam search): word ids, the
    end word included when written. ``score`` runs the model with teacher forcing on given word
    ids (B, T) (the end word included, no start word) and returns each step's log-probabilities
    (B, T, vocabulary): a step's score is its word's log-probability. The module named
    ``attention_module`` is called once per step; ``read_attention`` turns its output into that
    step's (α (B, L), e (B, L)): the weights over the L positions of ``feature_layer``'s (B, C, h, w)
    map (row-major) and the alignment scores they are the softmax of. Record the α the context was
    computed from, so that a gradient through it is real.

    API v2 adds, all optional: ``generate_recorded`` (all words' attention and probabilities from
    the one generation pass), ``feature_grid`` (a token map as the feature layer), ``encode`` (a
    subword tokenizer for ``--caption``) and ``score_attention`` (Chefer's encoder–decoder relevance).
    """

    vocabulary: tuple[str, ...]  # word id → word
    end: int  # the id of the word that ends a caption
    feature_layer: str  # the encoder's feature map, (B, C, h, w): attended over, and Grad-CAM's layer
    attention_module: str
    generate: Callable[["torch.Tensor"], list[int]]  # one image (1, 3, H, W) → its caption's word ids
    score: Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]  # images, ids (B, T) → (B, T, V)
    read_attention: Callable[[Any], tuple["torch.Tensor", "torch.Tensor"]]  # module output → (α, e)
    #: What the alignment scores are, for the report (their formula, their range).
    score_formula: str = "alignment scores e; α = softmax(e) over the positions"
    #: (API v2) The generation itself, handing back what it recorded (:class:`CaptionSteps`): every
    #: word's attention and log-probability then come from that one pass, nothing is run again for
    #: them. None: the core runs ``generate``, then one teacher-forced forward recording
    #: ``attention_module`` (``read_attention``'s e may then be None: no alignment scores).
    generate_recorded: Callable[["torch.Tensor"], "CaptionSteps"] | None = None
    #: (API v2) ``feature_layer``'s output → its (B, C, h, w) map: a transformer encoder's tokens
    #: (B, N, C) laid on their grid, special tokens dropped. None: the output is that map.
    feature_grid: Callable[["torch.Tensor"], "torch.Tensor"] | None = None
    #: (API v2) A caption the user gives (``--caption``) → its word ids, by the model's own
    #: tokenizer. None: split on spaces, each word looked up in ``vocabulary``.
    encode: Callable[[str], list[int]] | None = None
    #: (API v2) ``score`` with every attention of the forward kept in the autograd graph
    #: (:class:`CaptionAttention`): an encoder–decoder's relevance per word (Chefer et al. 2021b)
    #: comes from it, and its cross-attention is the attention of a given caption's words. None:
    #: no relevance map.
    score_attention: Callable[["torch.Tensor", "torch.Tensor"], "CaptionAttention"] | None = None


@dataclass(frozen=True)
class CaptionSteps:
    """What a captioner's generation recorded (API v2), as :attr:`Captioning.generate_recorded`
    returns it for one image: the caption's ids and, for each of its T steps (the end word
    included when written), the written word's log-probability and the attention over the image.

    ``attention`` is (T, layers, heads, L) over the L = h·w positions of the image's grid, row-major,
    special tokens (a class token) dropped: a transformer decoder's cross-attention of the step's
    query, each layer and head; a Show-Attend-Tell decoder's α as (T, 1, 1, L). For beam search,
    the steps of the beam that was returned. ``alignment_scores``: the same shape before the softmax,
    or None where the model does not expose them (Hugging Face's attention modules return only the
    probabilities)."""

    ids: list[int]
    log_probabilities: "torch.Tensor"  # (T,) log p(word t | image, words before it)
    attention: "torch.Tensor"  # (T, layers, heads, L)
    grid: tuple[int, int]  # (h, w), h·w = L
    alignment_scores: "torch.Tensor | None" = None


@dataclass(frozen=True)
class CaptionAttention:
    """A teacher-forced forward of an encoder–decoder captioner with its attention probabilities in
    the autograd graph (API v2; :attr:`Captioning.score_attention`), for Chefer et al. 2021b's
    encoder–decoder relevance. Tensors are (B, heads, queries, keys), one per layer, input first;
    each decoder layer attends to the words first (causal self-attention), then to the image."""

    log_probabilities: "torch.Tensor"  # (B, T, V), as ``score`` returns them
    encoder: tuple["torch.Tensor", ...]  # self-attention over the N image tokens: (B, H, N, N)
    decoder: tuple["torch.Tensor", ...]  # the words' causal self-attention: (B, H, T, T)
    cross: tuple["torch.Tensor", ...]  # the words' attention over the image tokens: (B, H, T, N)
    grid_start: int = 0  # the first of the h·w grid tokens among the N (1 after a class token)


@dataclass(frozen=True)
class CatalogEntry:
    """A model a plugin can build by name, for ``attnexplain models`` and coverage tests.

    Listings read every field but ``build`` from a cache (see :mod:`attnexplain.catalog`), so the
    values must be plain: strings, integers, booleans.
    """

    name: str  # the NAME of PREFIX:NAME, or an --arch name when the plugin has no source_prefix
    task: str  # classification | segmentation | detection | ...
    input_size: int  # a small square input the architecture accepts: what ``--check`` explains
    build: Callable[[], "nn.Module"]  # random weights, nothing downloaded
    supported: bool = True  # False: listed, but not explained yet
    note: str = ""
    #: The side of the square input the model is run at by default: its published weights'
    #: preprocessing (what ``PREFIX:NAME:DEFAULT`` uses), shown by ``attnexplain models``. None:
    #: ``input_size`` is that size already.
    default_size: int | None = None

    @property
    def real_size(self) -> int:
        """The input side ``attnexplain models`` shows: ``default_size``, else ``input_size``."""
        return self.default_size if self.default_size is not None else self.input_size


@dataclass(frozen=True)
class NamedModel:
    """A model a plugin built from a name (``torchvision:resnet50:DEFAULT``), with what it knows."""

    module: "nn.Module"
    architecture: str
    weights: str | None
    labels: list[str] | None = None
    preprocessing: "Preprocessing | None" = None
    notes: tuple[str, ...] = ()  # shown in the report, e.g. "random weights"
    #: Whether the weights are random (API v2). None: the core decides as version 1 did (random
    #: when no WEIGHTS were named). A plugin whose names always carry trained weights (a Hugging
    #: Face model from the cache) says False, so no "random weights" note is written.
    random_weights: bool | None = None


class ModelPlugin:
    """Answers questions about the models of the families it knows. Override what applies.

    The defaults describe a model nobody knows: it gets the generic, shape-based behaviour of the core
    (Grad-CAM on the last layer with a spatial feature map, ImageNet preprocessing at 224 pixels).
    """

    name: str = "generic"
    api_version: int = PLUGIN_API_VERSION
    #: Short names of the model families covered, for listings.
    families: tuple[str, ...] = ()
    #: Prefix of model specifications this plugin builds by name, e.g. ``"torchvision"``.
    source_prefix: str | None = None

    def specificity(self, model: "nn.Module") -> int | None:
        """How specifically this plugin knows ``model``: None if not at all, higher wins.

        Convention: 10 for a whole library's models, 20 for one family, 30 for one exact class.
        """
        return None

    def builders(self) -> Mapping[str, Callable[..., "nn.Module"]]:
        """Architecture names usable with ``--arch`` (and in checkpoints' ``arch`` key) → constructors.

        A constructor takes keyword arguments only (``num_classes`` and the checkpoint's
        ``arch_kwargs``) and builds randomly initialised weights, never downloading anything.
        """
        return {}

    def catalog(self) -> list[CatalogEntry]:
        """The models this plugin builds by name, with a small input each accepts (may be empty)."""
        return []

    def load_named(self, name: str, weights: str | None) -> NamedModel:
        """Build ``PREFIX:NAME[:WEIGHTS]``; only called when ``source_prefix`` is set."""
        raise PluginError(f"Plugin {self.name} cannot build models by name.")

    def task(self, model: "nn.Module") -> str:
        """What the model does (classification, segmentation, detection, ...), for the report; what a
        target means for it is :meth:`class_scores`'s answer."""
        return "classification"

    def default_method(self, model: "nn.Module") -> str | None:
        """What ``--method auto`` means for this model (one name or a comma-separated list); None
        lets the core choose: rollout where attention is known, Grad-CAM otherwise."""
        return None

    def default_layer(self, model: "nn.Module") -> str | None:
        """The CAM target layer; None lets the core pick the last layer with a spatial map."""
        return None

    def layer_map(
        self, model: "nn.Module", layer: str, output: "torch.Tensor", input_size: tuple[int, int]
    ) -> "torch.Tensor | None":
        """A CAM layer's output as a (B, C, H, W) map, when the layer outputs something else: a
        transformer block's token sequence, a channels-last (B, H, W, C) stage (Swin). None: the
        output is used as it is (it must then be a (B, C, H, W) map).

        Use only rearrangements (slicing, reshape, permute): the core applies the same function to the
        output and to its gradient. Default: a (B, tokens, C) sequence whose tokens fill
        :meth:`token_grid` after its prefix tokens (which are dropped).
        """
        grid = self.token_grid(model, input_size) if output.dim() == 3 else None
        if grid is None or output.shape[1] != grid.prefix_tokens + grid.height * grid.width:
            return None
        patches = output[:, grid.prefix_tokens :]
        return patches.transpose(1, 2).reshape(output.shape[0], output.shape[2], grid.height, grid.width)

    def layer_layout(self, model: "nn.Module", layer: str) -> str | None:
        """How ``layer``'s 4-D output is laid out (API v2): ``"channels_first"`` (B, C, H, W),
        ``"channels_last"`` (B, H, W, C) or ``"not_a_map"`` (attention probabilities, a head's
        internals), as :mod:`attnexplain.layout` names them. None: no word; the core then reads the
        layout off torch's own layers (a ``Conv2d`` writes channels first, a ``Linear`` channels
        last), else takes a (B, C, H, W) reading only where its grid fits the input image and the
        channels-last one does not, and refuses the layer otherwise. :meth:`layer_map`, when it
        answers, comes first."""
        return None

    def attention_modules(self, model: "nn.Module") -> list[str]:
        """Names of the submodules whose attention probabilities rollout multiplies, input to output."""
        return []

    def token_grid(self, model: "nn.Module", input_size: tuple[int, int]) -> TokenGrid | None:
        """How the tokens of ``attention_modules`` lie on the image, for an input of (height, width).

        Needed for global attention recorded as tensors; windowed attention recorded as
        :class:`WindowedAttention` carries its own positions and needs no grid."""
        return None

    def token_readout(self, model: "nn.Module") -> TokenReadout | None:
        """For ``legrad``: the block whose output follows each of :meth:`attention_modules` and the
        model's head as a function of a block's output tokens, (B, tokens, dim) → (B, classes): the
        final norm and classifier applied to the tokens' mean, as LeGrad's authors read an
        intermediate layer. None: not known (``legrad`` is then refused)."""
        return None

    @contextmanager
    def capture_attention(
        self, model: "nn.Module", names: list[str], sink: dict[str, "torch.Tensor | WindowedAttention"]
    ) -> Iterator[None]:
        """Record each named module's attention probabilities (batch, heads, queries, keys) into sink,
        or, for attention inside windows of the token map, a :class:`WindowedAttention`
        (:func:`attnexplain.plugin_api.capture_softmax` records a softmax computed inside a module).

        Record the tensor the module's output is computed from (not a detached copy), so that
        gradient methods (``chefer``) can differentiate with respect to it. Queries and keys are the
        same tokens for self-attention (what rollout needs); attention pooling may have one query.

        The default handles ``torch.nn.MultiheadAttention``, the module torchvision's and many other
        transformers use: it asks for the per-head weights the module otherwise skips (which makes it
        take its unfused path; the output is the same) and records them.
        """
        from .capture import capture_multihead_attention

        with capture_multihead_attention(model, names, sink):
            yield

    def class_scores(self, model: "nn.Module", output: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
        """What a target class means, from the model's raw output: (scores, probabilities).

        ``scores`` (B, classes) are differentiable; a target's gradient is taken of its score.
        ``probabilities`` (B, classes) are what the report shows, and the default target is the
        largest. Default: classification logits and their softmax.
        """
        import torch

        logits = classification_logits(output)
        return logits, torch.softmax(logits.detach().float(), dim=1)

    def detections(self, model: "nn.Module", output: Any) -> "list[Detections] | None":
        """A detector's boxes per image, read off its raw output, for the overlay and the report;
        None for models that do not detect. A detector's :meth:`class_scores` says which box a
        target class means (usually its highest-scoring box)."""
        return None

    def box_scores(self, model: "nn.Module", output: Any) -> "list[torch.Tensor] | None":
        """Per image, the differentiable score of each box :meth:`detections` lists, in the same
        order (API v2): what ``--target box:N`` explains, the N-th box by score. None: the model's
        boxes cannot be scored one by one (``box:N`` is then refused)."""
        return None

    def gate_modules(self, model: "nn.Module") -> list[str]:
        """Names of squeeze-and-excitation blocks (learned channel gates), input to output."""
        return []

    @contextmanager
    def capture_gates(
        self, model: "nn.Module", names: list[str], sink: dict[str, tuple["torch.Tensor", "torch.Tensor"]]
    ) -> Iterator[None]:
        """Record each block's (gates (B, C), gated input (B, C, H, W)) into sink. The default reads
        blocks shaped like ``torchvision.ops.SqueezeExcitation`` (a ``scale_activation`` submodule)."""
        from .capture import capture_channel_gates

        with capture_channel_gates(model, names, sink):
            yield

    def preprocessing(self, model: "nn.Module") -> "Preprocessing | None":
        """Default input preprocessing when neither weights nor checkpoint say."""
        return None

    # --- API version 2 --------------------------------------------------------------------------

    def split_spec(self, rest: str) -> tuple[str, str | None]:
        """``PREFIX:REST`` → (name, weights) for :meth:`load_named`. Default: ``NAME[:WEIGHTS]``.
        A plugin whose names may contain ``:`` (a Windows path, ``hf:C:\\models\\x``) takes the
        whole rest as the name."""
        name, _, weights = rest.partition(":")
        return name, weights or None

    def claims_path(self, path: Path) -> bool:
        """Whether this plugin loads ``path`` (a folder, or a file of its own format) itself, through
        :meth:`load_path`, before the core tries (and refuses) it. Must be cheap and must not run
        code from the path: look at file names and small metadata files only.

        Asked of every plugin, attnexplain's own first, then the others by name; the first that
        answers True loads the path. A plugin that raises here is taken as not claiming it (one
        broken plugin must not stop every model file from loading); the report notes the failure."""
        return False

    def load_path(self, path: Path, *, trust_model: bool = False) -> NamedModel:
        """Build the model at a path this plugin claims. Runs no code from the path unless
        ``trust_model`` (the same promise the core keeps for pickles). Raise an
        :class:`~attnexplain.errors.AttnExplainError` for what the user can fix; anything else raised
        is reported as one line naming the plugin. Set ``NamedModel.random_weights``: a path's
        weights are usually real (False), and None would mean random (no WEIGHTS were named)."""
        raise PluginError(f"Plugin {self.name} does not load model paths.")

    def labels(self, model: "nn.Module") -> list[str] | None:
        """Class names the model itself carries (a Hugging Face config's ``id2label``, a timm
        model's pretrained config), for a module passed to ``explain`` in memory, or any loaded
        model whose file named none. None: unknown. Names given by the user (``labels=``,
        ``--labels``) or by the file win; a plugin that raises here costs the names (a note says
        so), not the explanation."""
        return None

    def methods(self) -> list["Method"]:
        """Methods this plugin adds under names of its own (``cbam_spatial``), each a
        :class:`attnexplain.plugin_api.Method` of an existing family, with its summary, paper and the
        report's wording. The names must not clash with the built-in methods'."""
        return []

    def refuse_method(self, model: "nn.Module", method: str) -> str | None:
        """A one-line reason why ``method`` does not apply to this model, or None (it may apply)."""
        return None

    def forward_kwargs(self, model: "nn.Module", input_size: tuple[int, int]) -> dict[str, Any]:
        """Keyword arguments for every forward of the model, e.g. ``{"interpolate_pos_encoding":
        True}`` for a transformer given an input of another size than it was trained on."""
        return {}

    def recording(self, model: "nn.Module") -> ContextManager[None]:
        """A context the model runs in while attention is recorded, e.g. a transformer switched to
        its eager attention, whose softmax probabilities exist (fused kernels never form them). It
        must leave the model's outputs unchanged and restore the model when it exits."""
        from contextlib import nullcontext

        return nullcontext()

    def captioning(self, model: "nn.Module") -> Captioning | None:
        """For a model that writes captions: how it generates, scores a word and records its
        attention per word (:class:`Captioning`). None (the default): not a captioner."""
        return None

    def with_prompts(self, model: "nn.Module", prompts: tuple[str, ...] | None) -> NamedModel | None:
        """The model as a classifier whose classes are ``prompts`` (API v2), for a model that compares
        an image with text: a :class:`NamedModel` whose module takes the image alone and returns
        (B, prompts) scores (the text encoded here, once), labelled by the prompts, with notes for
        the report. This plugin's :meth:`class_scores` for that module says what the scores mean (a
        softmax over the prompts, a sigmoid each). Called for every model loaded (``prompts`` None
        when none were given); None keeps the model as it is (the default, without prompts).
        Raise an :class:`~attnexplain.errors.AttnExplainError` for prompts given to a model that
        reads no text (the default) and for a model that cannot be explained without them."""
        if prompts is None:
            return None
        raise PluginError(
            f"{type(model).__name__} reads no text: prompts (--prompt, --prompts) are for models that "
            f"compare an image with text, through a plugin that knows them."
        )

    def select_output(self, model: "nn.Module", layer: str, output: Any) -> "torch.Tensor | None":
        """The tensor of a CAM layer's output that the CAM explains, when the module returns several
        (a tuple, a ``ModelOutput``): e.g. a Hugging Face Swin stage's hidden states. None: the
        output is not usable (the core says so). Default: the output itself when it is a tensor."""
        import torch

        return output if isinstance(output, torch.Tensor) else None


def vit_cam_block(blocks: int) -> int:
    """The transformer block whose input (its first norm) a class-token ViT's CAMs explain by default.

    The block at half depth (block 6 of ViT-B/16's 12, block 2 of the sample ViT's 4), not the last.
    After the last block only the class token reaches the head, so only the last block's input has a
    patch gradient at all, and there it is weak: on the shipped ViT (samples/models/vit-composites.pt,
    4 blocks) and 200 held-out composites, Grad-CAM at the last block's ``ln_1`` peaks on the object
    in 27.5% of images, close to a centre-peaking map's 25%; at block 2's ``ln_1`` in 57%
    (LayerCAM 57.5% → 75.5%, no all-zero maps; samples/README.md, "The ViT's CAM layer"). Blocks 0
    and 1 score lower with Grad-CAM (35.5%, 41.5%). This is one small trained model: "half depth" is
    the rule its figures support, not a measurement on ImageNet ViTs.
    """
    return blocks // 2


def classification_logits(output: Any) -> "torch.Tensor":
    """The (B, classes) logits in a classifier's output (a tensor, ``.logits``, or a tuple's first)."""
    import torch

    from .errors import MethodError

    if isinstance(output, torch.Tensor) and output.dim() == 2:
        return output
    if hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):  # InceptionOutputs etc.
        return output.logits
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) and output[0].dim() == 2:
        return output[0]
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    raise MethodError(
        f"The model's output is {shape}, not classification scores of shape "
        f"(batch, classes); a plugin must say how to score it."
    )


@dataclass(frozen=True)
class PluginInfo:
    """An installed plugin as found through its entry point."""

    entry_point: str
    distribution: str | None
    version: str | None
    plugin: ModelPlugin | None
    error: str | None  # why it is broken, when it is

    @property
    def name(self) -> str:
        return self.plugin.name if self.plugin is not None else self.entry_point


def discover_plugins() -> list[PluginInfo]:
    """Load every plugin of the entry-point group; a broken one is listed with its error, not raised."""
    from importlib.metadata import entry_points

    found: list[PluginInfo] = []
    for point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda p: p.name):
        distribution = getattr(point, "dist", None)
        dist_name = distribution.metadata["Name"] if distribution is not None else None
        dist_version = distribution.version if distribution is not None else None
        try:
            loaded = point.load()
            plugin = loaded() if isinstance(loaded, type) else loaded
            if not isinstance(plugin, ModelPlugin):
                raise TypeError(f"{point.value} is not an attnexplain.plugins.ModelPlugin")
            if plugin.api_version not in SUPPORTED_API_VERSIONS:
                spoken = ", ".join(str(version) for version in SUPPORTED_API_VERSIONS)
                raise TypeError(f"written for plugin API {plugin.api_version}, this attnexplain speaks {spoken}")
        except Exception as error:  # a broken plugin must not break the others
            message = error_line(error)
            found.append(PluginInfo(point.name, dist_name, dist_version, None, message))
            continue
        found.append(PluginInfo(point.name, dist_name, dist_version, plugin, None))
    return found


_cache: list[PluginInfo] | None = None


def plugin_infos(reload: bool = False) -> list[PluginInfo]:
    """Every installed plugin, working or broken, discovered once per process (or again on reload)."""
    global _cache
    if _cache is None or reload:
        _cache = discover_plugins()
    return _cache


@contextmanager
def use_plugins(*plugins: ModelPlugin | PluginInfo, keep_installed: bool = False) -> Iterator[None]:
    """Within the block, attnexplain sees ``plugins`` as its installed plugins; the plugins found
    before are back when it ends, also on errors. For tests: a plugin is tried out without
    installing a distribution (or with a fake one), and nothing else installed can answer for it.

    A :class:`ModelPlugin` counts as installed in memory (no distribution, no version); a
    :class:`PluginInfo` is taken as it is (a distribution's name, a broken plugin's error).
    ``keep_installed``: the discovered plugins stay, and ``plugins`` come after them.
    """
    global _cache
    infos = [
        plugin if isinstance(plugin, PluginInfo) else PluginInfo(plugin.name, None, None, plugin, None)
        for plugin in plugins
    ]
    kept = list(plugin_infos()) if keep_installed else []
    saved = _cache
    _cache = kept + infos
    try:
        yield
    finally:
        _cache = saved


def installed_plugins() -> list[ModelPlugin]:
    """The working plugins."""
    return [info.plugin for info in plugin_infos() if info.plugin is not None]


def select_plugin(model: "nn.Module", name: str | None = None) -> ModelPlugin:
    """The plugin named ``name``, or the most specific one that handles ``model``.

    Ties are broken by plugin name so that the choice never depends on installation order; a model
    no plugin claims gets the generic behaviour.
    """
    if name is not None:
        return plugin_named(name)
    plugins = installed_plugins()
    ranked = []
    for plugin in plugins:
        score = plugin.specificity(model)
        if score is not None:
            ranked.append((-score, plugin.name, plugin))
    if not ranked:
        return ModelPlugin()
    return min(ranked, key=lambda item: item[:2])[2]


def plugin_named(name: str) -> ModelPlugin:
    """The working plugin called ``name``; :class:`PluginError` naming the installed ones if none is."""
    plugins = installed_plugins()
    for plugin in plugins:
        if plugin.name == name:
            return plugin
    known = ", ".join(sorted(p.name for p in plugins)) or "none"
    raise PluginError(f"No plugin named {name!r} is installed (installed: {known}).")


def builder_order() -> list[ModelPlugin]:
    """attnexplain's own plugins first, then the others by name: a name two plugins offer keeps its
    built-in meaning, and the common case never imports a third-party library."""
    found = [
        (info.distribution != "attnexplain", info.plugin.name, info.plugin)
        for info in plugin_infos()
        if info.plugin is not None
    ]
    return [plugin for _, _, plugin in sorted(found, key=lambda row: row[:2])]


def find_builder(arch: str) -> tuple[ModelPlugin, Callable[..., Any]] | None:
    """The plugin and constructor for architecture ``arch``, asking plugins in :func:`builder_order`."""
    for plugin in builder_order():
        builder = plugin.builders().get(arch)
        if builder is not None:
            return plugin, builder
    return None


def all_builders() -> dict[str, tuple[ModelPlugin, Callable[..., Any]]]:
    """Every architecture name any plugin can build, with the plugin that provides it."""
    names: dict[str, tuple[ModelPlugin, Callable[..., Any]]] = {}
    for plugin in builder_order():
        for arch, builder in plugin.builders().items():
            names.setdefault(arch, (plugin, builder))
    return names


def plugin_for_prefix(prefix: str) -> ModelPlugin | None:
    for plugin in installed_plugins():
        if plugin.source_prefix == prefix:
            return plugin
    return None
