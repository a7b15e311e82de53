"""Configuration of the UniPT side network (transformer variant)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass
class UniPTConfig:
    reduction: int = 2
    """r: mapped width m = E // r. The paper's default is 2; larger r trades accuracy for speed."""
    out_dim: int | None = None
    """E: width of the side network's output Y; None = the width of the last selected layer."""
    layers: str | Sequence[int] = "all"
    """Hidden-state layers that feed the network ("all" stored layers, or indices; negative counts
    from the last). The last selected layer is the anchor."""
    dropout: float = 0.1
    """Dropout before the classification head."""
    eps: float = 1e-8
    """Floor of the L1 normaliser in l1n(S)."""

    def __post_init__(self) -> None:
        if self.reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {self.reduction}")
        if self.out_dim is not None and self.out_dim < 1:
            raise ValueError(f"out_dim must be positive, got {self.out_dim}")
        if isinstance(self.layers, str) and self.layers != "all":
            raise ValueError(f"layers must be 'all' or a list of layer indices, got {self.layers!r}")
        if not isinstance(self.layers, str) and len(self.layers) < 2:
            raise ValueError(f"UniPT needs at least 2 layers (targets + the anchor), got {list(self.layers)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
