"""Masked pooling and the task heads shared by the side networks."""

from __future__ import annotations

import torch
from torch import nn

from .tasks import HeadSpec


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


class TokenHead(nn.Module):
    """Task head on token outputs ``Y`` (B, N, E) for per-token tasks: dropout -> Linear on every token.
    Padded positions get scores too; their targets are the ignore index, so nothing reads them."""

    def __init__(self, width: int, outputs: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, outputs)

    def forward(self, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(y))  # (B, N, outputs)


def head_spec(head: int | HeadSpec) -> HeadSpec:
    """A head given as a number of classes (a classifier, as before tasks existed) or a task's HeadSpec."""
    return head if isinstance(head, HeadSpec) else HeadSpec(int(head))


def token_output_head(width: int, head: int | HeadSpec, dropout: float) -> nn.Module:
    """The head on a side network's token outputs: pooled (one output row per example) or per token."""
    spec = head_spec(head)
    return (TokenHead if spec.per_token else ClassificationHead)(width, spec.outputs, dropout=dropout)


def refuse_per_token(head: int | HeadSpec, method: str) -> HeadSpec:
    """``head`` as a HeadSpec, refusing a per-token head for a method that outputs pooled vectors only."""
    spec = head_spec(head)
    if spec.per_token:
        from ._methods import METHODS  # here, not at the top: the methods' own modules import this one

        fits = sorted(name for name, m in METHODS.items() if m.token_outputs and "tokens" in m.layouts)
        raise ValueError(f"method {method!r} outputs one pooled vector per example; a per-token task (tagging) needs "
                         f"token outputs: use one of {fits}")
    return spec
