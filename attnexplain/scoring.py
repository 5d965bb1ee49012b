"""What a model's class scores mean: the score a map explains and the number a report shows.

A classifier's plugin gives (logits, probabilities); a :class:`Scoring` says what to do with them:

- ``kind``: ``softmax`` (one class per image), ``sigmoid`` (multi-label: each class's own
  probability) or ``auto`` (the plugin's probabilities; a classifier with a single output shows its
  value, regression or binary logit, rather than a softmax of 1.0).
- ``versus``: a contrast. Every class's score becomes score(class) − score(versus), so that a map
  of the target explains what makes it the target rather than ``versus``.
- ``negative``: a single output negated, so that its maps explain what lowers it.

Nothing here imports torch at import time: :class:`Scoring` travels in a :class:`LoadedModel`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from .errors import MethodError

if TYPE_CHECKING:
    import torch

#: ``--scores``: how class scores become probabilities.
SCORE_KINDS = ("auto", "softmax", "sigmoid")


@dataclass(frozen=True)
class Scoring:
    """How the model's class scores become the explained score and the reported numbers."""

    kind: str = "auto"
    versus: int | str | None = None
    negative: bool = False

    def __post_init__(self) -> None:
        if self.kind not in SCORE_KINDS:
            raise MethodError(f"Scores must be one of {', '.join(SCORE_KINDS)}, not {self.kind!r}.")

    def shows_value(self, num_classes: int, task: str) -> bool:
        """Whether the report shows the model's output itself rather than a probability: a
        classifier with one output and no probability asked for (its softmax would be 1.0)."""
        return self.kind == "auto" and num_classes == 1 and task == "classification"

    def apply(
        self, logits: "torch.Tensor", probabilities: "torch.Tensor", labels: Sequence[str] | None, task: str
    ) -> tuple["torch.Tensor", "torch.Tensor"]:
        """(scores, probabilities): the differentiable (B, classes) scores whose target column a map
        explains (contrasted, negated), and the (B, classes) numbers the report shows."""
        import torch

        if logits.dim() != 2:  # check_scores names what is wrong with it
            return logits, probabilities
        count = logits.shape[1]
        if self.kind == "sigmoid":
            probabilities = torch.sigmoid(logits.detach().float())
        elif self.kind == "softmax":
            probabilities = torch.softmax(logits.detach().float(), dim=1)
        elif self.shows_value(count, task):
            probabilities = logits.detach().float()
        if self.negative:
            if count != 1:
                raise MethodError(
                    f"Target 'negative' explains what lowers a single-output model's value, but this model "
                    f"has {count} classes: name a class, or contrast two with --target A --versus B."
                )
            logits = -logits
        return self.contrasted(logits, labels), probabilities

    def explained(self, probabilities: "torch.Tensor", labels: Sequence[str] | None) -> "torch.Tensor":
        """The reported (B, classes) numbers as the score a map explains, which RISE weighs and the
        perturbation metrics follow: contrasted, and negated for ``negative`` (what lowers it)."""
        return -probabilities if self.negative else self.contrasted(probabilities, labels)

    def contrasted(self, scores: "torch.Tensor", labels: Sequence[str] | None) -> "torch.Tensor":
        """(B, classes) ``scores`` less the ``versus`` class's (unchanged without a contrast)."""
        if self.versus is None or scores.dim() != 2:
            return scores
        index = self.versus_index(scores.shape[1], labels)
        return scores - scores[:, index : index + 1]

    def versus_index(self, num_classes: int, labels: Sequence[str] | None) -> int:
        """The contrast class's index."""
        from .targets import target_index

        if num_classes < 2:
            raise MethodError(f"--versus contrasts two classes, but the model has {num_classes} output.")
        assert self.versus is not None
        return target_index(self.versus, num_classes, list(labels) if labels is not None else None)
