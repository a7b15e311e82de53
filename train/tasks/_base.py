"""What every task offers the trainer: its head's shape, its loss, its split-wide metrics, its predictions.

A *task* says what a side network's outputs are trained to predict; a *method* says how the side network
reads the hidden states (train/_methods.py). The trainer, evaluation, checkpoints and ``unipt predict`` call
a :class:`Task` and never ask which kind it is. A task object belongs to one run: it carries the state it
learns besides the weights (regression's target statistics from the train split, multilabel's decision
threshold tuned on the eval split), which the checkpoint saves and restores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class HeadSpec:
    """The shape of a task's head: ``outputs`` values per example, or per token when ``per_token``."""

    outputs: int
    per_token: bool = False


class Task:
    """Base class. Subclasses set the class attributes and implement :meth:`loss`, :meth:`metrics` and
    :meth:`predictions`; outputs are the model's float32 scores, (B, K) or per token (B, N, K)."""

    kind: ClassVar[str]
    per_token: ClassVar[bool] = False
    report_metrics: ClassVar[tuple[str, ...]]  # the columns a results table shows, most important first
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"loss"})
    options_cls: ClassVar[type | None] = None  # TrainConfig.task options, as a dataclass

    def __init__(self, names: Sequence[str], options: Mapping[str, Any] | None = None,
                 state: Mapping[str, Any] | None = None):
        self.names = list(names)
        self.options = self._make_options(options or {})
        self.state: dict[str, Any] = dict(state or {})

    # ----------------------------------------------------------------- what the trainer asks
    @property
    def head(self) -> HeadSpec:
        return HeadSpec(len(self.names), self.per_token)

    @property
    def default_metric(self) -> str:
        """The eval metric that picks the best epoch when TrainConfig.select_metric is unset."""
        return self.report_metrics[0]

    def metric_names(self) -> list[str]:
        return [*self.report_metrics, "loss"]

    def check_metric(self, name: str) -> str:
        """``name`` (or the default for "") if this task reports it; else a clear error."""
        name = name or self.default_metric
        if name not in self.metric_names():
            raise ValueError(f"select_metric {name!r} is not a {self.kind} metric; choose one of "
                             f"{self.metric_names()} (or leave it unset for {self.default_metric!r})")
        return name

    def better(self, metric: str, score: float, best: float | None) -> bool:
        """Whether ``score`` on ``metric`` beats ``best`` (None: nothing yet)."""
        if best is None:
            return True
        if math.isnan(score):
            return False
        return score < best if metric in self.lower_is_better else score > best

    def fit(self, train_targets: np.ndarray) -> None:
        """Learn what the task needs from the train split's targets before training (default: nothing)."""

    def check_targets(self, targets: torch.Tensor, split: str) -> None:
        """Refuse a split whose targets cannot be scored (default: every target can)."""

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss of a batch."""
        raise NotImplementedError

    def loss_weight(self, targets: torch.Tensor) -> int:
        """What a batch's mean loss averages over (examples; tagging: scored tokens), to sum losses exactly."""
        return len(targets)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor, *, tune: bool) -> dict[str, float]:
        """Metrics over a whole split from every example's outputs and targets (concatenated; per-token tasks:
        the scored tokens only). ``tune``: this is the eval split, so tune what the task tunes on it (and keep
        it in :attr:`state`); otherwise use the state as it is."""
        raise NotImplementedError

    def scored(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's (outputs, targets) as they are kept for :meth:`metrics` (per-token tasks drop what is not
        scored), on the CPU."""
        return outputs.cpu(), targets.cpu()

    def predictions(self, outputs: torch.Tensor, mask: torch.Tensor | None = None) -> list[dict[str, Any]]:
        """One record per example for ``unipt predict``: the prediction and its scores, by name."""
        raise NotImplementedError

    def record(self) -> dict[str, Any]:
        """What a checkpoint saves to rebuild this task: kind, names, options and learned state."""
        return {"kind": self.kind, "names": self.names, "options": _options_dict(self.options),
                "state": self.state}

    # ----------------------------------------------------------------- internals
    def _make_options(self, values: Mapping[str, Any]) -> Any:
        if self.options_cls is None:
            if values:
                raise ValueError(f"a {self.kind} task takes no options (train.<run>.task), got {sorted(values)}")
            return None
        valid = {f.name for f in fields(self.options_cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"unknown {self.kind} task option(s) {unknown}; valid: {sorted(valid)}")
        return self.options_cls(**values)


def _options_dict(options: Any) -> dict[str, Any]:
    return {} if options is None else {f.name: getattr(options, f.name) for f in fields(options)}
