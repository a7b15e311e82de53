"""LST: Ladder Side-Tuning, encoder side network (Sung et al., NeurIPS 2022, arXiv 2206.06522).

Notation: selected hidden states H_0 ... H_L (B, N, D_i) from the frozen backbone (H_0 = the first selected
layer), valid-token mask M (B, N), D = width of the last selected layer, side width w = D // r.

    s = W_first · H_0                                                           (B, N, w)
    for i = 1 ... L:
        mu_i = sigmoid(alpha_i / T)            alpha_i learned, init 0 (mu_i = 0.5), T = 0.1
        s = mu_i · s + (1 - mu_i) · Down_i(H_i)     ladder connection                (B, N, w)
        s = SideBlock_i(s)                     pre-norm transformer block of width w, padded keys masked
    Y = Up(LayerNorm(s))                                                        (B, N, D)

No gradient ever reaches the backbone: its hidden states come from the cache.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .._pooling import token_output_head
from ..tasks import HeadSpec
from .config import LSTConfig


class LST(nn.Module):
    """Ladder side network: reads every selected layer, returns token outputs Y (B, N, D)."""

    def __init__(self, layer_widths: Sequence[int], reduction: int = 8, num_heads: int = 4, dropout: float = 0.1,
                 gate_temperature: float = 0.1):
        super().__init__()
        widths = list(layer_widths)
        if len(widths) < 2:
            raise ValueError(f"LST needs at least 2 layers (the first starts the side state), got widths {widths}")
        self.out_dim = widths[-1]  # D
        w = max(1, self.out_dim // reduction)
        if w % num_heads:
            divisors = [h for h in range(1, w + 1) if w % h == 0]
            raise ValueError(f"num_heads {num_heads} does not divide the side width {w} (= {self.out_dim} // "
                             f"reduction {reduction}); choose num_heads from {divisors}")
        self.side_dim = w
        self.gate_temperature = gate_temperature
        # s = W_first · H_0
        self.first = nn.Linear(widths[0], w)
        # one ladder (gate alpha_i, Down_i, SideBlock_i) per later layer
        self.alpha = nn.Parameter(torch.zeros(len(widths) - 1))  # mu_i = sigmoid(0) = 0.5 at init
        self.down = nn.ModuleList(nn.Linear(d, w) for d in widths[1:])
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(w, num_heads, dim_feedforward=4 * w, dropout=dropout, batch_first=True,
                                       norm_first=True)
            for _ in widths[1:]
        )
        self.norm = nn.LayerNorm(w)
        self.up = nn.Linear(w, self.out_dim)

    def gates(self) -> torch.Tensor:
        """The ladder gates mu_i = sigmoid(alpha_i / T), one per later layer (L,), detached for reporting.

        mu_i is the share of the side state kept; 1 - mu_i the share taken from the backbone layer.
        """
        return torch.sigmoid(self.alpha.detach() / self.gate_temperature)

    def forward(self, hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        if len(hidden_states) != len(self.down) + 1:
            raise ValueError(f"expected {len(self.down) + 1} layers of hidden states, got {len(hidden_states)}")
        padded = ~mask.bool()  # True = padded key: attention ignores it                       (B, N)
        s = self.first(hidden_states[0])  # s = W_first · H_0                                     (B, N, w)
        for alpha, down, block, h in zip(self.alpha, self.down, self.blocks, hidden_states[1:]):
            mu = torch.sigmoid(alpha / self.gate_temperature)  # mu_i                             ()
            s = mu * s + (1 - mu) * down(h)  # ladder: mu_i · s + (1 - mu_i) · Down_i(H_i)         (B, N, w)
            s = block(s, src_key_padding_mask=padded)  # SideBlock_i                              (B, N, w)
        return self.up(self.norm(s))  # Y                                                         (B, N, D)


class LSTClassifier(nn.Module):
    """LST side network + a task head (masked-mean pooled, or per token for tagging): (hidden states, mask)
    -> scores (B, K), or (B, N, K) per token."""

    def __init__(self, config: LSTConfig, layer_widths: Sequence[int], num_labels: int | HeadSpec):
        super().__init__()
        self.config = config
        self.side = LST(layer_widths, reduction=config.reduction, num_heads=config.num_heads, dropout=config.dropout,
                        gate_temperature=config.gate_temperature)
        self.head = token_output_head(self.side.out_dim, num_labels, config.dropout)

    def forward(self, hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.side(hidden_states, mask), mask)  # (B, classes)
