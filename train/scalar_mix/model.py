"""Scalar-mix probe (Peters et al. 2018, ELMo; Yang et al. 2021, SUPERB) on cached hidden states.

Notation: selected hidden states H_1 ... H_L (B, N, D), all of one width D; valid-token mask M (B, N).

    p_l = LN(mean_M(H_l))                     pooled layer (LN without affine, optional)   (B, D)
    w   = softmax(s_1 ... s_L)                mixing weights, s_l learned, init 0           (L,)
    x   = gamma · Σ_l w_l p_l                 gamma learned, init 1                         (B, D)
    logits = Linear(dropout(x))                                                             (B, classes)
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .._pooling import masked_mean, refuse_per_token
from ..tasks import HeadSpec
from .config import ScalarMixConfig


class ScalarMix(nn.Module):
    def __init__(self, config: ScalarMixConfig, layer_widths: Sequence[int], num_labels: int | HeadSpec):
        super().__init__()
        outputs = refuse_per_token(num_labels, "scalar_mix").outputs
        widths = list(layer_widths)
        if not widths:
            raise ValueError("a scalar mix needs at least 1 layer, got none")
        if len(set(widths)) != 1:
            raise ValueError(f"a scalar mix sums layers, so they must share one width; got widths {widths}. "
                             f"Select layers of equal width with `layers` (e.g. leave out a projection layer).")
        self.config = config
        width = widths[0]
        self.norm = nn.LayerNorm(width, elementwise_affine=False) if config.normalize else nn.Identity()
        self.scalars = nn.Parameter(torch.zeros(len(widths)))  # s_l: softmax(0, ..., 0) = uniform weights
        self.gamma = nn.Parameter(torch.ones(()))  # gamma: overall scale of the mix
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(width, outputs)

    def layer_weights(self) -> torch.Tensor:
        """The mixing weights w = softmax(s), one per selected layer (L,), detached for reporting."""
        return torch.softmax(self.scalars.detach(), dim=0)

    def forward(self, hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        if len(hidden_states) != len(self.scalars):
            raise ValueError(f"expected {len(self.scalars)} layers of hidden states, got {len(hidden_states)}")
        pooled = torch.stack([masked_mean(h, mask) for h in hidden_states], dim=1)  # mean_M(H_l)  (B, L, D)
        pooled = self.norm(pooled)  # p_l                                                         (B, L, D)
        weights = torch.softmax(self.scalars, dim=0)  # w                                          (L,)
        mixed = self.gamma * torch.einsum("l,bld->bd", weights, pooled)  # x = gamma · Σ_l w_l p_l  (B, D)
        return self.classifier(self.dropout(mixed))  # (B, classes)
