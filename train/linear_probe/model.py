"""Linear probe: pooled hidden states of one frozen layer -> Linear -> classes (or targets); for per-token
tasks, every token of the layer -> Linear: the per-token linear baseline for tagging."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .._pooling import head_spec, masked_mean
from ..tasks import HeadSpec
from .config import LinearProbeConfig


class LinearProbe(nn.Module):
    def __init__(self, config: LinearProbeConfig, layer_widths: Sequence[int], num_labels: int | HeadSpec):
        super().__init__()
        if len(layer_widths) != 1:
            raise ValueError(f"a linear probe reads exactly one layer, got {len(layer_widths)}")
        spec = head_spec(num_labels)
        if spec.per_token and config.pooling != "mean":
            raise ValueError(f"a per-token task scores every token; pooling {config.pooling!r} does not apply: leave "
                             "it at \"mean\"")
        self.config, self.per_token = config, spec.per_token
        width = layer_widths[0]
        self.norm = nn.LayerNorm(width, elementwise_affine=False) if config.normalize else nn.Identity()
        self.classifier = nn.Linear(width, spec.outputs)

    def forward(self, hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        (h,) = hidden_states  # (B, N, D) tokens, or a (B, C, H, W) feature map
        if self.per_token:
            if h.dim() == 4:
                raise ValueError("a per-token task needs token rows; this layer is a feature map")
            return self.classifier(self.norm(h))  # (B, N, outputs)
        if h.dim() == 4:
            if self.config.pooling != "mean":
                raise ValueError(f"pooling {self.config.pooling!r} needs tokens; a feature map takes pooling "
                                 "\"mean\" (global average pooling)")
            pooled = h.mean(dim=(2, 3))  # (B, C)
        else:
            pooled = masked_mean(h, mask) if self.config.pooling == "mean" else h[:, 0]  # (B, D)
        return self.classifier(self.norm(pooled))  # (B, classes)
