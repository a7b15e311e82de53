"""Configuration of Head2Toe (feature selection from every layer, then a linear head on the kept features)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

POOLINGS = ("mean", "max", "cls")
NORMALIZATIONS = ("unit_vector", "per_feature", "none")
DEFAULT_KEEP_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass
class Head2ToeConfig:
    layers: str | Sequence[int] = "all"
    """Hidden-state layers to pool features from ("all" stored layers, or indices; negative counts from the
    last). Widths may differ."""
    poolings: Sequence[str] = ("mean",)
    """Token poolings per layer, each one group of features: "mean" (masked mean over real tokens), "max"
    (masked max), "cls" (the first real token)."""
    normalization: str = "unit_vector"
    """"unit_vector" (the official default: each (layer, pooling) group scaled to unit L2 norm per example,
    after dropping unselected features), "per_feature" (each feature standardised with the train split's mean
    and variance), or "none"."""
    group_lasso: float = 1e-4
    """λ of the selection phase's penalty λ Σ_f ||W_{:,f}||₂ (official: 1e-4); 0 = a plain linear head, whose
    column norms still rank the features."""
    keep_fractions: Sequence[float] = DEFAULT_KEEP_FRACTIONS
    """Candidate fractions of the features to keep, each in (0, 1]; the one whose retrained head scores best on
    the eval split is kept (tried smallest first; a tie keeps the smaller)."""
    retrain_epochs: int = 0
    """Passes over the in-memory pooled train split to retrain each candidate's head; 0 = the run's epochs (the
    official code retrains with the selection phase's training budget)."""
    dropout: float = 0.0
    """Dropout on the feature vector before the linear head (both phases)."""

    def __post_init__(self) -> None:
        if isinstance(self.layers, str) and self.layers != "all":
            raise ValueError(f"layers must be 'all' or a list of layer indices, got {self.layers!r}")
        if not isinstance(self.layers, str) and len(self.layers) < 1:
            raise ValueError(f"head2toe needs at least 1 layer, got {list(self.layers)}")
        if isinstance(self.poolings, str) or not self.poolings:
            raise ValueError(f"poolings must be a non-empty list drawn from {POOLINGS}, got {self.poolings!r}")
        bad = [p for p in self.poolings if p not in POOLINGS]
        if bad or len(set(self.poolings)) != len(self.poolings):
            raise ValueError(f"poolings must be distinct choices from {POOLINGS}, got {list(self.poolings)}")
        self.poolings = tuple(self.poolings)
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if not isinstance(self.group_lasso, (int, float)) or self.group_lasso < 0:
            raise ValueError(f"group_lasso (λ) must be a number >= 0, got {self.group_lasso!r}")
        if isinstance(self.keep_fractions, (str, int, float)) or not self.keep_fractions:
            raise ValueError(f"keep_fractions must be a non-empty list of fractions in (0, 1], got "
                             f"{self.keep_fractions!r}")
        bad = [f for f in self.keep_fractions if not isinstance(f, (int, float)) or not 0.0 < f <= 1.0]
        if bad or len(set(self.keep_fractions)) != len(self.keep_fractions):
            raise ValueError(f"keep_fractions must be distinct fractions in (0, 1], got {list(self.keep_fractions)}")
        self.keep_fractions = tuple(sorted(float(f) for f in self.keep_fractions))
        if not isinstance(self.retrain_epochs, int) or self.retrain_epochs < 0:
            raise ValueError(f"retrain_epochs must be an integer >= 0 (0 = the run's epochs), got "
                             f"{self.retrain_epochs!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
