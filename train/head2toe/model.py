"""Head2Toe: select features from every layer, then fit a linear head on them (Evci et al., ICML 2022,
arXiv 2201.03529; official code google-research/head2toe, ``models/finetune.py`` and ``finetune_fs.py``).

Notation: selected hidden states H_1 ... H_L (B, N, D_l), valid-token mask M (B, N), poolings P (masked
mean, masked max, first real token), C outputs.

    f_{l,p} = pool_p(H_l; M)                  one feature group per (layer, pooling)          (B, D_l)
    F = [f_{1,p_1}, f_{1,p_2}, ..., f_{L,p_P}]  concatenated, layer-major                     (B, F), F = P Σ_l D_l
    G = norm(F ⊙ keep)                        keep ∈ {0,1}^F (a buffer), norm one of:        (B, F)
          unit_vector: each group g of F ⊙ keep divided by its L2 norm (0 stays 0)
          per_feature: (F - μ) / sqrt(σ² + 1e-5) ⊙ keep, μ, σ² from the train split (buffers)
          none:        F ⊙ keep
    logits = W dropout(G) + b                 W (C, F)                                          (B, C)

Training (two phases; the second is :func:`unipt.train.head2toe.select.select_and_retrain`):
  1. selection: keep = 1; the trainer minimises task loss + λ Σ_f ||W_{:,f}||₂ (:meth:`regularization`, the
     group lasso over input features), for the run's epochs;
  2. score s_f = ||W_{:,f}||₂; for each candidate fraction q: keep = the top ⌊qF⌋ features (at least 1), a
     fresh head is trained on the kept features without the penalty; the q whose head scores best on the
     eval split (the task's select metric) gives the final model: this module with that keep and head
     (the dropped columns of W are 0).
The parameter shapes depend only on the config and the layer widths (keep, μ and σ are full-size buffers),
so a checkpoint rebuilds from config.json + safetensors.

Divergences from the official code:
  - Pooling. Official (ViT): per layer either the mean over all tokens ("normal"), the CLS token only, or
    the CLS token beside the mean of the others; optionally average pooling over windows of tokens to a
    target feature size, several sizes at once. Here: masked mean (over every real token, CLS included, as
    "normal"), masked max and the first real token, any combination; no windowed pooling (texts are ragged,
    and a window's position would mean different tokens in each example).
  - Normalisation "per_feature" standardises with the train split's statistics; the official code
    standardises each set (support, query) with its own statistics. "unit_vector" matches the official
    zero-aware normalisation (here: division by max(norm, 1e-12)).
  - Scores: the official ``connectivity_l2`` ranks by Σ_c W_{c,f}²; ||W_{:,f}||₂ ranks the same.
  - Optimiser: the trainer's (AdamW with weight decay, warm-up, schedule, gradient clipping, the run's lr) in
    both phases, over epochs; official: Adam, lr 0.1, cosine decay, 500 steps of batch 128, no weight decay.
    The selection phase keeps the last epoch's head for scoring, as the official code does.
  - Init: torch's Linear init (official: Keras' Glorot uniform, zero bias).
  - Official picks keep_fraction (and λ) by an outer sweep on validation; here the candidates are retrained
    and compared inside the run, on the eval split.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._pooling import masked_mean, refuse_per_token
from ..tasks import HeadSpec
from .config import Head2ToeConfig

STD_EPS = 1e-5
"""Variance epsilon of per-feature standardisation (tf.nn.batch_normalization's, as the official code)."""


def pool(h: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One feature group: ``h`` (B, N, D) pooled over its real tokens (``mask`` (B, N)) -> (B, D).

    An example without real tokens pools to 0 whatever the pooling."""
    m = mask.bool()
    if pooling == "mean":
        return masked_mean(h, m)
    if pooling == "max":
        filled = h.masked_fill(~m[..., None], float("-inf")).amax(dim=1)
        return torch.where(m.any(dim=1, keepdim=True), filled, torch.zeros_like(filled))
    if pooling == "cls":
        first = m.int().argmax(dim=1)  # the first real token (position 0 with right padding)
        picked = h[torch.arange(h.shape[0], device=h.device), first]
        return picked * m.any(dim=1, keepdim=True).to(h.dtype)
    raise ValueError(f"unknown pooling {pooling!r}")


class Head2Toe(nn.Module):
    def __init__(self, config: Head2ToeConfig, layer_widths: Sequence[int], num_labels: int | HeadSpec):
        super().__init__()
        outputs = refuse_per_token(num_labels, "head2toe").outputs
        widths = list(layer_widths)
        if not widths:
            raise ValueError("head2toe needs at least 1 layer, got none")
        self.config = config
        self.layer_widths = widths
        self.group_sizes = [w for w in widths for _ in config.poolings]  # layer-major, pooling-minor
        self.num_features = sum(self.group_sizes)
        self.register_buffer("keep", torch.ones(self.num_features))  # 1 = selected feature
        self.register_buffer("feature_mean", torch.zeros(self.num_features))  # per_feature: train split's μ
        self.register_buffer("feature_std", torch.ones(self.num_features))  # per_feature: sqrt(σ² + eps)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(self.num_features, outputs)

    # ----------------------------------------------------------------- the equations
    def features(self, hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """F: every (layer, pooling) group, concatenated (B, F); no normalisation, no selection."""
        if len(hidden_states) != len(self.layer_widths):
            raise ValueError(f"expected {len(self.layer_widths)} layers of hidden states, got {len(hidden_states)}")
        return torch.cat([pool(h, mask, p) for h in hidden_states for p in self.config.poolings], dim=-1)

    def normalized(self, features: torch.Tensor) -> torch.Tensor:
        """G = norm(F ⊙ keep) (B, F): what the linear head reads."""
        if self.config.normalization == "per_feature":
            return (features - self.feature_mean) / self.feature_std * self.keep
        kept = features * self.keep
        if self.config.normalization == "none":
            return kept
        # unit_vector: the kept features of each group to unit norm (the official code gathers the kept
        # features of a layer, then normalises them: the same vector, with the dropped ones 0)
        return torch.cat([F.normalize(g, dim=-1, eps=1e-12) for g in kept.split(self.group_sizes, dim=-1)], dim=-1)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """logits = W dropout(G) + b from pooled features F (B, F) -> (B, C); retraining calls it on features
        pooled once."""
        return self.classifier(self.dropout(self.normalized(features)))

    def forward(self, hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(hidden_states, mask))  # (B, C)

    # ----------------------------------------------------------------- selection
    def regularization(self) -> torch.Tensor:
        """λ Σ_f ||W_{:,f}||₂: the group lasso over input features that the trainer adds to the task loss."""
        return self.config.group_lasso * torch.linalg.vector_norm(self.classifier.weight, dim=0).sum()

    def feature_scores(self) -> torch.Tensor:
        """s_f = ||W_{:,f}||₂ (F,), detached: how much the head uses each feature."""
        return torch.linalg.vector_norm(self.classifier.weight.detach(), dim=0)

    def feature_groups(self) -> list[tuple[int, str]]:
        """(position of the layer among the selected ones, pooling) of each feature group, in F's order."""
        return [(i, p) for i in range(len(self.layer_widths)) for p in self.config.poolings]

    @torch.no_grad()
    def set_keep(self, keep: torch.Tensor) -> None:
        """Select features (``keep``: (F,) of 0/1) and zero the head's columns of the others."""
        if keep.shape != self.keep.shape:
            raise ValueError(f"keep must have shape {tuple(self.keep.shape)}, got {tuple(keep.shape)}")
        self.keep.copy_(keep.to(self.keep))
        self.classifier.weight.mul_(self.keep)
