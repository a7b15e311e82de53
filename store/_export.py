"""Export a feature store's committed parts as webdataset tar shards, for tools that read webdataset.

One shard series per split, ``<out_dir>/<split>-000000.tar`` ..., one sample per example::

    <key>.json                  {"example_id", "label", "label_name", "length", "split", "part"}; stores of
                                other tasks: "target" (a multi-hot row, the regression values, the tags
                                of the example's tokens) in place of "label" and "label_name"
    <key>.layer_000.npy         (length, D_0) token rows in the stored dtype (a maps store: the (H, W, C) map)
    <key>.layer_000_scale.npy   (length,) float32 per-token scales (int8 stores only)
    ...

``<key>`` is the example id with "%" and "." written as %25 and %2E (webdataset cuts a member name at the
first dot of its file name, and image ids are file paths); the json member holds the id itself.

bfloat16 stores are exported as their stored uint16 bit patterns (npy has no bfloat16):
``torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)`` reads them back. ``manifest.json``, written
last, records the store's provenance, the layers, dtype and the per-split counts and shard names.
Only committed parts are exported; each example is written exactly as :meth:`FeatureStore.read_part`
decodes it (no cast, no dequantisation).

A store with stochastic views (``extract.views`` > 1) exports view 0 only: the eval-mode cache, the one
view every split has and the one a K = 1 store holds, so an export means the same whatever the store's
views; the manifest says so (``"view": 0`` and the views the store holds per split). The other views stay
in the store: they exist to be rotated by unipt's loader across epochs, not to be consumed as one dataset.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import _format as fmt
from ._dtypes import SCALE_SUFFIX
from ._store import FeatureStore, PartData, StoreError

EXPORT_FORMAT = "unipt-webdataset"
EXPORT_VERSION = 1
MANIFEST = "manifest.json"
_NPY_DTYPES = {"bfloat16": "uint16 (bfloat16 bit patterns)"}  # what a layer's .npy holds, where not the dtype


def export_webdataset(
    store: FeatureStore,
    out_dir: str,
    *,
    splits: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    maxcount: int = 10_000,
    maxsize: float = 1e9,
) -> list[str]:
    """Write ``store``'s committed parts as webdataset tar shards into ``out_dir`` (a local folder that
    must be new or empty); return the shard paths, split by split in shard order.

    ``splits`` and ``layers`` default to all the store holds. A shard closes after ``maxcount`` examples
    or once it holds ``maxsize`` bytes (webdataset's ShardWriter limits).
    """
    wds = _webdataset()
    splits = _select_splits(store, splits)
    layers = _select_layers(store, layers)
    if maxcount < 1 or maxsize <= 0:
        raise ValueError(f"maxcount must be >= 1 and maxsize > 0, got {maxcount}, {maxsize}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty folder; export into a new folder (stale "
                              "shards of an earlier export would be read as part of this one)")
    out.mkdir(parents=True, exist_ok=True)
    created = store.meta.get("created")
    mtime = _dt.datetime.fromisoformat(created).timestamp() if created else None  # reproducible tar headers
    label_names = store.label_names

    shards: list[str] = []
    counts: dict[str, dict[str, Any]] = {}
    for split in splits:
        parts = store.parts(split)
        counts[split] = {"examples": 0, "tokens": 0, "parts": len(parts), "shards": []}
        if not parts:
            continue
        written: list[str] = []
        pattern = str(out / f"{split.replace('%', '%%')}-%06d.tar")
        seen: set[str] = set()
        with wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0, encoder=False,
                             mtime=mtime, post=written.append) as sink:
            for info in parts:
                data = store.read_part(info, layers)
                for i in range(info.n_examples):
                    sink.write(_sample(data, i, layers, label_names, seen, maps=store.layout == fmt.MAPS))
                counts[split]["examples"] += info.n_examples
                counts[split]["tokens"] += info.n_tokens
        shards.extend(written)
        counts[split]["shards"] = [os.path.basename(p) for p in written]

    manifest = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "exported": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "store": {"url": store.url, "format_version": store.meta["format_version"],
                  "created": store.meta["created"], "provenance": store.provenance},
        "dtype": store.dtype,
        "npy_dtype": _NPY_DTYPES.get(store.dtype, store.dtype),
        "layers": layers,
        "layer_widths": {str(layer): store.layer_widths[layer] for layer in layers},
        "layout": store.layout,  # "maps": each member is one (H, W, C) map, channels last
        **({"layer_shapes": {str(layer): list(store.row_shapes[layer]) for layer in layers}}
           if store.layout == fmt.MAPS else {}),
        "members": ["json"] + [f"{fmt.layer_key(layer)}{suffix}.npy" for layer in layers
                               for suffix in ("", SCALE_SUFFIX) if suffix == "" or store.dtype == "int8"],
        "task": store.task,
        "label_names": label_names,
        "splits": counts,
        # Which stochastic view the layer members hold: always view 0, the eval-mode cache (see the docstring).
        **({"view": 0, "store_views": {split: store.views(split) for split in splits}} if store.view_splits else {}),
    }
    # Written last, like a part's commit marker: a folder without it is an unfinished export.
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return shards


def _sample(data: PartData, i: int, layers: list[int], label_names: list[str], seen: set[str], *,
            maps: bool = False) -> dict[str, Any]:
    """One example of a decoded part as a webdataset sample of encoded bytes: its (tokens, D) rows per layer,
    or for a maps store its (H, W, C) map."""
    example_id = str(data.example_id[i])
    key = webdataset_key(example_id)
    if not example_id or example_id.startswith("__"):
        raise ValueError(f"example id {example_id!r} of {data.info.split}/{data.info.name} cannot be a webdataset "
                         "key (it must be non-empty and not start with '__')")
    if key in seen:
        raise ValueError(f"example id {example_id!r} occurs twice in split {data.info.split!r}; webdataset keys "
                         "must be unique")
    seen.add(key)
    start, stop = int(data.offsets[i]), int(data.offsets[i + 1])
    if data.token_targets or data.label.ndim > 1:  # tags per token, a multi-hot row, regression targets
        target = {"target": (data.label[start:stop] if data.token_targets else data.label[i]).tolist()}
    else:
        label = int(data.label[i])
        target = {"label": label, "label_name": label_names[label] if 0 <= label < len(label_names) else None}
    sample: dict[str, Any] = {
        "__key__": key,
        "json": json.dumps({
            "example_id": example_id,
            **target,
            "length": int(data.length[i]),
            "split": data.info.split,
            "part": data.info.name,
        }).encode("utf-8"),
    }
    scales = getattr(data, "scales", None) or {}
    for layer in layers:
        key = fmt.layer_key(layer)
        rows = slice(start, stop) if not maps else start  # a map is the example's one row, without that axis
        sample[f"{key}.npy"] = _npy(data.layers[layer][rows])
        if layer in scales:
            sample[f"{key}{SCALE_SUFFIX}.npy"] = _npy(scales[layer][rows])
    return sample


def webdataset_key(example_id: str) -> str:
    """The sample key of an example id: "%" and "." escaped (%25, %2E), so no dot reaches the member name."""
    return example_id.replace("%", "%25").replace(".", "%2E")


def _npy(rows: torch.Tensor) -> bytes:
    """Tensor rows in their stored dtype as .npy bytes (bfloat16 as its uint16 bit patterns)."""
    if rows.dtype == torch.bfloat16:
        values = rows.view(torch.int16).numpy().view(np.uint16)
    else:
        values = rows.numpy()
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(values), allow_pickle=False)
    return buffer.getvalue()


def _select_splits(store: FeatureStore, splits: Sequence[str] | None) -> list[str]:
    available = store.splits()
    if splits is None:
        return available
    unknown = [s for s in splits if s not in available]
    if unknown:
        raise StoreError(f"splits {unknown} are not in {store.url}; it has splits {available}")
    return list(dict.fromkeys(splits))


def _select_layers(store: FeatureStore, layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        return store.layers
    layers = [int(layer) for layer in layers]
    missing = sorted(set(layers) - set(store.layers))
    if missing:
        raise StoreError(f"layers {missing} are not in {store.url}; it stores layers {store.layers}")
    return list(dict.fromkeys(layers))


def _webdataset():
    try:
        import webdataset
    except ImportError as exc:
        raise ImportError("exporting webdataset shards needs the `webdataset` package: pip install webdataset") from exc
    return webdataset
