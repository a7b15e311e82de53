"""SHERL: a side network whose output runs through the backbone's frozen last block (Diao et al., ECCV 2024,
arXiv 2407.07523; official code Paranioar/SHERL, ``VSE-infty/lib/adapter_for_transformer.py`` and its use in
``VSE-infty/lib/encoders.py``).

Notation: selected hidden states H_0 ... H_{L-1} (B, N, D_i) from the cache, the last one H_{L-1} the input of
the backbone's last block; valid-token mask M (B, N); D = the backbone's width; side width m = D // r;
K = L - 1 shallow layers; cos(x, y) = x·y / ((|x| + eps)(|y| + eps)), l1n(x) = x / (sum|x| + eps), eps 1e-8.

    s_i = LN_i(Linear_i(H_i))                         i = 0 ... L-1                     (B, N, m) each
    d   = s_{L-1};  S = stack(s_0 ... s_{L-2})        the shallow layers                 (B, N, K, m)
    per token, across the shallow layers:
      rho_i = sum_j relu(cos(s_i, s_j))              j over the shallow layers, itself too  (B, N, K)
      a_i   = l1n_i(relu(w·(s_i ⊙ d) + b) / rho_i)    one shared w (m -> 1), over i          (B, N, K)
    g = sum_i a_i s_i + d                                                                 (B, N, m)
    u = Dropout(LN(W_up relu(g))) + tanh(theta / T) · H_{L-1}   theta init 0, T = 0.1     (B, N, D)
    Y = FrozenLastBlock(u, M)                         the backbone's own last block, eval mode,
                                                      padded keys masked (DINOv2: + its final LN) (B, N, D)
    head: token_output_head(Y, M)  (masked mean -> Linear, or per token for tagging)

Gradients flow through the frozen block into the side parameters; its own weights are never trained nor
saved with the checkpoint (they are read from the backbone folder, hash-checked, when the model is built).
Every step before the block is per token, so padding can only enter through the block's attention, whose
padded keys are masked.

Checked against the official code; where this differs:
- Side width: official m = embed_size // r with embed_size the VSE joint width (1024); here m = D // r.
- The sums over i and j run over the shallow layers only, as in the official ``Guidance`` (``shallow_xs``
  = the first L - 1 downsampled layers): d is neither weighted nor counted in rho; it is added once.
  DESIGN.md's "i = 0 ... L-1" reads as including d; the official code does not.
- w has a bias (official ``fc_attn = nn.Linear(hidden_dim, 1)``); cos and l1n add eps to the norm as the
  official ``l2norm``/``l1norm`` (DESIGN.md's l1n divides by max(sum, eps): equal unless the sum is ~1e-8).
- The up-projection's LayerNorm has eps 1e-12 and its dropout is ``dropout`` (official 0.1, fixed).
- The official backbone runs online in train mode, so its last block applies dropout in training; here it
  runs in eval mode unless ``block_dropout``, like the cached layers before it (extracted in eval mode).
- Official head: VSE's Linear to the joint space + GPO pooling; here the task's token_output_head.
- The official code is BERT only; MPNet (its relative attention bias, an encoder-level tensor, is loaded with
  the block) and DINOv2 (whose final LayerNorm follows the block, ``final_norm``) are this project's.
- The official side network reads every layer (num_layer = 12 entries: H_0 ... H_{L-1}); here any subset
  whose last is H_{L-1} (default: all stored ones up to H_{L-1}).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .._pooling import token_output_head
from ..tasks import HeadSpec
from ._frozen import FrozenLastBlock, read_backbone_config, weights_sha256
from .config import SHERLConfig

EPS = 1e-8  # the official l1norm / l2norm's


class SHERL(nn.Module):
    """Side network + the backbone's frozen last block: (H_0 ... H_{L-1}, mask) -> token outputs Y (B, N, D).

    The block is held outside the module tree (``self.block``, not a submodule): it is not in
    ``parameters()``, ``state_dict()`` or ``train()``, so it is never optimised, never saved and stays in eval
    mode; ``.to()`` / ``.double()`` move and cast it with the model (``_apply``)."""

    def __init__(self, layer_widths: Sequence[int], block: FrozenLastBlock, reduction: int = 2,
                 gate_temperature: float = 0.1, dropout: float = 0.1, block_dropout: bool = False):
        super().__init__()
        widths = list(layer_widths)
        if len(widths) < 2:
            raise ValueError(f"SHERL needs at least 2 layers (shallow ones and H_{{L-1}}), got widths {widths}")
        self.out_dim = block.hidden_size  # D
        if widths[-1] != self.out_dim:
            raise ValueError(f"the last selected layer (H_{{L-1}}, the frozen block's input) has width {widths[-1]}; "
                             f"the backbone's last block takes width {self.out_dim}")
        m = max(1, self.out_dim // reduction)
        self.side_dim, self.gate_temperature, self.block_dropout = m, gate_temperature, block_dropout
        self.down = nn.ModuleList(nn.Sequential(nn.Linear(d, m), nn.LayerNorm(m)) for d in widths)  # s_i
        self.attn = nn.Linear(m, 1)  # w, b
        self.up = nn.Linear(m, self.out_dim)  # W_up
        self.up_norm = nn.LayerNorm(self.out_dim, eps=1e-12)
        self.up_dropout = nn.Dropout(dropout)
        self.theta = nn.Parameter(torch.zeros(1))  # tanh(0) = 0: the skip from H_{L-1} starts closed
        self.__dict__["block"] = block  # outside the module tree (see the class docstring)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.block._apply(fn, recurse)
        return self

    def gate(self) -> torch.Tensor:
        """tanh(theta / T), the weight of H_{L-1} in u, detached for reporting."""
        return torch.tanh(self.theta.detach() / self.gate_temperature)

    def block_input(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """u (B, N, D) from H_0 ... H_{L-1}: everything before the frozen block (per token, no mask needed)."""
        if len(hidden_states) != len(self.down):
            raise ValueError(f"expected {len(self.down)} layers of hidden states, got {len(hidden_states)}")
        s = [down(h) for down, h in zip(self.down, hidden_states)]  # s_i                       (B, N, m) each
        d = s[-1]  # the anchor                                                                   (B, N, m)
        shallow = torch.stack(s[:-1], dim=2)  # S                                                 (B, N, K, m)
        unit = shallow / (shallow.norm(dim=-1, keepdim=True) + EPS)
        rho = torch.relu(unit @ unit.transpose(-1, -2)).sum(-1)  # rho_i = sum_j relu(cos)        (B, N, K)
        score = torch.relu(self.attn(shallow * d.unsqueeze(2)).squeeze(-1)) / rho  # relu(w·(s_i ⊙ d) + b) / rho_i
        a = score / (score.abs().sum(-1, keepdim=True) + EPS)  # l1n over the shallow layers     (B, N, K)
        g = (a.unsqueeze(-1) * shallow).sum(2) + d  # g = sum_i a_i s_i + d                       (B, N, m)
        gate = torch.tanh(self.theta / self.gate_temperature)
        return self.up_dropout(self.up_norm(self.up(torch.relu(g)))) + gate * hidden_states[-1]  # u (B, N, D)

    def forward(self, hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        u = self.block_input(hidden_states)  # (B, N, D)
        self.block.train(self.training and self.block_dropout)  # eval always, unless block_dropout
        return self.block(u, mask)  # Y (B, N, D)


class SHERLClassifier(nn.Module):
    """SHERL + a task head (masked-mean pooled, or per token for tagging): (hidden states, mask) -> scores
    (B, K), or (B, N, K) per token. ``config`` must name the backbone folder and its weights hash (build_model
    fills both from the store, see :func:`bind_store`; a checkpoint saves them)."""

    def __init__(self, config: SHERLConfig, layer_widths: Sequence[int], num_labels: int | HeadSpec):
        super().__init__()
        self.config = config
        if config.backbone is None or config.weights_sha256 is None:
            raise ValueError("SHERL runs the backbone's last block and needs its folder and weights hash (model options "
                             "backbone and weights_sha256); build it with unipt.train.build_model(config, store), "
                             "which fills them from the store, or load a checkpoint")
        found = weights_sha256(config.backbone)
        if found != config.weights_sha256:
            raise ValueError(f"backbone folder {config.backbone} has weights sha256 {found}, but this SHERL model was "
                             f"made for {config.weights_sha256}: its frozen last block must come from the backbone the "
                             "store was extracted with; point model.backbone at that folder")
        block = FrozenLastBlock(config.backbone, final_norm=config.final_norm)
        self.side = SHERL(layer_widths, block, reduction=config.reduction, gate_temperature=config.gate_temperature,
                          dropout=config.dropout, block_dropout=config.block_dropout)
        self.head = token_output_head(self.side.out_dim, num_labels, config.dropout)

    def forward(self, hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.side(hidden_states, mask), mask)  # (B, classes), or (B, N, classes)


def bind_store(config: SHERLConfig, store: Any) -> SHERLConfig:
    """``config`` completed for training from ``store``: the backbone folder (absolute; default: the one the
    store's provenance records), its weights hash (checked against the store's), and the layers as an explicit
    list ending at H_{L-1}, the input of the backbone's last block."""
    recorded = store.provenance.get("backbone")
    recorded = recorded if isinstance(recorded, dict) else {}
    folder = config.backbone or recorded.get("location")
    if not folder or not Path(folder).is_dir():
        where = (f"model.backbone is {config.backbone!r}" if config.backbone else
                 f"store {store.url} records backbone location {recorded.get('location')!r}")
        raise FileNotFoundError(f"SHERL runs the backbone's last block from its folder, but {where}, which is not a "
                                "local folder here; set model.backbone to the local transformers folder the store was "
                                "extracted with (a recipe fills it from its [backbone] model)")
    folder = str(Path(folder).resolve())
    found, expected = weights_sha256(folder), recorded.get("weights_sha256")
    if expected is None:
        raise ValueError(f"store {store.url} records no backbone weights_sha256: SHERL cannot check that {folder} is "
                         "the backbone it was extracted with; extract the store with unipt")
    if found != expected:
        raise ValueError(f"backbone folder {folder} has weights sha256 {found}, but store {store.url} was extracted "
                         f"with weights sha256 {expected}: SHERL's frozen last block must be the store's backbone's; "
                         "set model.backbone to the folder the store was extracted with (or re-extract the store)")
    if config.weights_sha256 is not None and config.weights_sha256 != found:
        raise ValueError(f"model.weights_sha256 is {config.weights_sha256}, but backbone folder {folder} (and store "
                         f"{store.url}) have {found}; drop weights_sha256 or point model.backbone at that folder")
    from .._methods import resolve_layers  # (_methods registers this module: imported when called)

    last = read_backbone_config(folder).num_hidden_layers - 1  # H_{L-1}: the last block's input
    stored = list(store.layers)
    if config.layers == "all":
        layers = [layer for layer in stored if layer <= last]
    else:
        layers = resolve_layers(config.layers, stored)
    if not layers or layers[-1] != last:
        raise ValueError(f"SHERL's last selected layer must be H_{{L-1}} = layer {last}, the input of the backbone's "
                         f"last block (the backbone has {last + 1} blocks); got layers {layers} (the store holds "
                         f"{stored})" + ("" if last in stored else f"; the store lacks layer {last}: re-extract it"))
    if len(layers) < 2:
        raise ValueError(f"SHERL needs at least 2 layers (shallow ones and H_{{L-1}}); the store offers {layers}")
    return dataclasses.replace(config, backbone=folder, weights_sha256=found, layers=layers)
