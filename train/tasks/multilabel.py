"""Multi-label classification: any number of labels per example (a store's (n, C) uint8 ``labels`` column).

Head: one logit per label; loss: binary cross-entropy with logits, averaged over labels and examples.
Metrics over a split: micro-F1 and macro-F1 of the labels whose probability reaches a decision threshold,
and mean average precision (mAP: the mean over labels that occur of the average precision of the split
ranked by that label's score; threshold-free). The threshold is one for all labels, tuned on the eval
split each epoch (the one that maximises micro-F1 over the candidate grid) and saved with the checkpoint;
the test split is scored at the threshold the best epoch tuned. The best epoch is chosen by mAP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ._base import Task

# Candidate thresholds on the probability: fine steps where BCE-trained probabilities of rare labels sit.
_THRESHOLDS = tuple(round(t, 3) for t in [0.02, 0.05, *[k / 20 for k in range(2, 19)], 0.95])


@dataclass
class MultiLabelOptions:
    threshold: float | None = None
    """A fixed decision threshold on each label's probability; None = tune one on the eval split."""

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")


class MultiLabelTask(Task):
    kind = "multilabel"
    report_metrics = ("map", "micro_f1", "macro_f1")
    options_cls = MultiLabelOptions

    @property
    def threshold(self) -> float:
        fixed = self.options.threshold
        return fixed if fixed is not None else float(self.state.get("threshold", 0.5))

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(outputs, targets.float())

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor, *, tune: bool) -> dict[str, float]:
        probabilities, truth = torch.sigmoid(outputs.double()), targets.bool()
        if tune and self.options.threshold is None:
            self.state["threshold"] = tune_threshold(probabilities, truth)
        metrics = f1_scores(probabilities >= self.threshold, truth)
        metrics["map"] = mean_average_precision(probabilities, truth)
        metrics["threshold"] = self.threshold
        metrics["loss"] = F.binary_cross_entropy_with_logits(outputs.double(), truth.double()).item()
        metrics["n"] = len(targets)
        return metrics

    def predictions(self, outputs: torch.Tensor, mask: torch.Tensor | None = None) -> list[dict[str, Any]]:
        probabilities = torch.sigmoid(outputs).tolist()
        return [{"labels": [n for n, p in zip(self.names, row) if p >= self.threshold],
                 **{f"prob_{name}": p for name, p in zip(self.names, row)}} for row in probabilities]


def f1_scores(predicted: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Micro-F1 (over every example-label decision) and macro-F1 (the mean of per-label F1 over labels that
    occur in the truth or the predictions) of boolean (n, C) decisions."""
    tp = (predicted & truth).sum(0).double()
    fp = (predicted & ~truth).sum(0).double()
    fn = (~predicted & truth).sum(0).double()
    micro = 2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp_min(1)
    present = (tp + fp + fn) > 0
    per_label = 2 * tp / (2 * tp + fp + fn).clamp_min(1)
    return {"micro_f1": micro.item(), "macro_f1": per_label[present].mean().item() if present.any() else 0.0}


def tune_threshold(probabilities: torch.Tensor, truth: torch.Tensor) -> float:
    """The candidate threshold with the best micro-F1 (the smallest of equals)."""
    scores = [f1_scores(probabilities >= t, truth)["micro_f1"] for t in _THRESHOLDS]
    return _THRESHOLDS[max(range(len(scores)), key=lambda i: (scores[i], -i))]


def mean_average_precision(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean over labels with at least one positive of average precision: for each label, the mean of the
    precision at the rank of every positive, examples ranked by score (ties broken by example order)."""
    aps = []
    for label in range(truth.shape[1]):
        positives = truth[:, label]
        if not positives.any():
            continue
        order = torch.sort(scores[:, label], descending=True, stable=True).indices
        hits = positives[order].double()
        precision_at = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)
        aps.append((precision_at * hits).sum() / hits.sum())
    return torch.stack(aps).mean().item() if aps else 0.0
