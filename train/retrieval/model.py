"""Two towers, one per store: each a side network over its backbone's cached hidden states, pooled, projected
into a shared space and L2-normalised; similarity is the dot product (cosine).

Per tower (DESIGN, "Retrieval"): side network (UniPT by default; any method) → masked mean pool → Linear to
``embed_dim`` → L2 norm. The method's own pooled head is that pool and projection: a method built with a head
of ``embed_dim`` outputs (HeadSpec) gives the tower's embedding before the norm, so UniPT, LST and the linear
probe (a linear projection of one pooled layer) are towers as they are. ``frozen`` is the zero-shot line: the
backbone's own mean-pooled last layer, no parameters, no projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._methods import METHODS, Method, get_method
from .._pooling import masked_mean
from ..tasks import HeadSpec


@dataclass
class FrozenConfig:
    layer: int = -1
    """The stored layer whose mean-pooled tokens are the embedding (default: the last)."""

    @property
    def layers(self) -> list[int]:
        return [self.layer]


class FrozenMean(nn.Module):
    """The backbone's own embedding: masked mean of one layer's tokens (feature maps: global average)."""

    def __init__(self, config: FrozenConfig, layer_widths: Sequence[int], head: HeadSpec | int | None = None):
        super().__init__()
        self.config, self.width = config, layer_widths[0]

    def forward(self, hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        (h,) = hidden_states
        return h.mean(dim=(2, 3)) if h.dim() == 4 else masked_mean(h, mask)  # (B, D)


TOWER_METHODS: dict[str, Method] = {
    # The two-tower trainer builds a tower from its config and the layer widths and steps it, nothing else: a
    # method that completes its config from the store (SHERL's backbone block) or has a phase of its own after
    # the epochs (Head2Toe's feature selection) is not a tower yet.
    **{name: method for name, method in METHODS.items() if method.bind is None and method.finish is None},
    "frozen": Method("frozen", FrozenConfig, FrozenMean, ("tokens", "maps"), token_outputs=False),
}
"""Methods a tower can be: the side networks and baselines that need only their config, plus ``frozen`` (no
training)."""


def get_tower_method(name: str) -> Method:
    return get_method(name, TOWER_METHODS, "tower method")


class ResidualTower(nn.Module):
    """``e = mean_M(H_last) + g · side(H)``: the tower's side network added to the backbone's own embedding (the
    mean-pooled last layer it reads), through a gate ``g`` that starts at 0 (ReZero), so training starts from
    the frozen embedding and the side network learns a correction to it. For a backbone whose pooled output is
    already a good embedding (a sentence-embedding model on paraphrases), a freshly initialised projection would
    throw that away and have to learn it back from the training pairs."""

    def __init__(self, side: nn.Module, width: int):
        super().__init__()
        self.side, self.width = side, width
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        last = hidden_states[-1]  # the last layer the side network reads (UniPT's anchor, the probe's layer)
        base = last.mean(dim=(2, 3)) if last.dim() == 4 else masked_mean(last, mask)  # (B, D)
        return base + self.gate * self.side(hidden_states, mask)


def build_tower(method: str, model_options: dict, layer_widths_of: dict[int, int], stored_layers: Sequence[int],
                embed_dim: int, layout: str = "tokens", where: str = "",
                residual: bool = False) -> tuple[nn.Module, object, list[int]]:
    """A tower's side network for a store with these layers: (module, method config, layers it reads).
    ``residual``: wrapped in :class:`ResidualTower` (a frozen tower is its own embedding already: not wrapped)."""
    from .._methods import resolve_layers

    spec = get_tower_method(method)
    spec.check_layout(layout, where or "the store")
    config = spec.make_config(model_options)
    layers = resolve_layers(config.layers, stored_layers)
    widths = [layer_widths_of[l] for l in layers]
    module = spec.build(config, widths, HeadSpec(embed_dim))
    if residual and method != "frozen":
        if widths[-1] != embed_dim:
            raise ValueError(f"a residual tower adds its output to the mean-pooled layer {layers[-1]} (width "
                             f"{widths[-1]}), so task.embed_dim must be {widths[-1]}, got {embed_dim}{where and ' (' + where + ')'}")
        module = ResidualTower(module, widths[-1])
    return module, config, layers


class TwoTower(nn.Module):
    """``query`` and ``document`` towers and the learnable scale of InfoNCE (``log s``, s = 1 / temperature)."""

    def __init__(self, query: nn.Module, document: nn.Module, *, temperature: float = 0.07, max_scale: float = 100.0,
                 learn_temperature: bool = True):
        super().__init__()
        self.query, self.document = query, document
        self.max_scale = max_scale
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learn_temperature)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)

    def embed(self, tower: str, hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """(B, E) unit-norm embeddings of one tower's batch."""
        return F.normalize(getattr(self, tower)(hidden_states, mask).float(), dim=-1)

    def forward(self, query_states: Sequence[torch.Tensor], query_mask: torch.Tensor,
                document_states: Sequence[torch.Tensor], document_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed("query", query_states, query_mask), self.embed("document", document_states, document_mask)

    def trainable(self) -> list[nn.Parameter]:
        """The parameters to train: none for two frozen towers (the scale alone changes no ranking)."""
        towers = [p for tower in (self.query, self.document) for p in tower.parameters() if p.requires_grad]
        return towers + ([self.log_scale] if towers and self.log_scale.requires_grad else [])
