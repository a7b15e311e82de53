"""Res-Tuning-Bypass (Jiang et al., NeurIPS 2023, arXiv 2310.19859; official code modelscope/ms-swift,
``swift/tuners/restuning.py`` and ``restuning_components.py``), on cached hidden states.

Notation: selected hidden states H_0 ... H_L (B, N, D) from the frozen backbone, all of one width D (H_0 = the
first selected layer), valid-token mask M (B, N), bottleneck width k = D // r (or ``bottleneck``).

    A(x) = x + W_up · GELU(W_down · x + c_down) + c_up       residual bottleneck adapter D -> k -> D  (B, N, D)
    b_0 = H_0                                                                                        (B, N, D)
    for i = 1 ... L:
        b_i = Lateral_i(H_i) + Vertical_i(b_{i-1})           Lateral_i, Vertical_i: two adapters A   (B, N, D)
    Y = LayerNorm(b_L)                                                                               (B, N, D)

Every op acts on each token alone (no mixing across tokens), so padded rows never reach a real token's output.

Against the official code (ResTuningBypassModule + ResTunerBypassBlock + ResAdapter, ``tuner_cfg =
"res_adapter"``), as its own tests and README configure it (root = the input of block 0, stems = the outputs of
every block, target = the input of the final norm or the pooler):
- b_0 is the first block's input (the embedding output H_0) and the lateral inputs are the blocks' outputs
  H_1 ... H_L: here the first selected layer and every later one. Selecting a subset of layers skips blocks; the
  official bypass always has one block per backbone block.
- The adapters are the official ResAdapter: a residual shortcut x + up(GELU(down(x))), Xavier-uniform weights,
  biases N(0, 1e-6^2); ``zero_init = "last"`` is its ``zero_init_last`` (the last bypass block's up-projections
  start at 0), off by default as there; "all" zeroes every up-projection, so b_L starts as H_0 + ... + H_L.
- The bottleneck is D // r by default; the official width is an absolute ``adapter_length`` (32), which
  ``bottleneck`` sets.
- The official bypass output replaces the input of the backbone's own final LayerNorm (ViT) or pooler (BERT),
  frozen, before the head. That norm is not in the store: a fresh, trainable LayerNorm(D) stands in for it.
- Not ported: the ``upsample`` auxiliary tuner (for CNN stage maps of different sizes), ``adapter_weight``
  scalings, ``res_group_adapter``. Layers of different widths are refused: the bypass sums them.
No gradient ever reaches the backbone: its hidden states come from the cache.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .._pooling import token_output_head
from ..tasks import HeadSpec
from .config import ZERO_INIT, ResTuningConfig


class ResAdapter(nn.Module):
    """A(x) = x + W_up · GELU(W_down · x + c_down) + c_up, (..., D) -> (..., D), initialised as the official."""

    def __init__(self, width: int, bottleneck: int, zero_up: bool = False):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, width)
        for linear in (self.down, self.up):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.normal_(linear.bias, std=1e-6)
        if zero_up:  # the adapter starts as the identity
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


class ResTuningBypass(nn.Module):
    """The bypass: reads every selected layer, returns token outputs Y (B, N, D)."""

    def __init__(self, layer_widths: Sequence[int], reduction: int = 8, bottleneck: int | None = None,
                 zero_init: str = "none"):
        super().__init__()
        widths = list(layer_widths)
        if len(widths) < 2:
            raise ValueError(f"Res-Tuning-Bypass needs at least 2 layers (the first starts the bypass), got widths "
                             f"{widths}")
        if len(set(widths)) > 1:
            raise ValueError(f"Res-Tuning-Bypass adds its layers together, so they must share one width; the selected "
                             f"layers have widths {widths}: select layers of one width")
        if zero_init not in ZERO_INIT:
            raise ValueError(f"zero_init must be one of {list(ZERO_INIT)}, got {zero_init!r}")
        self.out_dim = widths[0]  # D
        self.bottleneck = bottleneck or max(1, self.out_dim // reduction)  # k
        depth = len(widths) - 1

        def zero_up(i: int) -> bool:
            return zero_init == "all" or (zero_init == "last" and i == depth - 1)

        self.lateral = nn.ModuleList(ResAdapter(self.out_dim, self.bottleneck, zero_up(i)) for i in range(depth))
        self.vertical = nn.ModuleList(ResAdapter(self.out_dim, self.bottleneck, zero_up(i)) for i in range(depth))
        self.norm = nn.LayerNorm(self.out_dim)  # stands in for the backbone's final norm the bypass feeds

    def forward(self, hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        if len(hidden_states) != len(self.lateral) + 1:
            raise ValueError(f"expected {len(self.lateral) + 1} layers of hidden states, got {len(hidden_states)}")
        b = hidden_states[0]  # b_0 = H_0                                                        (B, N, D)
        for lateral, vertical, h in zip(self.lateral, self.vertical, hidden_states[1:]):
            b = lateral(h) + vertical(b)  # b_i = Lateral_i(H_i) + Vertical_i(b_{i-1})           (B, N, D)
        return self.norm(b)  # Y                                                                 (B, N, D)


class ResTuningClassifier(nn.Module):
    """Res-Tuning-Bypass + a task head (masked-mean pooled, or per token for tagging): (hidden states, mask)
    -> scores (B, K), or (B, N, K) per token."""

    def __init__(self, config: ResTuningConfig, layer_widths: Sequence[int], num_labels: int | HeadSpec):
        super().__init__()
        self.config = config
        self.side = ResTuningBypass(layer_widths, reduction=config.reduction, bottleneck=config.bottleneck,
                                    zero_init=config.zero_init)
        self.head = token_output_head(self.side.out_dim, num_labels, config.dropout)

    def forward(self, hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.side(hidden_states, mask), mask)  # (B, classes), or (B, N, classes) per token
