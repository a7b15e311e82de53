"""Options of a two-tower retrieval run: ``[train.<run>.task]`` of a retrieval recipe (the rest of the run is an
ordinary TrainConfig: method, model options, lr, epochs, batch size, seed, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LOSSES = ("infonce", "triplet")
TOWERS = ("query", "document")


@dataclass
class RetrievalOptions:
    embed_dim: int = 256
    """Width of the shared embedding space each tower projects its pooled output into (then L2-normalised)."""
    loss: str = "infonce"
    """"infonce": symmetric InfoNCE over in-batch negatives with a learnable scale (CLIP); "triplet": VSE∞'s
    hinge on the hardest in-batch negative, both directions, summed over the batch."""
    temperature: float = 0.07
    """infonce: the initial temperature (scale s = 1 / temperature, learnt as log s, clamped at max_scale)."""
    max_scale: float = 100.0
    """infonce: the largest scale s may reach (CLIP's clamp)."""
    learn_temperature: bool = True
    """infonce: train the scale with the towers (False: keep 1 / temperature)."""
    margin: float = 0.2
    """triplet: the hinge margin α (VSE∞: 0.2)."""
    residual: bool = False
    """Add each trained tower's output to its backbone's own mean-pooled last layer, through a gate that starts at
    0: training starts from the frozen embedding (needs embed_dim = that layer's width). For backbones whose pooled
    output already embeds well (sentence-embedding models); not for unrelated spaces (image vs text)."""
    query_method: str = ""
    """The query tower's method; "" = the run's method."""
    document_method: str = ""
    """The document tower's method; "" = the run's method."""
    query_model: dict[str, Any] = field(default_factory=dict)
    """Model options for the query tower, over the run's ``model`` (e.g. {layers = [-3, -2, -1]})."""
    document_model: dict[str, Any] = field(default_factory=dict)
    """Model options for the document tower, over the run's ``model``."""

    def __post_init__(self) -> None:
        if self.embed_dim < 1:
            raise ValueError(f"task.embed_dim must be >= 1, got {self.embed_dim}")
        if self.loss not in LOSSES:
            raise ValueError(f"task.loss must be one of {LOSSES}, got {self.loss!r}")
        if not (self.temperature > 0 and 1 / self.temperature <= self.max_scale):
            raise ValueError(f"task.temperature must be > 0 with 1 / temperature <= max_scale ({self.max_scale}), "
                             f"got {self.temperature}")
        if self.margin < 0:
            raise ValueError(f"task.margin must be >= 0, got {self.margin}")

    def method(self, tower: str, run_method: str) -> str:
        return getattr(self, f"{tower}_method") or run_method

    def model(self, tower: str, run_model: dict[str, Any]) -> dict[str, Any]:
        return {**run_model, **getattr(self, f"{tower}_model")}
