"""Masked pooling shared by the side networks and their heads."""

from __future__ import annotations

import torch
from torch import nn


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean_M(X) = sum_n M_n X_n / max(sum_n M_n, 1)`` over the token axis (the one before features).

    x: (..., N, m); mask: (B, N) broadcast against x's leading axes, 1 = real token.
    """
    m = mask.to(x.dtype)
    while m.dim() < x.dim() - 1:  # (B, N) -> (B, 1, ..., N) to meet (B, L, N, m)
        m = m.unsqueeze(1)
    total = (x * m.unsqueeze(-1)).sum(dim=-2)
    count = m.sum(dim=-1, keepdim=True).clamp_min(1.0)
    return total / count


class ClassificationHead(nn.Module):
    """Task head on token outputs ``Y`` (B, N, E): masked mean pool -> dropout -> Linear -> classes.

    Padded rows of ``Y`` are ignored by the pooling, so the logits do not depend on padding.
    """

    def __init__(self, width: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, num_labels)

    def forward(self, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(masked_mean(y, mask)))  # (B, classes)
