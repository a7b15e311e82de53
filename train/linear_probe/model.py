"""Linear probe: pooled hidden states of one frozen layer -> Linear -> classes."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .._pooling import masked_mean
from .config import LinearProbeConfig


class LinearProbe(nn.Module):
    def __init__(self, config: LinearProbeConfig, layer_widths: Sequence[int], num_labels: int):
        super().__init__()
        if len(layer_widths) != 1:
            raise ValueError(f"a linear probe reads exactly one layer, got {len(layer_widths)}")
        self.config = config
        width = layer_widths[0]
        self.norm = nn.LayerNorm(width, elementwise_affine=False) if config.normalize else nn.Identity()
        self.classifier = nn.Linear(width, num_labels)

    def forward(self, hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        (h,) = hidden_states  # (B, N, D) tokens, or a (B, C, H, W) feature map
        if h.dim() == 4:
            if self.config.pooling != "mean":
                raise ValueError(f"pooling {self.config.pooling!r} needs tokens; a feature map takes pooling "
                                 "\"mean\" (global average pooling)")
            pooled = h.mean(dim=(2, 3))  # (B, C)
        else:
            pooled = masked_mean(h, mask) if self.config.pooling == "mean" else h[:, 0]  # (B, D)
        return self.classifier(self.norm(pooled))  # (B, classes)
