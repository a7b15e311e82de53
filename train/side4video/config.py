"""Configuration of the Side4Video-style side transformer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

OUTPUTS = ("side", "residual")


@dataclass
class Side4VideoConfig:
    reduction: int = 2
    """r: side width w = D // r, D = the width of the last selected layer (the official side_dim 384 on a
    768-wide ViT-B is r = 2)."""
    layers: str | Sequence[int] = "all"
    """Hidden-state layers the side network may read ("all" stored layers, or indices; negative counts from the
    last). The first selected layer starts the side state; ``stride`` picks the side layers among the others."""
    stride: int = 2
    """Of the selected layers after the first, every stride-th, counting back from the last, feeds a side block:
    2 over H_1 ... H_12 gives H_2, H_4, ..., H_12 (the official "interval" mode); 1 = every one. The layers it
    skips are still loaded: select exactly the layers you want with ``layers`` and stride 1 to avoid that."""
    num_heads: int | None = None
    """Attention heads in each side block; must divide w. None = w // 64, at least 1 (the official choice)."""
    max_positions: int = 512
    """Rows of the learned side position table added before every side block (indexed by the token's rank among
    its example's real tokens); longer examples are refused. 0 = no position embeddings."""
    output: str = "side"
    """What the head reads: "side" = LayerNorm(s), width w (the official recognition model); "residual" =
    H_last + Up(LayerNorm(s)), width D, Up zero-initialised (the official retrieval model's side_proj)."""
    dropout: float = 0.1
    """Dropout on each side block's attention and MLP branches and before the head (the official side blocks
    use 0)."""

    def __post_init__(self) -> None:
        if self.reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {self.reduction}")
        if isinstance(self.layers, str) and self.layers != "all":
            raise ValueError(f"layers must be 'all' or a list of layer indices, got {self.layers!r}")
        if not isinstance(self.layers, str) and len(self.layers) < 2:
            raise ValueError(f"Side4Video needs at least 2 layers (the first starts the side state), "
                             f"got {list(self.layers)}")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.num_heads is not None and self.num_heads < 1:
            raise ValueError(f"num_heads must be >= 1 or None (= side width // 64), got {self.num_heads}")
        if self.max_positions < 0:
            raise ValueError(f"max_positions must be >= 0 (0 = no position embeddings), got {self.max_positions}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {list(OUTPUTS)}, got {self.output!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
