"""Regression: one or more real-valued targets per example (a store's (n, k) float32 ``target`` column).

Targets are standardised with the train split's mean and standard deviation (per target; saved with the
checkpoint), so one learning rate fits targets of any scale: the head predicts standardised values, the loss
(MSE, or Huber on the standardised scale) compares them with standardised targets, and metrics and
predictions are in the targets' own units. Metrics over a split, averaged over targets: Pearson and Spearman
correlation, RMSE. The best epoch is chosen by Pearson correlation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ._base import Task

LOSSES = ("mse", "huber")


@dataclass
class RegressionOptions:
    loss: str = "mse"
    """"mse", or "huber" (quadratic within huber_delta standard deviations, linear beyond: robust to outliers)."""
    huber_delta: float = 1.0
    """Huber's switch point, in standard deviations of the target."""

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.huber_delta <= 0:
            raise ValueError(f"huber_delta must be positive, got {self.huber_delta}")


class RegressionTask(Task):
    kind = "regression"
    report_metrics = ("pearson", "spearman", "rmse")
    lower_is_better = frozenset({"loss", "rmse"})
    options_cls = RegressionOptions

    def fit(self, train_targets: np.ndarray) -> None:
        values = np.asarray(train_targets, dtype=np.float64).reshape(len(train_targets), len(self.names))
        std = values.std(axis=0)
        self.state = {"mean": values.mean(axis=0).tolist(),
                      "std": np.where(std > 0, std, 1.0).tolist()}  # a constant target: left unscaled

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if "mean" not in self.state:
            raise ValueError("regression targets were not standardised: fit() the task on the train split first")
        return (torch.tensor(self.state["mean"], dtype=like.dtype, device=like.device),
                torch.tensor(self.state["std"], dtype=like.dtype, device=like.device))

    def standardise(self, targets: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(targets)
        return (targets - mean) / std

    def unstandardise(self, outputs: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(outputs)
        return outputs * std + mean

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        z = self.standardise(targets.float())
        if self.options.loss == "huber":
            return F.huber_loss(outputs, z, delta=self.options.huber_delta)
        return F.mse_loss(outputs, z)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor, *, tune: bool) -> dict[str, float]:
        outputs, targets = outputs.double(), targets.double()
        predicted = self.unstandardise(outputs)
        metrics = {"pearson": float(np.mean([pearson(predicted[:, j], targets[:, j]) for j in range(targets.shape[1])])),
                   "spearman": float(np.mean([spearman(predicted[:, j], targets[:, j])
                                              for j in range(targets.shape[1])])),
                   "rmse": ((predicted - targets) ** 2).mean(0).sqrt().mean().item()}
        z = self.standardise(targets)
        if self.options.loss == "huber":
            metrics["loss"] = F.huber_loss(outputs, z, delta=self.options.huber_delta).item()
        else:
            metrics["loss"] = F.mse_loss(outputs, z).item()
        metrics["n"] = len(targets)
        return metrics

    def predictions(self, outputs: torch.Tensor, mask: torch.Tensor | None = None) -> list[dict[str, Any]]:
        values = self.unstandardise(outputs.double()).tolist()
        return [dict(zip(self.names, row)) for row in values]


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation; NaN when either side is constant (no correlation is defined)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = (x.norm() * y.norm()).item()
    return (x @ y).item() / denominator if denominator > 0 else float("nan")


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman correlation: Pearson on ranks, ties given their average rank."""
    return pearson(_ranks(x), _ranks(y))


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties averaged (as scipy.stats.rankdata's default)."""
    v = values.double().numpy()
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    sorted_v = v[order]
    start = 0
    for end in range(1, len(v) + 1):
        if end == len(v) or sorted_v[end] != sorted_v[start]:
            ranks[order[start:end]] = (start + end + 1) / 2  # mean of ranks start+1 .. end
            start = end
    return torch.from_numpy(ranks)
