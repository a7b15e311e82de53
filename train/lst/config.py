"""Configuration of the LST (Ladder Side-Tuning) encoder side network."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass
class LSTConfig:
    reduction: int = 8
    """r: side width D // r, D = the width of the last selected layer. The paper's default is 8."""
    layers: str | Sequence[int] = "all"
    """Hidden-state layers that feed the ladder ("all" stored layers, or indices; negative counts from the
    last). The first selected layer starts the side state; every later one gets a gate and a side block."""
    num_heads: int = 4
    """Attention heads in each side block; must divide the side width D // r (4 fits 384 // 8 and 768 // 8)."""
    dropout: float = 0.1
    """Dropout inside each side block (attention and feed-forward) and before the classification head."""
    gate_temperature: float = 0.1
    """T in the ladder gate mu_i = sigmoid(alpha_i / T); the paper uses 0.1."""

    def __post_init__(self) -> None:
        if self.reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {self.reduction}")
        if isinstance(self.layers, str) and self.layers != "all":
            raise ValueError(f"layers must be 'all' or a list of layer indices, got {self.layers!r}")
        if not isinstance(self.layers, str) and len(self.layers) < 2:
            raise ValueError(f"LST needs at least 2 layers (the first starts the side state), got {list(self.layers)}")
        if self.num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.gate_temperature <= 0:
            raise ValueError(f"gate_temperature must be positive, got {self.gate_temperature}")
