"""Configuration of the linear-probe baseline."""

from __future__ import annotations

from dataclasses import dataclass

POOLINGS = ("mean", "cls")


@dataclass
class LinearProbeConfig:
    layer: int = -1
    """Which stored layer to probe (index into the backbone's hidden states; negative counts from the last)."""
    pooling: str = "mean"
    """Token pooling before the linear layer: "mean" (masked mean; for a feature map, global average pooling)
    or "cls" (the first token; not for feature maps)."""
    normalize: bool = True
    """LayerNorm (no affine) on the pooled vector: puts every layer on one scale, so one lr fits all."""

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")

    @property
    def layers(self) -> list[int]:
        return [self.layer]
