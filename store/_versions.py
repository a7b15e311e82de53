"""Source versions: which pieces of which source a store was extracted from, one record per version.

``_sources/v<NNNNNN>.json`` (beside the Zarr hierarchy, like ``_claims/``): version 1 is written when a
store planned piece by piece is first extracted, and every run on a source that has grown since adds the
next version (its pieces start with all of the previous version's, unchanged). A record::

    {"version": 2, "fingerprint": ..., "created": ..., "block_rows": 65536, "rows": ..., "stats": {...},
     "plan": {split: {"examples", "parts"}}, "pieces": [[shard, start, rows, sha256, {split: [first part,
     parts, examples, first example]}], ...], "record_sha256": ...}

Each version is created exclusively (two runs of the same grown source write the same record; two runs
that grew it differently cannot both land one), and never rewritten. The store's plan is the latest
version's: readers tell a finished split by it, and a reader keeps the version it first saw.
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from . import _format as fmt
from ._claims import create_exclusive

SOURCES_PREFIX = "_sources"


class VersionConflict(RuntimeError):
    """Another run recorded a different source version under the same number."""


def _key(root: str, version: int) -> str:
    key = f"{SOURCES_PREFIX}/v{version:06d}.json"
    return f"{root}/{key}" if root else key


def latest_version(zarr_store, root: str) -> dict[str, Any] | None:
    """The newest source version record (checked against its sha256), or None for a store without any."""
    root = root.strip("/")
    prefix = f"{root}/{SOURCES_PREFIX}/" if root else f"{SOURCES_PREFIX}/"

    async def names() -> list[str]:
        return [name async for name in zarr_store.list_dir(prefix.rstrip("/"))]

    try:
        listed = sync(names())
    except FileNotFoundError:
        return None
    numbers = sorted(int(name[1:7]) for name in listed if len(name) == 12 and name.startswith("v")
                     and name.endswith(".json") and name[1:7].isdigit())
    if not numbers:
        return None
    buffer = sync(zarr_store.get(_key(root, numbers[-1]), default_buffer_prototype()))
    if buffer is None:
        return None
    record = json.loads(buffer.to_bytes())
    digest = record.pop(fmt.RECORD_DIGEST, None)
    if digest != fmt.record_digest(record):
        raise ValueError(f"source version record v{numbers[-1]:06d} fails its sha256 (it was edited or damaged)")
    return record


def record_version(zarr_store, root: str, *, version: int, fingerprint: str, block_rows: int, rows: int,
                   plan: dict[str, Any], pieces: list, stats: dict[str, Any]) -> dict[str, Any]:
    """Write source version ``version`` exclusively; an identical record already there (a run of the same
    source started together with this one) is fine, a different one raises :class:`VersionConflict`."""
    record = {"version": version, "fingerprint": fingerprint, "block_rows": block_rows, "rows": rows,
              "plan": plan, "pieces": pieces, "stats": stats,
              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    document = {**record, fmt.RECORD_DIGEST: fmt.record_digest(record)}
    key = _key(root.strip("/"), version)
    if not create_exclusive(zarr_store, key, json.dumps(document).encode()):
        existing = latest_version(zarr_store, root)
        if existing is None or existing["version"] != version or existing["fingerprint"] != fingerprint:
            raise VersionConflict(f"another run recorded a different source version {version} in this store while "
                                  "this one planned it (the source changed between the two runs); re-run extraction")
        return existing
    return record
