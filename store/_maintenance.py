"""Store maintenance: describe a store, verify every object against its commit record, remove a part."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from . import _format as fmt
from ._claims import claim_stale_reason, claim_state
from ._index import read_index, remove_from_index
from ._store import CorruptChunkError, FeatureStore, StoreError, _child_names, _join, _view_of


@dataclass
class Problem:
    where: str  # split/part/object key
    kind: str  # missing | corrupt | unrecorded | unverifiable | damaged | unreadable | uncommitted | incomplete | index
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
    # Not damage: committed parts the split's index does not list yet (a run killed between a commit and its
    # index entry). Readers list such a split instead of trusting its index; the next extraction run of the
    # store, or `unipt store index`, adds them.
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _store_and_prefix(store: FeatureStore, *parts: str):
    return store._root.store, _join(store._root.path, *parts)


async def _list(zstore, prefix: str) -> list[str]:
    return sorted([key async for key in zstore.list_prefix(prefix + "/")])


def verify(store: FeatureStore) -> VerifyReport:
    """Check everything training would read: re-hash every object of every committed part against the
    sha256 its commit recorded, and check each part folder and split against the store's records.

    Names each missing object, each whose bytes changed, each stored object no commit mentions, each
    commit record that fails its own checksum, each part folder that is unreadable or not committed (with
    who claims it), each split with fewer committed parts than extraction planned, and each part of a split
    with stochastic views that does not hold every view of every layer (each view's objects are re-hashed
    like view 0's: the commit record lists them all). (The root metadata's checksum is checked when the
    store is opened.)
    """
    report = VerifyReport(store.url)
    prototype = default_buffer_prototype()
    plan = store.plan or {}
    claims = {(split, part): document for split, part, document in store.active_claims()}
    for split in _known_splits(store):
        folders = store.part_folders(split)
        committed = [f for f in folders if f.state == "committed"]
        planned = plan.get(split, {}).get("parts")
        if planned is not None and len(committed) < planned:
            names = {f.name for f in committed}
            absent = [fmt.part_key(i) for i in range(planned) if fmt.part_key(i) not in names]
            report.problems.append(Problem(split, "incomplete", f"{len(committed)} of {planned} planned parts "
                                           f"committed; not committed: {_shorten(absent)}"))
        for folder in folders:
            if folder.state == "committed":
                continue
            where = f"{split}/{folder.name}"
            if folder.state == "uncommitted":
                claim = claims.get((split, folder.name))
                who = (f"claimed, {claim_state(claim)}" if claim is not None
                       else "no claim: left by a run that stopped; the next extraction redoes it")
                report.problems.append(Problem(where, "uncommitted", who))
            else:  # damaged (a commit record failing its checksum) or unreadable (metadata cut short)
                report.problems.append(Problem(where, folder.state, folder.detail))
        report.problems += _index_problems(store, split, committed)
        report.notes += _index_gaps(store, split, committed)
        for folder in committed:
            info = folder.info
            report.parts += 1
            zstore, prefix = _store_and_prefix(store, split, info.name)
            recorded = store._root[split][info.name].attrs[fmt.COMMIT_ATTR].get("sha256")
            if recorded is None:
                report.problems.append(Problem(f"{split}/{info.name}", "unverifiable",
                                               "committed without checksums (an older unipt); re-extract it"))
                continue
            present = {key[len(prefix) + 1:] for key in sync(_list(zstore, prefix))}
            report.problems += _view_problems(store, info, recorded)
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
    try:
        store.skipped()  # the skip record's own checksum, and its arrays' chunks
    except CorruptChunkError as exc:
        report.problems.append(Problem(fmt.SKIPPED, "damaged", str(exc)))
    return report


def _index_problems(store: FeatureStore, split: str, committed: list) -> list[Problem]:
    """Where the split's index (if it has one) differs from its committed part folders."""
    fix = f"`unipt store index {store.url}` rebuilds it from the parts"
    try:
        state = read_index(store._root.store, store._root.path.strip("/"), split)
    except (ValueError, RuntimeError) as exc:
        return [Problem(f"{split} index", "index", f"cannot be read ({exc}); {fix}")]
    if state is None:
        return []
    problems = [Problem(f"{split}/{name}", "index", f"its index base and journal entries disagree on its commit "
                                                     f"record; {fix}") for name in state.conflicts]
    entries = state.entries()
    truth = {folder.name: folder.record_sha256 for folder in committed}
    for name, entry in entries.items():
        if name not in truth:
            problems.append(Problem(f"{split}/{name}", "index", f"the split's index lists it, but it is not a "
                                                                 f"committed part; {fix}"))
        elif entry.get("record_sha256") != truth[name]:
            problems.append(Problem(f"{split}/{name}", "index", f"the index records commit record_sha256 "
                                    f"{entry.get('record_sha256')}, the part has {truth[name]}; {fix}"))
    return problems


def _index_gaps(store: FeatureStore, split: str, committed: list) -> list[str]:
    """Committed parts of ``split`` that its index (where it has one) does not list yet."""
    try:
        state = read_index(store._root.store, store._root.path.strip("/"), split)
    except (ValueError, RuntimeError):
        return []  # reported as a problem by _index_problems
    if state is None:
        return []
    missing = sorted({folder.name for folder in committed} - set(state.entries()))
    return [f"{split}/{name}: committed, not in the split's index yet (readers list the split; the next extraction "
            f"run or `unipt store index {store.url}` adds it)" for name in missing]


def _view_problems(store: FeatureStore, info, recorded: dict[str, str]) -> list[Problem]:
    """A part of a split with views must hold every view of every layer, as its commit record says."""
    where, expected = f"{info.split}/{info.name}", store.views(info.split)
    if info.views != expected:
        return [Problem(where, "damaged", f"committed with {info.views} view(s); the store records {expected} "
                                          f"for split {info.split!r}")]
    arrays = {key.split("/", 1)[0] for key in recorded}
    absent = [fmt.layer_key(layer, view) for view in range(expected) for layer in store.layers
              if fmt.layer_key(layer, view) not in arrays]
    return [Problem(f"{where}/{key}", "missing", "a view's layer array the commit record does not list")
            for key in absent]


def _known_splits(store: FeatureStore) -> list[str]:
    """The planned splits in plan order (even those not extracted yet), then any other split the store holds."""
    plan = store.plan or {}
    return [*plan, *(split for split in store.splits() if split not in plan)]


def _shorten(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


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
    folder = _local_folder(store, split, name)
    if folder is not None and folder.is_symlink():
        # Only what unipt wrote is removed: the link's target is somebody's folder, maybe another store's part.
        raise StoreError(f"{split}/{name} in {store.url} is a symbolic link to {os.readlink(folder)}, not a part "
                         "unipt wrote here; remove the link yourself if that is what you want")
    keys = sync(_list(zstore, prefix))
    remove_from_index(store, split, name)  # first: the index must never list a part that is gone
    try:
        sync(zstore.delete_dir(prefix))
    except OSError as exc:
        done = len(keys) - len(sync(_list(zstore, prefix)))
        raise StoreError(f"cannot delete {split}/{name} from {store.url}: {exc.strerror or exc} "
                         f"({exc.filename or prefix}); {done} of {len(keys)} objects were deleted. Check that this "
                         "user may write to the store, then run rm-part again") from exc
    return len(keys)


def _local_folder(store: FeatureStore, *parts: str) -> Path | None:
    """The folder on this machine's disk, for a store in a local folder; None for any other store."""
    root = getattr(store._root.store, "root", None)
    return None if root is None else Path(root, *store._root.path.split("/"), *parts)


def describe(store: FeatureStore) -> dict[str, Any]:
    """Splits, parts, examples, tokens, bytes on disk and bytes per stored value, and the provenance."""
    splits = {}
    value_bytes = values = 0
    row_values = sum(math.prod(shape) for shape in store.row_shapes.values())
    plan = store.plan or {}
    for split in _known_splits(store):
        folders = store.part_folders(split)
        parts = [f.info for f in folders if f.state == "committed"]
        tokens = sum(p.n_tokens for p in parts)
        nbytes = 0
        view_bytes: dict[int, int] = {}  # stored values (and int8 scales) of each view
        for info in parts:
            zstore, prefix = _store_and_prefix(store, split, info.name)
            for key in sync(_list(zstore, prefix)):
                size = sync(zstore.getsize(key))
                nbytes += size
                relative = key[len(prefix) + 1:]
                if relative.startswith("layer_") and "/c/" in relative:  # stored values (and int8 scales)
                    value_bytes += size
                    view = _view_of(relative)
                    view_bytes[view] = view_bytes.get(view, 0) + size
        views = store.views(split)
        values += tokens * row_values * views  # every view stores as many values as view 0
        splits[split] = {"parts": len(parts), "examples": sum(p.n_examples for p in parts), "tokens": tokens,
                         "truncated": sum(p.truncated for p in parts), "bytes": nbytes,
                         # a split with stochastic views: how many per example, and the layer bytes of each
                         **({"views": views, "bytes_per_view": [view_bytes.get(view, 0) for view in range(views)]}
                            if views > 1 else {}),
                         "planned_parts": plan.get(split, {}).get("parts"),
                         "planned_examples": plan.get(split, {}).get("examples"),
                         # folders that are not (or no longer trustworthily) committed: state by part
                         "not_committed": {f.name: f.state for f in folders if f.state != "committed"}}
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
        # {"count": K, "splits": [...]} for a store with stochastic views, else None (every split: view 0 only)
        "views": store.meta.get(fmt.VIEWS),
        "task": store.task,
        "label_names": store.label_names,
        "splits": splits,
        "bytes": sum(s["bytes"] for s in splits.values()),
        "bytes_per_value": value_bytes / values if values else None,
        "skipped": skipped,  # bad source rows left out, by reason (`FeatureStore.skipped()` lists them)
        # streamed sources: the latest source version (number, rows, pieces, shards); None for older stores
        "source_version": _version_summary(store.source_version()),
        "in_progress": [{"split": split, "part": part, "run": doc.get("owner", {}).get("run"),
                         "host": doc.get("owner", {}).get("host"), "pid": doc.get("owner", {}).get("pid"),
                         "heartbeat": doc.get("heartbeat"), "stale": claim_stale_reason(doc)}
                        for split, part, doc in store.active_claims()],
        # None: written before unipt checksummed chunks (reads cannot detect bit flips; `verify` still can)
        "chunk_checksum": store.chunk_checksum,
        "metadata_checksum": store.metadata_checksummed,
        "provenance": store.provenance,
    }


def _version_summary(version: dict[str, Any] | None) -> dict[str, Any] | None:
    if version is None:
        return None
    return {"version": version["version"], "rows": version["rows"], "pieces": len(version["pieces"]),
            "shards": len({piece[0] for piece in version["pieces"]}), "created": version["created"],
            "fingerprint": version["fingerprint"]}
