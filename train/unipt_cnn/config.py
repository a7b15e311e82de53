"""Configuration of the UniPT side network (CNN variant)."""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Sequence


@dataclass
class UniPTCNNConfig:
    reduction: int = 2
    """r: mapped channels m = E // r. The paper's default is 2; larger r trades accuracy for speed."""
    out_dim: int | None = None
    """E: channels of the side network's output map Y; None = the channels of the anchor (last selected) stage."""
    layers: str | Sequence[int] = "all"
    """Backbone stages that feed the network ("all" stored stages, or indices; negative counts from the last),
    ordered from fine to coarse. The last selected stage is the anchor; every earlier one is pooled to its grid."""
    dropout: float = 0.1
    """Dropout between global average pooling and the classification layer."""
    eps: float = 1e-8
    """Floor of the L1 normaliser in l1n(.), both in the window pooling and in the interaction."""

    def __post_init__(self) -> None:
        if self.reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {self.reduction}")
        if self.out_dim is not None and self.out_dim < 1:
            raise ValueError(f"out_dim must be positive or None (= the anchor's channels), got {self.out_dim}")
        if isinstance(self.layers, str) and self.layers != "all":
            raise ValueError(f"layers must be 'all' or a list of stage indices, got {self.layers!r}")
        if not isinstance(self.layers, str):
            if len(self.layers) < 2:
                raise ValueError(f"UniPT needs at least 2 stages (targets + the anchor), got {list(self.layers)}")
            bad = [x for x in self.layers if isinstance(x, bool) or not isinstance(x, Integral)]
            if bad:
                raise ValueError(f"layers must be integer stage indices, got {bad} in {list(self.layers)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.eps <= 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
