"""How a model was named: the MODEL argument and the options that say how to load it, as one object.

The CLI's shared model options produce a :class:`ModelSpec`; ``batch`` and ``evaluate`` hand it on,
so that a run can say in report.json how its model was named, recognise an earlier run of the same
model (:func:`attnexplain.records.fingerprint`), and load the model again where it runs (each Ray
actor loads its own copy). It is a frozen dataclass of plain values: it pickles and travels to Ray.

Nothing here imports torch: :meth:`ModelSpec.check` refuses what can be refused without it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .errors import AttnExplainError

if TYPE_CHECKING:
    from .loading import LoadedModel

#: The fields that name the model, in the order report.json's ``model_spec`` lists them. The device
#: is not one of them: the same model on another device gives the same explanation; nor is ``resize``,
#: which report.json's ``preprocessing`` (and a run's fingerprint, through its plan) records.
IDENTITY_FIELDS = (
    "model",
    "arch",
    "num_classes",
    "labels",
    "trust_model",
    "plugin",
    "arch_kwargs",
    "ema",
    "prompts",
    "scores",
)

#: Fields that name the model only where given: at their default they are left out of the identity,
#: so that a run that does not use them keeps the fingerprint and report.json of earlier versions.
LATER_FIELDS = ("prompts", "scores")


@dataclass(frozen=True)
class ModelSpec:
    """A model as the command line names it: what :func:`attnexplain.load_model` is given.

    ``model``: a model file, a folder a plugin loads, or ``PREFIX:NAME[:WEIGHTS]``; None names no
    model (one built in memory): a local run explains it, but nothing can load it again. ``arch_kwargs``
    is the JSON text of ``--arch-kwargs`` as given (a run's fingerprint records the text), parsed
    when the model loads. ``labels``: a file of one class name per line. ``prompts``: the texts a
    vision-language model compares the image with (its classes).
    ``resize``: how a photo
    becomes the model's input (``--resize``, :data:`attnexplain.preprocess.RESIZE_MODES`; None: as
    the model's file or plugin says, else torchvision's evaluation crop)."""

    model: str | None
    arch: str | None = None
    arch_kwargs: str | None = None
    ema: bool = False
    num_classes: int | None = None
    labels: str | Path | None = None
    trust_model: bool = False
    plugin: str | None = None
    device: str = "auto"
    #: Text prompts, the classes of a model that compares an image with text (``--prompt``,
    #: ``--prompts``; :mod:`attnexplain.prompts`); its plugin makes them a classifier's classes.
    prompts: tuple[str, ...] | None = None
    #: How class scores become probabilities: softmax, sigmoid (multi-label) or auto (the plugin's,
    #: or the checkpoint's ``"multilabel": true``); see :mod:`attnexplain.scoring`.
    scores: str = "auto"
    resize: str | None = None

    @classmethod
    def of(cls, value: "ModelSpec | Mapping[str, Any]") -> "ModelSpec":
        """``value`` itself, or a ModelSpec from the dict the Python API took before there was one
        (``{"model": ..., "arch": ...}``: keys as the fields, absent ones at their defaults)."""
        if isinstance(value, ModelSpec):
            return value
        known = {field.name for field in fields(cls)}
        unknown = sorted(str(key) for key in value if key not in known)
        if unknown:
            raise AttnExplainError(
                f"A model specification has no field {unknown[0]!r} (its fields: {', '.join(sorted(known))})."
            )
        return cls(**{"model": None, **value})

    def identity(self) -> dict[str, Any]:
        """The fields that name the model (every field but the device), in the order report.json
        shows them: what a run's fingerprint and report record."""
        defaults = {field.name: field.default for field in fields(self)}
        return {
            name: getattr(self, name)
            for name in IDENTITY_FIELDS
            if name not in LATER_FIELDS or getattr(self, name) != defaults[name]
        }

    def check(self) -> None:
        """Refuse, without importing torch, what would make loading fail: a model path that is a
        FIFO or a device, a labels file that cannot be read."""
        from .loading import check_model_path, read_labels

        self._require_model()
        check_model_path(Path(self.model))
        if self.labels is not None:
            read_labels(self.labels)

    def load(self) -> "LoadedModel":
        """The model, loaded by :func:`attnexplain.load_model` on :attr:`device`."""
        from .loading import arch_kwargs_from_json, load_model
        from .preprocess import DEFAULT_PREPROCESSING

        self._require_model()
        loaded = load_model(
            self.model,
            arch=self.arch,
            num_classes=self.num_classes,
            labels=self.labels,
            trust_model=self.trust_model,
            plugin=self.plugin,
            device=self.device,
            ema=self.ema,
            arch_kwargs=arch_kwargs_from_json(self.arch_kwargs) if self.arch_kwargs else None,
            prompts=self.prompts,
            scores=self.scores,
        )
        if self.resize is not None:
            loaded.preprocessing = (loaded.preprocessing or DEFAULT_PREPROCESSING).with_resize(self.resize)
        return loaded

    def _require_model(self) -> None:
        if self.model is None:
            raise AttnExplainError("This model specification names no model to load (model=None).")
