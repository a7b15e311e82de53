"""Single-label classification: one class per example (a store's int64 ``label`` column).

Head: one logit per class; loss: cross-entropy; metrics: accuracy and macro-F1 (from a confusion matrix over
the split), mean cross-entropy. The best epoch is the one with the highest accuracy unless chosen otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .._metrics import classification_metrics
from ._base import Task


class ClassificationTask(Task):
    kind = "classification"
    report_metrics = ("accuracy", "macro_f1")

    def check_targets(self, targets: torch.Tensor, split: str) -> None:
        if (targets < 0).any():
            raise ValueError(f"split {split!r} has unlabelled examples (label -1); it cannot be trained or scored")

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor, *, tune: bool) -> dict[str, float]:
        metrics = classification_metrics(outputs.argmax(-1), targets, len(self.names))
        metrics["loss"] = F.cross_entropy(outputs.double(), targets, reduction="sum").item() / max(len(targets), 1)
        return metrics

    def predictions(self, outputs: torch.Tensor, mask: torch.Tensor | None = None) -> list[dict[str, Any]]:
        probabilities = torch.softmax(outputs, dim=-1)
        best = probabilities.argmax(-1).tolist()
        return [{"label": self.names[k], **{f"prob_{name}": p for name, p in zip(self.names, row)}}
                for k, row in zip(best, probabilities.tolist())]
