"""Configuration of the UniPT side network (CNN variant)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..unipt.config import check_unipt_options


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
        check_unipt_options(self, unit="stage")
