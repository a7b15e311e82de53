"""Configuration of the scalar-mix probe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass
class ScalarMixConfig:
    layers: str | Sequence[int] = "all"
    """Hidden-state layers to mix ("all" stored layers, or indices; negative counts from the last). They
    must all have the same width."""
    normalize: bool = True
    """LayerNorm (no affine) on each pooled layer before mixing: layers' scales differ widely, and without it
    the largest one dominates whatever the mixing weights say."""
    dropout: float = 0.0
    """Dropout on the mixed vector before the classifier."""

    def __post_init__(self) -> None:
        if isinstance(self.layers, str) and self.layers != "all":
            raise ValueError(f"layers must be 'all' or a list of layer indices, got {self.layers!r}")
        if not isinstance(self.layers, str) and len(self.layers) < 1:
            raise ValueError(f"a scalar mix needs at least 1 layer, got {list(self.layers)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
