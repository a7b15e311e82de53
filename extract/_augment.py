"""Stochastic views: where their randomness comes from, and the image augmentation of views >= 1.

Every random draw of a view is seeded from what identifies it, never from a running random state, so a view
is the same whichever run, worker or resume computes it:

* the **image augmentation** of example ``id`` in view ``v`` draws from ``numpy.random.default_rng(seed)``
  with ``seed = sha256("augment", v, id)``: per example, whatever batch or thread prepares it;
* the **dropout masks** of view ``v`` of one forward pass are drawn inside a batched forward, so they cannot
  be drawn per example cheaply; the batch's forward is seeded with ``sha256("dropout", v, the batch's example
  ids in order)`` instead. That is deterministic because a part's batches are: parts are planned from a hash
  of the ids (``plan_parts``), sorted by length inside a part with a stable sort, cut into ``batch_size``
  batches, and a resumed or distributed run redoes whole parts with the same batch size (the extraction
  config, which the store's provenance pins).

The augmentation is torchvision's training recipe for ImageNet-style models, written with numpy and PIL
(torchvision does not work with the CPU torch here): ``RandomResizedCrop`` (area fraction ~ U(scale), aspect
ratio ~ logU(ratio), ten tries, then a centre crop clamped to the ratio) and ``RandomHorizontalFlip(p)``. The
crop is handed to the backbone's own image processor, whose resize plays RandomResizedCrop's: every view
keeps the image size (and so the token count) of view 0.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image


def _seed(*parts: Any) -> int:
    """A 63-bit seed from the sha256 of ``parts`` (joined by NUL bytes: no two part lists give the same text)."""
    digest = hashlib.sha256("\0".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def augment_seed(example_id: str, view: int) -> int:
    """The seed of example ``example_id``'s augmentation in ``view``."""
    return _seed("unipt-augment", view, example_id)


def dropout_seed(view: int, example_ids: Sequence[str]) -> int:
    """The seed of view ``view``'s forward pass over a batch of these examples, in this order."""
    return _seed("unipt-dropout", view, *example_ids)


@dataclass(frozen=True)
class Augmentation:
    """Random resized crop + horizontal flip of a PIL image, seeded per (example id, view)."""

    scale: tuple[float, float] = (0.08, 1.0)  # the crop's area as a fraction of the image's
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # the crop's width / height, drawn log-uniformly
    flip: float = 0.5  # probability of a horizontal flip

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(float(x) for x in self.scale))
        object.__setattr__(self, "ratio", tuple(float(x) for x in self.ratio))
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"augmentation scale must be (low, high) in (0, 1], got {self.scale}")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"augmentation ratio must be (low, high) > 0, got {self.ratio}")
        if not 0 <= self.flip <= 1:
            raise ValueError(f"augmentation flip is a probability in [0, 1], got {self.flip}")

    def params(self, width: int, height: int, example_id: str, view: int) -> tuple[tuple[int, int, int, int], bool]:
        """The crop box (left, top, width, height) and whether to flip, for this example and view."""
        rng = np.random.default_rng(augment_seed(example_id, view))
        return self.crop_box(width, height, rng), bool(rng.random() < self.flip)

    def crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop.get_params, drawing from ``rng``: (left, top, width, height)."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return left, top, w, h
        # Fallback (no draw fitted): the largest centre crop whose aspect ratio lies in the range.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, image: Image.Image, example_id: str, view: int) -> Image.Image:
        """``image`` cropped (and maybe flipped) as view ``view`` of ``example_id`` sees it; the image processor
        resizes the crop to the model's input size afterwards."""
        (left, top, w, h), flip = self.params(image.width, image.height, example_id, view)
        out = image.crop((left, top, left + w, top + h))
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out

    def describe(self) -> dict[str, Any]:
        """The settings as recorded in a store's provenance."""
        return {"random_resized_crop": {"scale": list(self.scale), "ratio": list(self.ratio)},
                "horizontal_flip": self.flip, "seed": "sha256(augment, view, example id)"}
