"""Configuration of SHERL (its side network, and where the backbone's frozen last block comes from)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence


@dataclass
class SHERLConfig:
    reduction: int = 2
    """r: side width m = D // r, D = the backbone's width (the official code's downsample_factor, default 2)."""
    layers: str | Sequence[int] = "all"
    """Hidden states that feed the side network: "all" = every stored layer up to H_{L-1} (the input of the
    backbone's last block; H_L and a final-norm tap are left out), or indices (negative counts from the last
    stored). The last selected layer must be H_{L-1}: it is d, and the frozen block's skip input."""
    backbone: str | None = None
    """Local transformers folder holding the backbone (config.json + model.safetensors) whose last block runs
    frozen. None: the folder the store's provenance records (a recipe fills in its [backbone] folder)."""
    weights_sha256: str | None = None
    """sha256 of that folder's weights (+ config.json); filled from the store when training and saved with the
    checkpoint, so a reload refuses any other folder. Set by hand only to pin a folder."""
    gate_temperature: float = 0.1
    """T in the skip gate tanh(theta / T) on H_{L-1} (theta init 0: the gate starts closed); the paper uses 0.1."""
    dropout: float = 0.1
    """Dropout after the up-projection's LayerNorm (as the official code) and before the task head."""
    block_dropout: bool = False
    """Run the frozen last block in training mode while training (its own dropout on, as the official code's
    backbone is). Off: the block is always in eval mode, as the cached layers before it were extracted."""
    final_norm: bool = True
    """DINOv2: apply its frozen final LayerNorm after the last block (the output is then its last_hidden_state,
    the tap a DINOv2 store holds after the last block). BERT and MPNet have none."""

    def __post_init__(self) -> None:
        if not isinstance(self.reduction, int) or isinstance(self.reduction, bool) or self.reduction < 1:
            raise ValueError(f"reduction must be an integer >= 1, got {self.reduction!r}")
        if isinstance(self.layers, str):
            if self.layers != "all":
                raise ValueError(f"layers must be 'all' or a list of layer indices, got {self.layers!r}")
        else:
            self.layers = [int(layer) for layer in self.layers]
            if len(self.layers) < 2:
                raise ValueError(f"SHERL needs at least 2 layers (shallow ones and H_{{L-1}}), got {self.layers}")
        if self.backbone is not None and (not isinstance(self.backbone, str) or not self.backbone):
            raise ValueError(f"backbone must be a local model folder or None (the store's), got {self.backbone!r}")
        if self.weights_sha256 is not None and not (isinstance(self.weights_sha256, str)
                                                    and re.fullmatch(r"[0-9a-f]{64}", self.weights_sha256)):
            raise ValueError(f"weights_sha256 must be 64 lowercase hex digits or None, got {self.weights_sha256!r}")
        if not self.gate_temperature > 0:
            raise ValueError(f"gate_temperature must be positive, got {self.gate_temperature!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("block_dropout", "final_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
