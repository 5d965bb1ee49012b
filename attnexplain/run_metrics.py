"""``run --metrics``: the perturbation metrics of one explanation's maps, each measured on the score
that map explains (what report.json's ``"metrics"`` holds).

A map of a contrast (``--versus``) explains score(target) − score(versus), so its deletion,
insertion, ROAD and drop follow that difference, from its value on the intact image; a map of one of
several targets (``--target a,b``: ``"gradcam@b"``) follows its own target's score; a map of what
lowers a single output (``--target negative``) follows the output negated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from .errors import MethodError, shown
from .evaluation_summary import rounded
from .metrics import PERTURBATION_METRICS, MetricSettings, perturbation_values


def explanation_metrics(
    explanation: Any, metrics: Sequence[str], config: MetricSettings = MetricSettings()
) -> dict[str, dict[str, float]]:
    """``{"<map key>": {"<metric>": value}}`` for one :class:`~attnexplain.explanation.Explanation`:
    the perturbation metrics of each of its maps, each on the score it explains."""
    import torch

    from .precision import model_precision
    from .preprocess import prepare
    from .running import probabilities_of
    from .targets import scored_for

    unknown = [name for name in metrics if name not in PERTURBATION_METRICS]
    if unknown:
        raise MethodError(
            f"--metrics here takes {', '.join(PERTURBATION_METRICS)}, not {shown(unknown[0])} "
            f"(`attnexplain evaluate` measures the others)."
        )
    # A contrast is what the maps explain: the perturbed copies are scored on it too.
    loaded, _ = scored_for(explanation.model, None, explanation.versus)
    if explanation.negative:  # the maps explain what lowers a single output: so do the metrics
        loaded = dataclasses.replace(loaded, scoring=dataclasses.replace(loaded.scoring, negative=True))
    device = next(iter(loaded.module.parameters()), torch.zeros(0)).device
    batch = prepare(explanation.image.pixels, explanation.preprocessing).tensor.to(device)
    score = probabilities_of(loaded, tuple(batch.shape[-2:]))
    with torch.inference_mode(), model_precision(loaded.module, explanation.precision):
        intact = score(batch)[0].float().cpu()  # each class's explained score on the intact image
    by_target: dict[int, list[str]] = {}
    for key, method_map in explanation.maps.items():
        own = method_map.target if method_map.target is not None else explanation.target
        by_target.setdefault(own.index, []).append(key)
    found: dict[str, dict[str, float]] = {}
    for index, keys in by_target.items():
        maps = torch.stack([torch.from_numpy(explanation.maps[key].heatmap) for key in keys])[None].to(device)
        targets = torch.tensor([index], device=device)
        original = intact[index : index + 1]
        values, _ = perturbation_values(loaded, batch, maps, targets, original, metrics, config, explanation.precision)
        for m, key in enumerate(keys):
            found[key] = {
                metric: rounded(value[0, m]) for metric, value in values.items() if math.isfinite(float(value[0, m]))
            }
    return {key: found[key] for key in explanation.maps}
