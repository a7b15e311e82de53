"""Configuration of the Res-Tuning-Bypass side network."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

ZERO_INIT = ("none", "last", "all")


@dataclass
class ResTuningConfig:
    reduction: int = 8
    """r: bottleneck width D // r of every lateral and vertical adapter (D = the layers' common width)."""
    bottleneck: int | None = None
    """Bottleneck width in units, overriding reduction (the official ``adapter_length``, 32 there by default);
    None = D // reduction."""
    layers: str | Sequence[int] = "all"
    """Hidden-state layers that feed the bypass ("all" stored layers, or indices; negative counts from the
    last). The first selected layer starts the bypass (b_0); every later one is a lateral input."""
    zero_init: str = "none"
    """Which adapters' up-projections start at zero: "none" (the official default), "last" (the official
    ``zero_init_last``: the last bypass block's), "all" (every one: the bypass starts as the sum of its layers)."""
    dropout: float = 0.1
    """Dropout before the task head (the official adapters have none inside)."""

    def __post_init__(self) -> None:
        if self.reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {self.reduction}")
        if self.bottleneck is not None and self.bottleneck < 1:
            raise ValueError(f"bottleneck must be positive or None (= D // reduction), got {self.bottleneck}")
        if isinstance(self.layers, str) and self.layers != "all":
            raise ValueError(f"layers must be 'all' or a list of layer indices, got {self.layers!r}")
        if not isinstance(self.layers, str) and len(self.layers) < 2:
            raise ValueError(f"Res-Tuning-Bypass needs at least 2 layers (the first starts the bypass), "
                             f"got {list(self.layers)}")
        if self.zero_init not in ZERO_INIT:
            raise ValueError(f"zero_init must be one of {list(ZERO_INIT)}, got {self.zero_init!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
