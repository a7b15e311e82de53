"""UniPT side network, CNN variant (Diao et al., CVPR 2024, arXiv 2308.14316).

Notation: stage feature maps C_0 ... C_L (B, C_k, H_k, W_k) from a frozen convolutional backbone, fine to
coarse; the anchor is the last one, C_L, on the grid (H, W) with N = H·W cells. The window of stage k is
s_k = (H_k / H, W_k / W), read from the actual shapes at every forward (so one network serves any input
resolution whose stage grids tile the anchor's). Output channels E, mapped channels m = E // r,
l1n(X) = X / max(sum(|X|), eps) over the named axes.

1. Pre-interaction, every earlier stage pooled onto the anchor's grid:
   G_k = relu(conv1x1_k(C_L → C_k)), upsampled (nearest) to H_k×W_k; score map s = Σ_channels(G_k ⊙ C_k);
   in each non-overlapping s_k window  w = l1n(relu(s)) + 1/|s_k|  (|s_k| = cells in the window);
   pooled map P_k = Σ_window w ⊙ C_k, (B, C_k, H, W).
2. Down-sampling, one module per stage: X_k = BN_k(conv1x1_k(P_k)), A = X_L = BN_L(conv1x1_L(C_L)), (B, m, H, W).
3. Interaction on the flattened grids (B, N, m), as the transformer variant with every cell valid:
   S_l = relu(A · X_lᵀ), P_l = l1n(S_l) + I_N, Z_l = P_l · X_l.
4. Confidence aggregation: t_l = mean_N(X_l), a = mean_N(A), c_l = g(a ⊙ t_l), α = softmax_l(c), Z = Σ_l α_l Z_l.
5. Output: O = A + BN(conv1x1(Z)), Y = conv1x1(relu(O)), (B, E, H, W).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._pooling import refuse_per_token
from ..tasks import HeadSpec
from .config import UniPTCNNConfig


def window_size(stage_shape: Sequence[int], anchor_shape: Sequence[int]) -> tuple[int, int]:
    """(s_h, s_w) = (H_k / H, W_k / W): the window that pools a stage map onto the anchor's grid.

    Takes the shapes' last two entries (so tensor shapes work as they are); refuses a stage grid that is
    not an integer multiple of the anchor grid along each axis. H and W ratios may differ.
    """
    (h, w), (ha, wa) = tuple(stage_shape[-2:]), tuple(anchor_shape[-2:])
    if min(ha, wa) < 1 or h < ha or w < wa or h % ha or w % wa:
        raise ValueError(
            f"a stage map of shape {tuple(stage_shape)} cannot be pooled onto the anchor grid of shape "
            f"{tuple(anchor_shape)}: its H and W must be whole multiples of the anchor's (H {h}/{ha}, W {w}/{wa})"
        )
    return h // ha, w // wa


class UniPTCNN(nn.Module):
    """Parallel side network over stage feature maps: returns the output map Y (B, E, H, W) on the anchor's grid."""

    def __init__(self, stage_channels: Sequence[int], out_dim: int | None = None, reduction: int = 2,
                 eps: float = 1e-8):
        super().__init__()
        if len(stage_channels) < 2:
            raise ValueError(f"UniPT needs at least 2 stages, got channels {list(stage_channels)}")
        self.stage_channels = [int(c) for c in stage_channels]
        anchor_channels = self.stage_channels[-1]
        self.out_dim = out_dim or anchor_channels  # E
        m = max(1, self.out_dim // reduction)
        self.mapped_dim = m
        self.eps = eps
        # 1. one guide per earlier stage: G_k = relu(conv1x1(C_L -> C_k))
        self.guide = nn.ModuleList(nn.Conv2d(anchor_channels, c, 1) for c in self.stage_channels[:-1])
        # 2. one down-sampling module per stage (the anchor included): conv1x1 -> BN. The conv has no bias:
        #    BN removes any per-channel constant, so a bias would be a dead parameter.
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, m, 1, bias=False), nn.BatchNorm2d(m)) for c in self.stage_channels
        )
        # 4. one shared confidence gate g: R^m -> R
        self.gate = nn.Linear(m, 1)
        # 5. BN(conv1x1(m -> m)); up-projection conv1x1(m -> E)
        self.proj = nn.Sequential(nn.Conv2d(m, m, 1, bias=False), nn.BatchNorm2d(m))
        self.up = nn.Conv2d(m, self.out_dim, 1)

    def pool(self, k: int, stage: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """Step 1 for stage k: C_k (B, C_k, H_k, W_k) and the anchor C_L (B, C_L, H, W) -> P_k (B, C_k, H, W)."""
        b, c, _, _ = stage.shape
        h, w = anchor.shape[-2:]
        sh, sw = window_size(stage.shape, anchor.shape)
        windows = stage.reshape(b, c, h, sh, w, sw)  # C_k cut into s_h×s_w windows      (B, C_k, H, s_h, W, s_w)
        g = F.relu(self.guide[k](anchor))  # G_k                                            (B, C_k, H, W)
        # Σ_channels(up(G_k) ⊙ C_k): nearest upsampling repeats G_k[:, i, j] over window (i, j)
        scores = F.relu(torch.einsum("bchw,bchiwj->bhiwj", g, windows))  # relu(s)       (B, H, s_h, W, s_w)
        norm = scores.abs().sum(dim=(2, 4), keepdim=True).clamp_min(self.eps)  # per window (B, H, 1, W, 1)
        weights = scores / norm + 1.0 / (sh * sw)  # l1n(relu(s)) + 1/|s_k|               (B, H, s_h, W, s_w)
        return torch.einsum("bhiwj,bchiwj->bchw", weights, windows)  # Σ_window w ⊙ C_k  (B, C_k, H, W)

    def forward(self, feature_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        self._check_maps(feature_maps)
        anchor_map = feature_maps[-1]  # C_L                                                (B, C_L, H, W)
        # 1. pre-interaction: every earlier stage onto the anchor's grid
        pooled = [self.pool(k, stage, anchor_map) for k, stage in enumerate(feature_maps[:-1])]
        # 2. down-sampling, one module per stage
        xs = [down(x) for down, x in zip(self.down, pooled + [anchor_map])]  # X_k          (B, m, H, W)
        b, m, h, w = xs[-1].shape
        anchor = xs[-1].flatten(2).transpose(1, 2)  # A = X_L on the flattened grid         (B, N, m)
        targets = torch.stack(xs[:-1], dim=1).flatten(3).transpose(2, 3)  # X_l, l < L     (B, L, N, m)

        # 3. parallel interaction, all target stages in one batched op
        scores = F.relu(torch.einsum("bqm,blkm->blqk", anchor, targets))  # S_l = relu(A · X_lᵀ)  (B, L, N, N)
        weights = scores / scores.abs().sum(dim=-1, keepdim=True).clamp_min(self.eps)  # l1n(S_l)
        z = weights @ targets + targets  # Z_l = (l1n(S_l) + I) · X_l                        (B, L, N, m)

        # 4. confidence aggregation: alpha = softmax_l g(a ⊙ t_l)
        a = anchor.mean(dim=1)  # a = mean_N(A)                                              (B, m)
        t = targets.mean(dim=2)  # t_l = mean_N(X_l)                                         (B, L, m)
        alpha = torch.softmax(self.gate(a[:, None, :] * t).squeeze(-1), dim=1)  #            (B, L)
        z = torch.einsum("bl,blnm->bmn", alpha, z).reshape(b, m, h, w)  # Z = Σ_l α_l Z_l     (B, m, H, W)

        # 5. output
        o = xs[-1] + self.proj(z)  # O = A + BN(conv1x1(Z))                                  (B, m, H, W)
        return self.up(F.relu(o))  # Y                                                       (B, E, H, W)

    def _check_maps(self, feature_maps: Sequence[torch.Tensor]) -> None:
        if len(feature_maps) != len(self.stage_channels):
            raise ValueError(f"expected {len(self.stage_channels)} stage maps with channels {self.stage_channels}, "
                             f"got {len(feature_maps)}")
        batch = feature_maps[-1].shape[0]
        for k, (stage, channels) in enumerate(zip(feature_maps, self.stage_channels)):
            if stage.dim() != 4 or stage.shape[0] != batch or stage.shape[1] != channels:
                raise ValueError(f"stage {k} must be a ({batch}, {channels}, H, W) feature map, "
                                 f"got shape {tuple(stage.shape)}")


class UniPTCNNClassifier(nn.Module):
    """UniPT CNN side network + head (global average pool -> dropout -> Linear): stage maps -> logits."""

    def __init__(self, config: UniPTCNNConfig, stage_channels: Sequence[int], num_labels: int | HeadSpec):
        super().__init__()
        outputs = refuse_per_token(num_labels, "unipt_cnn").outputs
        self.config = config
        self.side = UniPTCNN(stage_channels, out_dim=config.out_dim, reduction=config.reduction, eps=config.eps)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),  # global average pool                                  (B, E, 1, 1)
            nn.Flatten(1),  #                                                                (B, E)
            nn.Dropout(config.dropout),
            nn.Linear(self.side.out_dim, outputs),  #                                        (B, classes)
        )

    def forward(self, hidden_states: Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states: the selected stage maps, fine to coarse, each (B, C_k, H_k, W_k).

        mask: accepted so the trainer can call every method alike; stage maps have no padding, so a mask
        that marks any position as padded is refused rather than silently ignored.
        """
        if mask is not None and not bool(mask.all()):
            raise ValueError("stage feature maps have no padding, but the mask marks "
                             f"{int((~mask.bool()).sum())} position(s) as padded")
        return self.head(self.side(hidden_states))
