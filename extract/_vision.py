"""The frozen vision encoder: a transformers image model, its own image processor, every hidden state out.

Two kinds of backbone, told apart by what their hidden states are (one dry run on a blank image at load):

* **tokens** — a vision transformer (ViT, DeiT, DINOv2, CLIP's vision tower): hidden states (B, N, D) with the
  same N for every image (CLS + patches). They are stored like text tokens, every token real, so the
  transformer UniPT variant and every token method apply unchanged.
* **maps** — a CNN (MobileNetV2, ResNet, ConvNeXt, ...): hidden states (B, C, H, W). Stored as one fixed-shape
  (H, W, C) map per example, read back as (B, C, H, W) for the CNN UniPT variant and the linear probe.

The candidate layers are the model's ``hidden_states`` (0 = its first) plus, when it differs from the last of
them, its ``last_hidden_state`` as one more index (DINOv2's final LayerNorm; MobileNetV2's 1280-channel
1x1 conv). ``extract.layers = "stages"`` picks, for a CNN, the last map of each resolution plus that final
output: the stage maps a CNN side network reads; for a ViT it is every layer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ._augment import Augmentation
from ._backbone import (PreparedPart, autocast_context, backbone_hashes, pick_device, resolve_model_dir,
                        stochastic_forward)
from ._image_sources import ImageExample, ImagePreprocessor
from .config import BackboneConfig

TOKENS, MAPS = "tokens", "maps"  # the store layouts (unipt.store._format)


class VisionEncoder:
    """A frozen transformers vision model behind its own image processor (decoding in worker threads)."""

    def __init__(self, config: BackboneConfig, *, bad_input: str = "error", max_grid: int | None = None,
                 workers: int = 2, augment: dict | None = None):
        """``augment``: the Augmentation settings (scale, ratio, flip) of stochastic views >= 1; None = the
        defaults (used only when a part is prepared with views > 1)."""
        self.config = config
        self.augmentation = Augmentation(**(augment or {}))
        self.folder = resolve_model_dir(config.model, config.revision)
        from transformers import AutoImageProcessor, AutoModel

        overrides: dict[str, Any] = {}
        if config.image_size:
            s = config.image_size
            square = {"height": s, "width": s}
            base = AutoImageProcessor.from_pretrained(self.folder)
            # Processors that resize the shortest edge (then centre-crop) keep that style, so non-square
            # images are cropped, not squashed; the others resize to the square.
            overrides["size"] = {"shortest_edge": s} if getattr(base.size, "shortest_edge", None) else square
            for key in ("crop_size", "pad_size"):  # a centre crop or pad to the old size would undo the resize
                if getattr(base, key, None) is not None:
                    overrides[key] = square
        self.processor = AutoImageProcessor.from_pretrained(self.folder, **overrides)
        self.preprocessor = ImagePreprocessor(self.processor, workers=workers, bad_input=bad_input,
                                              augment=self.augmentation)
        model = AutoModel.from_pretrained(self.folder)
        model = getattr(model, "vision_model", model)  # CLIP-style dual encoders: the vision tower
        self.device = pick_device(config.device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        if max_grid is not None and max_grid < 1:
            raise ValueError(f"extract.max_grid must be >= 1 or unset, got {max_grid}")
        self.max_grid = max_grid
        self._probe()

    # ------------------------------------------------------------------ what the model puts out
    def _probe(self) -> None:
        """One blank image through processor and model: the layout, and each candidate layer's shape."""
        blank = self.processor([Image.new("RGB", (32, 32))], return_tensors="pt")["pixel_values"]
        self.image_shape = tuple(blank.shape[1:])
        with torch.no_grad():
            out = self.model(pixel_values=blank.to(self.device), output_hidden_states=True, return_dict=True)
        states = list(out.hidden_states)
        last = out.last_hidden_state
        self._with_last = last.shape != states[-1].shape or not torch.equal(last, states[-1])
        candidates = states + ([last] if self._with_last else [])
        ranks = {t.dim() for t in candidates}
        if ranks == {3}:
            self.layout = TOKENS
        elif ranks == {4}:
            self.layout = MAPS
        else:
            raise ValueError(f"{self.config.model}: hidden states of ranks {sorted(ranks)}; a vision backbone must "
                             "give (B, N, D) tokens or (B, C, H, W) maps throughout")
        candidates = [self._pooled(t) for t in candidates] if self.layout == MAPS else candidates
        self.num_hidden_states = len(candidates)
        if self.layout == TOKENS:
            self.num_tokens = candidates[0].shape[1]
            self.widths = [int(t.shape[-1]) for t in candidates]
            self.row_shapes = [(w,) for w in self.widths]
            self.stages = list(range(len(candidates)))
        else:
            self.num_tokens = 1
            self.widths = [int(t.shape[1]) for t in candidates]
            self.row_shapes = [(int(t.shape[2]), int(t.shape[3]), int(t.shape[1])) for t in candidates]
            self.stages = _last_of_each_grid([tuple(t.shape[2:]) for t in states], self._with_last)
        self.max_length = self.num_tokens

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        """A map larger than ``max_grid`` along H or W, average-pooled by the smallest whole factor that fits."""
        if self.max_grid is None:
            return x
        factors = [_pool_factor(n, self.max_grid) for n in x.shape[-2:]]
        if factors == [1, 1]:
            return x
        return F.avg_pool2d(x, kernel_size=factors, stride=factors)

    # ------------------------------------------------------------------ preparing and running
    def prepare(self, examples: Sequence[ImageExample], batch_size: int = 64, views: int = 1) -> PreparedPart:
        """Decode and process ``examples`` on the preprocessor's threads; broken images follow bad_input.
        ``views`` > 1: views 1 .. views-1 are processed from augmented images (``PreparedPart.view_features``)."""
        t0 = time.perf_counter()
        kept, skipped = [], []
        features: list[list] = [[] for _ in range(views)]  # per view, one pixel tensor per kept example
        batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
        for prepared in self.preprocessor.map(batches, views=views):
            kept += prepared.examples
            skipped += prepared.skipped
            if prepared.examples:
                for view, inputs in enumerate([prepared.inputs, *prepared.view_inputs]):
                    pixels = inputs["pixel_values"]
                    if tuple(pixels.shape[1:]) != self.image_shape:
                        raise ValueError(f"the image processor gave {tuple(pixels.shape[1:])} pixel arrays, expected "
                                         f"{self.image_shape}: stored layers need one size for every image; set "
                                         "backbone.image_size to resize every image to one square size")
                    features[view] += list(pixels)
        lengths = np.full(len(kept), self.num_tokens, dtype=np.int64)
        return PreparedPart(kept, features[0], lengths, [], skipped, time.perf_counter() - t0,
                            view_features=features[1:])

    @torch.no_grad()
    def hidden_states(self, features: Sequence[torch.Tensor], dropout_seed: int | None = None,
                      ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Candidate layers of a batch of pixel tensors, and the mask: tokens (B, N, D) each with an all-True
        (B, N) mask; maps (B, C, H, W) each (pooled to max_grid) with an all-True (B, 1) mask.
        ``dropout_seed``: train-mode dropout (BatchNorm frozen) seeded so, for a stochastic view; None = eval."""
        pixels = torch.stack(list(features)).to(self.device, non_blocking=True)
        with autocast_context(self.device, self.config.autocast), \
                stochastic_forward(self.model, self.device, dropout_seed):
            out = self.model(pixel_values=pixels, output_hidden_states=True, return_dict=True)
        states = list(out.hidden_states) + ([out.last_hidden_state] if self._with_last else [])
        if self.layout == MAPS:
            states = [self._pooled(s) for s in states]
        mask = torch.ones(len(pixels), self.num_tokens, dtype=torch.bool, device=self.device)
        return tuple(states), mask

    def provenance(self) -> dict[str, Any]:
        return {
            "location": (str(Path(self.config.model).resolve()) if Path(self.config.model).is_dir()
                         else self.config.model),
            "architecture": type(self.model).__name__,
            **backbone_hashes(self.folder),
            "modality": "image",
            "layout": self.layout,
            "image_size": list(self.image_shape[1:]),
            "processor_sha256": self.preprocessor.fingerprint,
            "num_hidden_states": self.num_hidden_states,
            "hidden_size": self.widths[-1],
            "max_grid": self.max_grid,
        }

    def close(self) -> None:
        self.preprocessor.close()


def _pool_factor(n: int, max_grid: int) -> int:
    """The smallest f dividing n with n / f <= max_grid (1 when n already fits)."""
    for f in range(1, n + 1):
        if n % f == 0 and n // f <= max_grid:
            return f
    return n


def _last_of_each_grid(grids: list[tuple[int, int]], with_last: bool) -> list[int]:
    """Indices of the last hidden state at each spatial resolution, plus the final output when there is one."""
    stages = [i for i, grid in enumerate(grids) if i + 1 == len(grids) or grids[i + 1] != grid]
    return stages + ([len(grids)] if with_last else [])
