"""Side4Video-style side transformer (Yao et al., arXiv 2311.15769; official code HJYao00/Side4Video,
``Retrieval/eva_clip/transformer_side.py``), the spatial side network for token sequences of cached hidden states.

Notation: selected hidden states H_0 ... H_L (B, N, D_l) from the frozen backbone (H_0 = the first selected
layer), valid-token mask M (B, N), D = width of the last selected layer, side width w = D // r; side layers
l_1 < ... < l_K = L: every ``stride``-th selected layer after H_0, counting back from the last.

    s = Linear_0(LN_0(H_0))                                    Down_0                            (B, N, w)
    for k = 1 ... K:
        s = s + Linear_k(LN_k(H_{l_k}))                        ladder input (LN over D_l)        (B, N, w)
        s = SideBlock_k(s):                                    pre-norm, padded keys masked
            s = s + P[rank]                                    shared learned positions P (max_positions, w)
            s = s + Drop(Attn(LN_1(s)))                        heads h, softmax(q kᵀ / √(w/h)) v
            s = s + Drop(W_2 GELU(W_1 LN_2(s)))                MLP w -> 4w -> w
    output "side":     Y = LN(s)                                                                (B, N, w)
    output "residual": Y = H_L + Up(LN(s))                     Up: w -> D, zero-initialised     (B, N, D)

rank = the token's position among its example's real tokens (0, 1, ...), so padding never moves a position.

Against the official code (``Transformer`` + ``SideResidualAttentionBlock`` in transformer_side.py, and the
video towers' ``AttnCBlock`` in Recognition/clip/model.py and Retrieval/eva_clip/eva_vit_model.py):
- Side layers: the official "interval" mode taps the outputs of 0-based blocks 1, 3, 5, ..., i.e. hidden states
  H_2, H_4, ..., H_L; stride 2 over all stored layers reproduces it (stride 1 = every block, as the recognition
  model's default). The fusion is transformer_side.py's sum ``s + Linear(LN(H))``; the video towers mix
  ``0.5 s + 0.5 LN(Linear(H))`` instead.
- Start: transformer_side.py starts the side state at the first side layer's projection; the video towers embed
  the raw frames with their own patch Conv3d + BatchNorm3d. The cache holds no pixels: Down_0 reads H_0 (the
  embedding output) instead.
- The block is transformer_side.py's SideResidualAttentionBlock (positions added, pre-norm attention, pre-norm
  GELU MLP of ratio 4, heads w // 64) without the text tower's causal mask (the stores hold bidirectional
  encoders): padded keys are masked instead. Its position table has a fixed length (32 text tokens / the
  patch grid); here ``max_positions`` rows indexed by real-token rank.
- Not ported (video only): the temporal depthwise Conv3d branch and BatchNorm3d of AttnCBlock, the temporal
  shift of the CLS token and its use as an extra attention key, the frame axis T. A stored CLS token is an
  ordinary token here.
- Final norm: the official BatchNorm3d (post_bn) becomes a per-token LayerNorm(w): no running statistics, so the
  outputs do not depend on padding and runs can train stacked.
- Output: the recognition model mean-pools the side features and its head reads them at width w ("side"); the
  retrieval model projects them with a zero-initialised side_proj (w -> D) and adds them to the backbone's output
  token ("residual", here per token on H_L).
- Init: the recognition AttnCBlock's CLIP-style normals (qkv std w^-1/2, fc1 std (2w)^-1/2, output projections
  std w^-1/2 (2K)^-1/2 with K the number of side blocks where it hard-codes 12), position table std 0.01; dropout
  (0 there) is an option.
No gradient ever reaches the backbone: its hidden states come from the cache.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .._pooling import token_output_head
from ..tasks import HeadSpec
from .config import OUTPUTS, Side4VideoConfig


def side_layer_indices(n_later: int, stride: int) -> list[int]:
    """Which of the ``n_later`` selected layers after the first feed side blocks (0-based among them): every
    ``stride``-th counting back from the last, so the last layer always does."""
    return list(range(n_later - 1, -1, -stride))[::-1]


class SideBlock(nn.Module):
    """A narrow pre-norm transformer block with its own attention (explicit matmuls and ``nn.Dropout``, so a
    stacked sweep can vmap it with dropout on): (s (B, N, w), positions (B, N, w), padded keys (B, N)) -> s."""

    def __init__(self, width: int, num_heads: int, dropout: float, depth: int):
        super().__init__()
        self.num_heads = num_heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.drop_1 = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * width, width)
        self.drop_2 = nn.Dropout(dropout)
        proj_std = width ** -0.5 * (2 * depth) ** -0.5  # CLIP's init, as the official side blocks
        for linear, std in ((self.qkv, width ** -0.5), (self.out, proj_std), (self.fc, (2 * width) ** -0.5),
                            (self.proj, proj_std)):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)

    def attention(self, x: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        heads = self.qkv(x).reshape(b, n, 3, self.num_heads, w // self.num_heads)
        q, k, v = heads.permute(2, 0, 3, 1, 4)  # (B, h, N, dh) each
        scores = q @ k.transpose(-1, -2) / math.sqrt(w // self.num_heads)  # (B, h, N, N)
        scores = scores.masked_fill(padded[:, None, None, :], float("-inf"))  # padded keys weigh 0
        attended = torch.softmax(scores, dim=-1) @ v  # (B, h, N, dh)
        return self.out(attended.transpose(1, 2).reshape(b, n, w))  # (B, N, w)

    def forward(self, s: torch.Tensor, positions: torch.Tensor | None, padded: torch.Tensor) -> torch.Tensor:
        if positions is not None:
            s = s + positions
        s = s + self.drop_1(self.attention(self.ln_1(s), padded))
        return s + self.drop_2(self.proj(self.act(self.fc(self.ln_2(s)))))


class Side4Video(nn.Module):
    """The side transformer: reads the selected layers, returns token outputs Y (B, N, w), or (B, N, D) with
    ``output = "residual"``."""

    def __init__(self, layer_widths: Sequence[int], reduction: int = 2, stride: int = 2, num_heads: int | None = None,
                 max_positions: int = 512, output: str = "side", dropout: float = 0.1):
        super().__init__()
        widths = list(layer_widths)
        if len(widths) < 2:
            raise ValueError(f"Side4Video needs at least 2 layers (the first starts the side state), got widths "
                             f"{widths}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {list(OUTPUTS)}, got {output!r}")
        w = max(1, widths[-1] // reduction)
        heads = num_heads or max(1, w // 64)
        if w % heads:
            divisors = [h for h in range(1, w + 1) if w % h == 0]
            raise ValueError(f"num_heads {heads} does not divide the side width {w} (= {widths[-1]} // reduction "
                             f"{reduction}); choose num_heads from {divisors}")
        self.side_dim, self.num_heads, self.output = w, heads, output
        # positions in hidden_states (0 = H_0) of the layers that feed side blocks
        self.side_layers = [1 + i for i in side_layer_indices(len(widths) - 1, stride)]
        self.n_layers = len(widths)
        self.first_norm = nn.LayerNorm(widths[0])
        self.first = nn.Linear(widths[0], w)  # Down_0
        self.norms = nn.ModuleList(nn.LayerNorm(widths[l]) for l in self.side_layers)  # LN_k over D_l
        self.linears = nn.ModuleList(nn.Linear(widths[l], w) for l in self.side_layers)  # Linear_k
        depth = len(self.side_layers)
        self.blocks = nn.ModuleList(SideBlock(w, heads, dropout, depth) for _ in self.side_layers)
        self.positions = nn.Parameter(torch.randn(max_positions, w) * 0.01) if max_positions else None
        self.norm = nn.LayerNorm(w)
        if output == "residual":
            self.out_dim = widths[-1]  # D
            self.up = nn.Linear(w, self.out_dim)
            nn.init.zeros_(self.up.weight)  # the side network starts as the identity on H_L
            nn.init.zeros_(self.up.bias)
        else:
            self.out_dim = w

    def position_table(self, mask: torch.Tensor) -> torch.Tensor | None:
        """P[rank] for every token (B, N, w): rank = its position among its example's real tokens."""
        if self.positions is None:
            return None
        rank = (mask.long().cumsum(dim=1) - 1).clamp_min(0)  # (B, N); padded rows take a real row, unread
        limit = self.positions.shape[0]
        if mask.shape[1] > limit:
            longest = int(mask.long().sum(dim=1).max())
            if longest > limit:
                raise ValueError(f"an example has {longest} tokens, more than max_positions = {limit}; raise "
                                 "max_positions or set it to 0 (no position embeddings)")
            rank = rank.clamp_max(limit - 1)
        return self.positions[rank]

    def forward(self, hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        if len(hidden_states) != self.n_layers:
            raise ValueError(f"expected {self.n_layers} layers of hidden states, got {len(hidden_states)}")
        padded = ~mask.bool()  # True = padded key                                               (B, N)
        positions = self.position_table(mask.bool())  #                                          (B, N, w)
        s = self.first(self.first_norm(hidden_states[0]))  # s = Down_0(H_0)                     (B, N, w)
        for l, norm, linear, block in zip(self.side_layers, self.norms, self.linears, self.blocks):
            s = s + linear(norm(hidden_states[l]))  # s + Linear_k(LN_k(H_l))                    (B, N, w)
            s = block(s, positions, padded)  # SideBlock_k                                       (B, N, w)
        y = self.norm(s)
        if self.output == "residual":
            return hidden_states[-1] + self.up(y)  # Y = H_L + Up(LN(s))                         (B, N, D)
        return y  # Y = LN(s)                                                                    (B, N, w)


class Side4VideoClassifier(nn.Module):
    """Side4Video side transformer + a task head (masked-mean pooled, or per token for tagging): (hidden states,
    mask) -> scores (B, K), or (B, N, K) per token."""

    def __init__(self, config: Side4VideoConfig, layer_widths: Sequence[int], num_labels: int | HeadSpec):
        super().__init__()
        self.config = config
        self.side = Side4Video(layer_widths, reduction=config.reduction, stride=config.stride,
                               num_heads=config.num_heads, max_positions=config.max_positions, output=config.output,
                               dropout=config.dropout)
        self.head = token_output_head(self.side.out_dim, num_labels, config.dropout)

    def forward(self, hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.side(hidden_states, mask), mask)  # (B, classes), or (B, N, classes) per token
