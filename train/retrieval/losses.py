"""Contrastive losses over a batch of matching (query, document) embeddings, in-batch negatives.

``q``, ``d``: (B, E) L2-normalised; row i of each is the pair i. ``positives``: (B, B) bool, ``positives[i, j]``
= document j is relevant to query i (the diagonal is True). Off-diagonal positives (two captions of one image
in a batch, or one query relevant to two batch documents) are left out of the negatives: the model is never
pushed away from a right answer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(q: torch.Tensor, d: torch.Tensor, scale: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): ``½ [CE(s·QDᵀ, I) + CE(s·DQᵀ, I)]``, mean over the batch."""
    logits = scale * (q @ d.T)  # (B, B): query i against document j
    others = positives & ~torch.eye(len(q), dtype=torch.bool, device=q.device)  # positives off the diagonal
    target = torch.arange(len(q), device=q.device)
    by_query = F.cross_entropy(logits.masked_fill(others, float("-inf")), target)
    by_document = F.cross_entropy(logits.T.masked_fill(others.T, float("-inf")), target)
    return 0.5 * (by_query + by_document)


def hardest_negative_triplet(q: torch.Tensor, d: torch.Tensor, positives: torch.Tensor,
                             margin: float = 0.2) -> torch.Tensor:
    """VSE∞ / VSE++ max-violation hinge: ``Σ_i [α − S_ii + max_{j≠i} S_ij]₊ + [α − S_ii + max_{j≠i} S_ji]₊``,
    the maxima over negatives only; summed over the batch, as VSE∞ does."""
    scores = q @ d.T  # (B, B)
    diagonal = scores.diagonal()
    negatives = scores.masked_fill(positives, float("-inf"))
    hardest_document = negatives.max(dim=1).values  # per query: its most similar non-relevant document
    hardest_query = negatives.max(dim=0).values  # per document: its most similar non-relevant query
    # A row with no negative (a batch of one) has max -inf: its hinge is 0.
    return ((margin - diagonal + hardest_document).clamp(min=0).sum()
            + (margin - diagonal + hardest_query).clamp(min=0).sum())
