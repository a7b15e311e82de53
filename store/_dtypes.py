"""Storage dtypes: how float activations become stored arrays, and back.

| mode     | stored as                         | bytes/value before compression | error          |
|----------|-----------------------------------|--------------------------------|----------------|
| float32  | float32                           | 4                              | none           |
| float16  | float16 (range checked)           | 2                              | ~5e-4 relative |
| bfloat16 | uint16 bit patterns of bfloat16   | 2                              | ~4e-3 relative |
| int8     | int8 + per-token absmax scale     | 1 (+4 per token)               | ~1 % relative  |

bfloat16 is stored as uint16 because Zarr v3 has no bfloat16 type; the store's ``dtype`` attribute says how
to read the bits. int8 keeps one float32 scale per token row (``<layer>_scale``): ``x ≈ q * scale`` with
``scale = max|x_row| / 127``. Dequantisation happens in torch at batch time (float32 or on the device),
never as a numpy float16 pass.
"""

from __future__ import annotations

import math

import numpy as np
import torch

FLOAT16_MAX = 65504.0
SCALE_SUFFIX = "_scale"

# mode -> numpy dtype of the stored values
STORED_NUMPY = {"float32": np.dtype("float32"), "float16": np.dtype("float16"),
                "bfloat16": np.dtype("uint16"), "int8": np.dtype("int8")}
STORAGE_DTYPES = tuple(STORED_NUMPY)


class ValueRangeError(OverflowError):
    """Activations the chosen storage dtype cannot hold (beyond float16's range, inf or NaN)."""


def bytes_per_row(mode: str, row_shape: tuple[int, ...]) -> int:
    """Decoded bytes one stored row (a token (D,), or a whole (H, W, C) map) occupies in memory in the stored
    form: its values, plus int8's float32 scale per token / map position."""
    values = math.prod(row_shape)
    return values * STORED_NUMPY[mode].itemsize + (4 * values // row_shape[-1] if mode == "int8" else 0)


def encode(block: torch.Tensor, mode: str, where: str) -> dict[str, np.ndarray]:
    """Float rows (t, D) -> the arrays to store: ``{"": values}`` plus ``{"_scale": (t,)}`` for int8.

    Refuses non-finite values in every mode, and values beyond float16's range in float16 mode, naming
    ``where`` and the fix (one fused min/max pass; NaN fails both comparisons).
    """
    if block.numel():
        low, high = torch.aminmax(block)
        low, high = float(low), float(high)
        if not (-float("inf") < low and high < float("inf")):
            raise ValueRangeError(f"{where} holds non-finite activations (min {low}, max {high}); the backbone "
                                  "produced inf/NaN, so nothing can be stored faithfully")
        if mode == "float16" and not (-FLOAT16_MAX <= low and high <= FLOAT16_MAX):
            raise ValueRangeError(f"{where} has |value| = {max(-low, high):g}, beyond float16's range "
                                  f"({FLOAT16_MAX:g}); the part was not committed. Re-extract with "
                                  "dtype=bfloat16 (same size, float32's range) or dtype=float32.")
    values, scale = quantize(block, mode)
    if mode == "bfloat16":  # Zarr v3 has no bfloat16: store the bits
        return {"": values.view(torch.int16).numpy().view(np.uint16)}
    stored = {"": values.contiguous().numpy()}
    if scale is not None:
        stored[SCALE_SUFFIX] = scale.numpy()
    return stored


def quantize(x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float activations (..., D) -> (the values as stored, in torch; the per-row scale for int8, else None).

    The one definition of each storage dtype's rounding, used to write stores and, through :func:`round_trip`,
    to feed a side network at inference exactly what it saw from a store; any shape, any device.
    """
    if mode == "float32":
        return x.to(torch.float32), None
    if mode == "float16":
        return x.to(torch.float16), None
    if mode == "bfloat16":
        return x.to(torch.bfloat16), None
    if mode == "int8":  # per-row absmax: x ≈ q * scale, scale = max|x_row| / 127
        x = x.to(torch.float32)
        scale = x.abs().amax(dim=-1) / 127.0
        q = torch.round(x / scale.clamp_min(torch.finfo(torch.float32).tiny)[..., None]).clamp_(-127, 127)
        return q.to(torch.int8), scale
    raise ValueError(f"unknown storage dtype {mode!r}; choose one of {STORAGE_DTYPES}")


def round_trip(x: torch.Tensor, mode: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x`` as writing it to a ``mode`` store and reading it back gives it (as float ``dtype``)."""
    values, scale = quantize(x, mode)
    return dequantize(values, scale, dtype)


def as_tensor(values: np.ndarray, mode: str) -> torch.Tensor:
    """Stored values -> a torch tensor without copying (bfloat16 bits are re-viewed as bfloat16)."""
    if mode == "bfloat16":
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values)


def dequantize(rows: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stored rows (any mode) -> float ``dtype``; int8 rows are multiplied by their per-token scale."""
    out = rows.to(dtype)
    if scale is not None:
        out.mul_(scale.to(dtype)[..., None])
    return out
