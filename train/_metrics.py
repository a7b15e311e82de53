"""Classification metrics computed from a confusion matrix (no sklearn needed)."""

from __future__ import annotations

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(num_labels, num_labels) counts, rows = true label, columns = prediction."""
    index = target.long() * num_labels + pred.long()
    return torch.bincount(index, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def classification_metrics(pred: torch.Tensor, target: torch.Tensor, num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean of per-class F1; a class absent from both is skipped)."""
    cm = confusion_matrix(pred, target, num_labels).double()
    tp = cm.diag()
    support, predicted = cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0
    f1 = 2 * tp / (support + predicted).clamp_min(1)
    total = cm.sum().item()
    return {
        "accuracy": (tp.sum() / max(total, 1)).item(),
        "macro_f1": f1[present].mean().item() if present.any() else 0.0,
        "n": int(total),
    }
