"""Configuration of the UniPT side network (transformer variant)."""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
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
        check_unipt_options(self, unit="layer")


def check_unipt_options(config, unit: str) -> None:
    """The checks both UniPT variants' configs share (``unit``: "layer" for tokens, "stage" for CNN maps)."""
    if config.reduction < 1:
        raise ValueError(f"reduction must be >= 1, got {config.reduction}")
    if config.out_dim is not None and config.out_dim < 1:
        raise ValueError(f"out_dim must be positive or None (= the anchor's width), got {config.out_dim}")
    layers = config.layers
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be 'all' or a list of {unit} indices, got {layers!r}")
    else:
        if len(layers) < 2:
            raise ValueError(f"UniPT needs at least 2 {unit}s (targets + the anchor), got {list(layers)}")
        bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, Integral)]
        if bad:
            raise ValueError(f"layers must be integer {unit} indices, got {bad} in {list(layers)}")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {config.dropout}")
    if config.eps <= 0:
        raise ValueError(f"eps must be positive, got {config.eps}")
