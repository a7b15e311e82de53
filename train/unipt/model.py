"""UniPT side network, transformer variant (Diao et al., CVPR 2024, arXiv 2308.14316).

Notation: hidden states H_0 ... H_L (B, N, D_l) from the frozen backbone, valid-token mask M (B, N),
output width E, mapped width m = E // r, l1n(X) = X / max(sum(|X|, last axis), eps).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._pooling import masked_mean, token_output_head
from ..tasks import HeadSpec
from .config import UniPTConfig


class UniPT(nn.Module):
    """Parallel side network: reads every selected layer, returns token outputs Y (B, N, E)."""

    def __init__(self, layer_widths: Sequence[int], out_dim: int | None = None, reduction: int = 2, eps: float = 1e-8):
        super().__init__()
        if len(layer_widths) < 2:
            raise ValueError(f"UniPT needs at least 2 layers, got widths {list(layer_widths)}")
        self.out_dim = out_dim or layer_widths[-1]  # E
        m = max(1, self.out_dim // reduction)
        self.mapped_dim = m
        self.eps = eps
        # 1. one down-sampling module per layer: X_l = LayerNorm_l(Linear_l(H_l))
        self.down = nn.ModuleList(nn.Sequential(nn.Linear(d, m), nn.LayerNorm(m)) for d in layer_widths)
        # 4. one shared confidence gate g: R^m -> R
        self.gate = nn.Linear(m, 1)
        # 5. Proj = LayerNorm(Linear(m -> m)); up-projection m -> E
        self.proj = nn.Sequential(nn.Linear(m, m), nn.LayerNorm(m))
        self.up = nn.Linear(m, self.out_dim)

    def forward(self, hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        mask = mask.to(hidden_states[0].dtype)  # (B, N)
        xs = [down(h) for down, h in zip(self.down, hidden_states)]
        anchor = xs[-1]  # A = X_L                                            (B, N, m)
        targets = torch.stack(xs[:-1], dim=1)  # X_l, l = 0 .. L-1 on one axis (B, L, N, m)
        a = masked_mean(anchor, mask)  # pooled anchor                         (B, m)

        # 3. parallel interaction, all target layers in one batched op
        scores = torch.einsum("bqm,blkm->blqk", anchor, targets)  # A · X_lᵀ   (B, L, N, N)
        scores = F.relu(scores) * mask[:, None, None, :]  # padded keys score 0
        weights = scores / scores.abs().sum(dim=-1, keepdim=True).clamp_min(self.eps)  # l1n(S_l)
        z = weights @ targets + targets  # Z_l = (l1n(S_l) + I) · X_l            (B, L, N, m)

        # 4. confidence aggregation: alpha = softmax_l g(a ⊙ t_l)
        t = masked_mean(targets, mask)  # t_l = mean_M(X_l)                     (B, L, m)
        alpha = torch.softmax(self.gate(a[:, None, :] * t).squeeze(-1), dim=1)  # (B, L)
        z = torch.einsum("bl,blnm->bnm", alpha, z)  # Z = Σ_l α_l Z_l             (B, N, m)

        # 5. output
        o = anchor + self.proj(z)  # O = A + Proj(Z)                             (B, N, m)
        return self.up(F.relu(o))  # Y                                            (B, N, E)


class UniPTClassifier(nn.Module):
    """UniPT side network + a task head (masked-mean pooled, or per token for tagging): (hidden states, mask)
    -> scores (B, K), or (B, N, K) per token."""

    def __init__(self, config: UniPTConfig, layer_widths: Sequence[int], num_labels: int | HeadSpec):
        super().__init__()
        self.config = config
        self.side = UniPT(layer_widths, out_dim=config.out_dim, reduction=config.reduction, eps=config.eps)
        self.head = token_output_head(self.side.out_dim, num_labels, config.dropout)

    def forward(self, hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.side(hidden_states, mask), mask)
