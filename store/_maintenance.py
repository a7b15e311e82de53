"""Store maintenance: describe a store, verify every object against its commit record, remove a part."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from . import _format as fmt
from ._store import FeatureStore, StoreError, _child_names, _join


@dataclass
class Problem:
    where: str  # split/part/object key
    kind: str  # missing | corrupt | unrecorded | unverifiable
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind:10s} {self.where}{': ' + self.detail if self.detail else ''}"


@dataclass
class VerifyReport:
    url: str
    parts: int = 0
    objects: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _store_and_prefix(store: FeatureStore, *parts: str):
    return store._root.store, _join(store._root.path, *parts)


async def _list(zstore, prefix: str) -> list[str]:
    return sorted([key async for key in zstore.list_prefix(prefix + "/")])


def verify(store: FeatureStore) -> VerifyReport:
    """Re-hash every object of every committed part and compare with the sha256 its commit recorded.

    Names each missing object, each whose bytes changed, and each stored object no commit mentions.
    """
    report = VerifyReport(store.url)
    prototype = default_buffer_prototype()
    for split in store.splits():
        for info in store.parts(split):
            report.parts += 1
            zstore, prefix = _store_and_prefix(store, split, info.name)
            recorded = store._root[split][info.name].attrs[fmt.COMMIT_ATTR].get("sha256")
            if recorded is None:
                report.problems.append(Problem(f"{split}/{info.name}", "unverifiable",
                                               "committed without checksums (an older unipt); re-extract it"))
                continue
            present = {key[len(prefix) + 1:] for key in sync(_list(zstore, prefix))}
            for key, digest in recorded.items():
                where = f"{split}/{info.name}/{key}"
                if key not in present:
                    report.problems.append(Problem(where, "missing"))
                    continue
                buffer = sync(zstore.get(f"{prefix}/{key}", prototype))
                data = b"" if buffer is None else buffer.to_bytes()
                report.objects += 1
                report.bytes += len(data)
                actual = hashlib.sha256(data).hexdigest()
                if actual != digest:
                    report.problems.append(Problem(where, "corrupt", f"sha256 {actual[:12]}…, recorded {digest[:12]}…"))
            for key in sorted(present - set(recorded) - {"zarr.json"}):
                report.problems.append(Problem(f"{split}/{info.name}/{key}", "unrecorded", "not in the commit record"))
    return report


def remove_part(store: FeatureStore, split: str, name: str) -> int:
    """Delete every object of one part (committed or not), so the next extraction redoes it."""
    if store.read_only:
        raise StoreError(f"{store.url} is open read-only; open it with mode='r+' to remove a part")
    if split not in store.splits():
        raise StoreError(f"{store.url} has no split {split!r}; splits: {store.splits()}")
    names = _child_names(store._root[split])
    if name not in names:
        raise StoreError(f"{store.url} has no part {split}/{name}; parts: {names}")
    zstore, prefix = _store_and_prefix(store, split, name)
    keys = sync(_list(zstore, prefix))
    sync(zstore.delete_dir(prefix))
    return len(keys)


def describe(store: FeatureStore) -> dict[str, Any]:
    """Splits, parts, examples, tokens, bytes on disk and bytes per stored value, and the provenance."""
    splits = {}
    value_bytes = values = 0
    row_values = sum(math.prod(shape) for shape in store.row_shapes.values())
    for split in store.splits():
        parts = store.parts(split)
        tokens = sum(p.n_tokens for p in parts)
        nbytes = 0
        for info in parts:
            zstore, prefix = _store_and_prefix(store, split, info.name)
            for key in sync(_list(zstore, prefix)):
                size = sync(zstore.getsize(key))
                nbytes += size
                relative = key[len(prefix) + 1:]
                if relative.startswith("layer_") and "/c/" in relative:  # stored values (and int8 scales)
                    value_bytes += size
        values += tokens * row_values
        splits[split] = {"parts": len(parts), "examples": sum(p.n_examples for p in parts), "tokens": tokens,
                         "truncated": sum(p.truncated for p in parts), "bytes": nbytes}
    skipped: dict[str, int] = {}
    for record in store.skipped():
        skipped[record["reason"]] = skipped.get(record["reason"], 0) + 1
    return {
        "url": store.url,
        "format_version": store.meta["format_version"],
        "dtype": store.dtype,
        "compression": store.meta["compression"],
        "layers": store.layers,
        "layer_widths": store.meta["layer_widths"],
        "layout": store.layout,
        "layer_shapes": store.meta.get("layer_shapes"),  # maps stores: (H, W, C) per layer
        "label_names": store.label_names,
        "splits": splits,
        "bytes": sum(s["bytes"] for s in splits.values()),
        "bytes_per_value": value_bytes / values if values else None,
        "skipped": skipped,  # bad source rows left out, by reason (`FeatureStore.skipped()` lists them)
        "in_progress": [{"split": split, "part": part, "run": doc.get("owner", {}).get("run"),
                         "host": doc.get("owner", {}).get("host"), "pid": doc.get("owner", {}).get("pid"),
                         "heartbeat": doc.get("heartbeat")} for split, part, doc in store.active_claims()],
        "provenance": store.provenance,
    }
