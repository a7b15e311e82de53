"""The split index: a consolidated record of a split's committed parts, so opening a split reads O(1) objects
instead of one metadata document per part.

Plain objects beside the Zarr hierarchy (not Zarr nodes), under ``_index/<split>/``:

* ``journal/<part>.json``: one entry per committed part, created (never overwritten) by the part's writer
  right after its commit marker;
* ``base-<generation, 8 digits>.json.zst``: a snapshot of entries (zstd-compressed: a JSON document, then a
  line with the sha256 of its bytes), written as generation g + 1 by whoever compacts the newest base (g)
  and the journal. It is created exclusively, so of two compactions one wins and the other re-reads and
  retries; the journal entries it merged and the older bases are deleted after it lands.

The index is a cache of the parts' own commit records, never the truth: readers use it only when it is
complete (its parts are exactly those the store's plan says the split has) and agrees with itself; else
they list the split as before. Entries are written only after a commit and a part leaves the index before
its objects are deleted, so a complete index neither hides nor invents a part; one that was removed
behind its back is caught when it is read (its commit record no longer matches the entry).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from numcodecs import Zstd
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from . import _format as fmt
from ._claims import create_exclusive, creates_exclusively

log = logging.getLogger(__name__)

INDEX_PREFIX = "_index"
# One entry per part; a base stores each entry as a row of these values, in this order.
COLUMNS = ("name", "n_examples", "n_tokens", "source_start", "source_stop", "truncated", "views", "record_sha256",
           "committed", "writer")
_BASE = re.compile(r"base-(\d{8})\.json\.zst")
_JOURNAL = re.compile(r"journal/(part-\d+)\.json")
# Level 1 measured smallest and fastest for 10^5 entries (17.9 MB of JSON -> 5.8 MB, decoded in 18 ms).
_CODEC = Zstd(level=1)
_ATTEMPTS = 8  # listings retried when a compaction races this one (an object listed, then deleted)
_CONCURRENT_GETS = 64


class IndexRaced(RuntimeError):
    """The index kept changing under a reader or compaction (objects listed, then gone)."""


@dataclass
class IndexState:
    """What ``_index/<split>/`` holds: the newest base and the journal, as read."""

    split: str
    generation: int  # the newest base's (0: none yet)
    base: dict[str, dict[str, Any]]  # part name -> entry
    journal: dict[str, dict[str, Any]]  # part name -> entry
    bases: list[int] = field(default_factory=list)  # every base generation listed
    conflicts: list[str] = field(default_factory=list)  # names whose base and journal entries disagree

    def entries(self) -> dict[str, dict[str, Any]]:
        """Base and journal merged by part name, in name order (a conflict keeps the base's entry)."""
        merged = {**self.journal, **self.base}
        return {name: merged[name] for name in sorted(merged)}


def entry_of(info, commit: Mapping[str, Any], writer: str = "") -> dict[str, Any]:
    """The index entry of a part just committed: its ``PartInfo`` and its commit record."""
    return {"name": info.name, "n_examples": int(info.n_examples), "n_tokens": int(info.n_tokens),
            "source_start": int(info.source_start), "source_stop": int(info.source_stop),
            "truncated": len(commit.get("truncated", ())), "views": int(commit.get(fmt.VIEWS, 1)),
            "record_sha256": commit.get(fmt.RECORD_DIGEST), "committed": commit.get("committed", ""),
            "writer": writer}


def parts_digest(pairs: Iterable[tuple[str, str | None]]) -> str:
    """sha256 over (part name, commit record_sha256) pairs, in the order given."""
    return fmt.record_digest([[name, digest or ""] for name, digest in pairs])


# ----------------------------------------------------------------------------- writers
def write_journal_entry(zarr_store, root: str, split: str, entry: Mapping[str, Any]) -> None:
    """Create ``journal/<part>.json`` for a part just committed. A different entry already there means the
    part was written twice: that is logged and the first entry kept (the part itself is committed; the
    mismatch makes readers refuse it by name). A failed write is logged: readers then list the split."""
    key = _key(root, split, f"journal/{entry['name']}.json")
    data = json.dumps(dict(entry), sort_keys=True).encode()
    try:
        if create_exclusive(zarr_store, key, data):
            return
        existing = _loads(sync(zarr_store.get(key, default_buffer_prototype())))
    except OSError as exc:
        log.warning("%s/%s is committed but its index entry could not be written (%s); readers list the split "
                    "until `unipt store index` rebuilds the index", split, entry["name"], exc)
        return
    if existing is None or existing.get("record_sha256") != entry["record_sha256"]:
        log.error("%s/%s was committed twice: the split's index holds an entry with record_sha256 %s, this "
                  "commit has %s; the first entry is kept (readers will refuse the part by name); run "
                  "`unipt store verify`, then `unipt store rm-part` and re-extract it", split, entry["name"],
                  None if existing is None else existing.get("record_sha256"), entry["record_sha256"])


@dataclass
class CompactResult:
    """What one compaction (or rebuild) of a split's index did."""

    split: str
    generation: int  # of the base written (the newest one, when there was nothing to do)
    parts: int  # entries in that base
    merged: int  # journal entries folded in
    missing: list[str] = field(default_factory=list)  # planned parts the index lacks (readers list the split)
    conflicts: list[str] = field(default_factory=list)  # journal entries left because they contradict the base


def compact_index(store, split: str) -> CompactResult:
    """Fold the journal of ``split``'s index into a new base (generation g + 1); safe with concurrent writers
    and compactions. Refused (:class:`StoreError`) where the store cannot create objects exclusively."""
    from ._store import StoreError

    zarr_store, root = _where(store)
    if not creates_exclusively(zarr_store):
        raise StoreError(f"{store.url}: this storage cannot create objects exclusively, so compactions by several "
                         "writers could lose index entries; run `unipt store index "
                         f"{store.url}` (one writer at a time) instead")
    for _ in range(_ATTEMPTS):
        state = _read_for_update(store, split)
        if state is None:
            return CompactResult(split, 0, 0, 0, missing=_missing(store, split, {}))
        for name in state.conflicts:
            log.error("%s %s/%s: its journal entry (record_sha256 %s) contradicts the index base (%s); the base's "
                      "is kept; run `unipt store index %s` to rebuild the index from the parts", store.url, split,
                      name, state.journal[name].get("record_sha256"), state.base[name].get("record_sha256"),
                      store.url)
        fresh = {name: entry for name, entry in state.journal.items() if name not in state.base}
        merged = {**state.base, **fresh}
        if state.generation and not fresh:  # the newest base covers every entry: just tidy up
            covered = [name for name in state.journal if name not in state.conflicts]
            _clean(zarr_store, root, split, state.generation, state, covered)
            return CompactResult(split, state.generation, len(merged), 0, _missing(store, split, merged),
                                 list(state.conflicts))
        generation = state.generation + 1
        if not _publish(zarr_store, root, split, generation, merged, exclusive=True):
            continue  # another writer compacted first: read its base and try again
        _clean(zarr_store, root, split, generation, state, [n for n in state.journal if n not in state.conflicts])
        return CompactResult(split, generation, len(merged), len(fresh), _missing(store, split, merged),
                             list(state.conflicts))
    raise StoreError(f"{store.url}: the index of split {split!r} kept changing during {_ATTEMPTS} compaction "
                     "attempts (other writers compacting); try again")


@dataclass
class RebuildResult:
    """What ``unipt store index`` found in a split's part folders, and the base it wrote."""

    split: str
    generation: int
    parts: int
    examples: int
    not_committed: list[tuple[str, str, str]] = field(default_factory=list)  # (part, state, detail)


def index_missing(store, split: str, names: Iterable[str]) -> int:
    """Write the journal entries of committed parts ``names`` that the index lacks (a run killed between a
    part's commit and its entry leaves such a gap); each is read from the part's own commit record, and one
    that is not committed (any more) is passed over. Returns how many were written."""
    zarr_store, root = _where(store)
    written = 0
    for name in names:
        folder = store._part_folder(store._root[split], split, name, strict=False)
        if folder.state == "committed":
            commit = store._root[split][name].attrs[fmt.COMMIT_ATTR]
            write_journal_entry(zarr_store, root, split, entry_of(folder.info, commit, writer=""))
            written += 1
    return written


def rebuild_index(store, split: str) -> RebuildResult:
    """Rebuild ``split``'s index from the truth: list its part folders, index the committed ones in a new base
    and clear the journal entries that base covers or contradicts. Run by one writer at a time (on storage
    without exclusive creation nothing fences off a concurrent compaction)."""
    zarr_store, root = _where(store)
    folders = store.part_folders(split, strict=False)
    entries = {}
    for folder in folders:
        if folder.state == "committed":
            commit = store._root[split][folder.name].attrs[fmt.COMMIT_ATTR]
            entries[folder.name] = entry_of(folder.info, commit, writer="")
    exclusive = creates_exclusively(zarr_store)
    for _ in range(_ATTEMPTS):
        # Only names are read: a damaged base or journal entry is what a rebuild replaces.
        bases, journal = _listed(zarr_store, root, split)
        generation = max(bases, default=0) + 1
        if _publish(zarr_store, root, split, generation, entries, exclusive=exclusive):
            # A journal entry of a part committed since the folders were listed stays, for the next compaction;
            # every other one is covered by the new base or contradicts what the folders hold.
            merged = [name for name in journal if name in entries or not _committed(store, split, name)]
            _delete(zarr_store, [journal[name] for name in merged]
                    + [key for g, key in bases.items() if g < generation])
            return RebuildResult(split, generation, len(entries), sum(e["n_examples"] for e in entries.values()),
                                 [(f.name, f.state, f.detail) for f in folders if f.state != "committed"])
    from ._store import StoreError

    raise StoreError(f"{store.url}: the index of split {split!r} kept changing while it was rebuilt; try again")


def remove_from_index(store, split: str, name: str) -> None:
    """Take part ``name`` out of ``split``'s index (its journal entry, then a new base without it); called
    before the part's objects are deleted, so the index never lists a part that is not there."""
    zarr_store, root = _where(store)
    keys = sync(_list(zarr_store, _key(root, split, "")))
    if not keys:
        return  # a split without an index
    sync(zarr_store.delete(_key(root, split, f"journal/{name}.json")))
    exclusive = creates_exclusively(zarr_store)
    for _ in range(_ATTEMPTS):
        state = _read_for_update(store, split) or IndexState(split, 0, {}, {})
        # A new generation even when the base lacks the part: a compaction that read its journal entry before
        # it was deleted must lose the race for this generation, not publish the part again.
        entries = {n: e for n, e in state.entries().items() if n != name}
        generation = state.generation + 1
        if _publish(zarr_store, root, split, generation, entries, exclusive=exclusive):
            _clean(zarr_store, root, split, generation, state,
                   {n: e for n, e in state.journal.items() if n != name})
            return
    from ._store import StoreError

    raise StoreError(f"{store.url}: the index of split {split!r} kept changing; {split}/{name} was not removed "
                     "(nothing was deleted); run rm-part again")


# ----------------------------------------------------------------------------- readers
def read_index(zarr_store, root: str, split: str, *, expect: set[str] | None = None) -> IndexState | None:
    """The newest base and the journal of ``split``'s index; None when it has none. ``expect``: stop early
    (journal entries unread) and return None when the listed part names do not include all of these.
    Retries the listing when a compaction deletes what it listed; raises :class:`IndexRaced` after that."""
    for _ in range(_ATTEMPTS):
        bases, journal_keys = _listed(zarr_store, root, split)
        if not bases and not journal_keys:
            return None
        generation = max(bases, default=0)
        base: dict[str, dict[str, Any]] = {}
        if generation:
            raw = sync(zarr_store.get(bases[generation], default_buffer_prototype()))
            if raw is None:
                continue  # replaced by a newer compaction since the listing
            base = _decode_base(raw.to_bytes(), split, bases[generation])
        if expect is not None and not expect <= set(base) | set(journal_keys):
            return None
        values = sync(_get_many(zarr_store, list(journal_keys.values())))
        if any(value is None for value in values):
            continue  # merged into a newer base and deleted since the listing
        journal = {}
        for name, value in zip(journal_keys, values):
            entry = _loads(value)
            if entry is None or entry.get("name") != name or not set(COLUMNS) <= set(entry):
                raise ValueError(f"index entry {journal_keys[name]} is not a valid entry for {name}")
            journal[name] = entry
        conflicts = sorted(name for name in set(base) & set(journal)
                           if base[name].get("record_sha256") != journal[name].get("record_sha256"))
        return IndexState(split, generation, base, journal, sorted(bases), conflicts)
    raise IndexRaced(f"the index of split {split!r} kept changing while it was read")


def trusted_entries(zarr_store, root: str, split: str, planned_parts: int | None) -> dict[str, dict] | None:
    """The index entries of ``split`` when they can be trusted: complete (every one of the ``planned_parts``
    parts part-000000 .. is listed) and self-consistent; None otherwise (the caller lists the split). Only
    those parts are returned: a store that has grown since the caller's source version holds more."""
    if planned_parts is None:
        return None
    expect = {fmt.part_key(i) for i in range(planned_parts)}
    try:
        state = read_index(zarr_store, root, split, expect=expect)
    except (IndexRaced, ValueError, OSError) as exc:
        log.warning("the index of split %r cannot be used (%s); listing the split instead", split, exc)
        return None
    if state is None:
        return None
    if state.conflicts:
        log.warning("the index of split %r disagrees with itself on %s; listing the split instead (`unipt store "
                    "index` rebuilds it)", split, ", ".join(state.conflicts[:5]))
        return None
    return {name: entry for name, entry in state.entries().items() if name in expect}


# ----------------------------------------------------------------------------- internals
def _where(store) -> tuple[Any, str]:
    return store._root.store, store._root.path.strip("/")


def _key(root: str, split: str, relative: str) -> str:
    return "/".join(p for p in (root, INDEX_PREFIX, split) if p) + "/" + relative


def _read_for_update(store, split: str) -> IndexState | None:
    from ._store import StoreError

    try:
        return read_index(*_where(store), split)
    except ValueError as exc:
        raise StoreError(f"{store.url}: the index of split {split!r} is damaged ({exc}); run `unipt store index "
                         f"{store.url}` to rebuild it from the parts") from exc


def _missing(store, split: str, entries: Mapping[str, Any]) -> list[str]:
    planned = (store.plan or {}).get(split, {}).get("parts")
    return [] if planned is None else [fmt.part_key(i) for i in range(planned) if fmt.part_key(i) not in entries]


def _publish(zarr_store, root: str, split: str, generation: int, entries: Mapping[str, Mapping[str, Any]], *,
             exclusive: bool) -> bool:
    """Write base ``generation``; False when it exists already or a newer one appeared meanwhile (the caller
    re-reads and retries). A base created after a newer one (its generation number freed by a cleanup) is
    taken back at once, so the newest base always descends from the ones before it."""
    document = {"split": split, "generation": generation, "columns": list(COLUMNS),
                "parts": [[entries[name].get(column) for column in COLUMNS] for name in sorted(entries)]}
    body = json.dumps(document, separators=(",", ":")).encode()
    # The document's sha256 on a line after it: checking it costs one hash of the bytes, not a re-encoding.
    data = _CODEC.encode(body + b"\n" + hashlib.sha256(body).hexdigest().encode())
    key = _key(root, split, f"base-{generation:08d}.json.zst")
    if exclusive:
        if not create_exclusive(zarr_store, key, bytes(data)):
            return False
    else:
        sync(zarr_store.set(key, default_buffer_prototype().buffer.from_bytes(bytes(data))))
    newer = [k for k in sync(_list(zarr_store, _key(root, split, "")))
             if (m := _BASE.fullmatch(k.rsplit("/", 1)[-1])) and int(m.group(1)) > generation]
    if newer:
        sync(zarr_store.delete(key))
        return False
    return True


def _clean(zarr_store, root: str, split: str, generation: int, state: IndexState,
           merged: Iterable[str]) -> None:
    """After base ``generation`` landed: delete the journal entries it merged, then the older bases."""
    _delete(zarr_store, [_key(root, split, f"journal/{name}.json") for name in sorted(merged)]
            + [_key(root, split, f"base-{g:08d}.json.zst") for g in state.bases if g < generation])


def _delete(zarr_store, keys: list[str]) -> None:
    async def delete_all() -> None:
        for key in keys:  # one by one, in order: a kill leaves a prefix of them done
            await zarr_store.delete(key)

    sync(delete_all())


def _listed(zarr_store, root: str, split: str) -> tuple[dict[int, str], dict[str, str]]:
    """One listing of ``split``'s index: {base generation: key}, {part name: journal key}."""
    prefix = _key(root, split, "")
    bases, journal = {}, {}
    for key in sync(_list(zarr_store, prefix)):
        relative = key[len(prefix):]
        if match := _BASE.fullmatch(relative):
            bases[int(match.group(1))] = key
        elif match := _JOURNAL.fullmatch(relative):
            journal[match.group(1)] = key
    return bases, journal


def _committed(store, split: str, name: str) -> bool:
    from ._store import CorruptChunkError

    try:
        return store.is_committed(split, name)
    except CorruptChunkError:
        return False


def _decode_base(raw: bytes, split: str, key: str) -> dict[str, dict[str, Any]]:
    try:
        body, _, recorded = bytes(_CODEC.decode(raw)).rpartition(b"\n")
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"index base {key} does not decode ({exc})") from exc
    if hashlib.sha256(body).hexdigest().encode() != recorded:
        raise ValueError(f"index base {key} does not match the sha256 written with it")
    collecting = gc.isenabled()
    gc.disable()  # 10^5 small containers: collections would scan the reader's whole heap for nothing
    try:
        document = json.loads(body)
        columns = document.get("columns") if isinstance(document, dict) else None
        if document.get("split") != split or not isinstance(columns, list) or not set(COLUMNS) <= set(columns):
            raise ValueError(f"index base {key} is not the index of split {split!r}")
        return {row[0]: dict(zip(columns, row)) for row in document["parts"]}
    except (AttributeError, KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"index base {key} is not an index document ({exc})") from exc
    finally:
        if collecting:
            gc.enable()


def _loads(buffer) -> dict[str, Any] | None:
    if buffer is None:
        return None
    try:
        value = json.loads(buffer.to_bytes())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def _list(zarr_store, prefix: str) -> list[str]:
    return sorted([key async for key in zarr_store.list_prefix(prefix)])


async def _get_many(zarr_store, keys: list[str]) -> list:
    limit = asyncio.Semaphore(_CONCURRENT_GETS)
    prototype = default_buffer_prototype()

    async def get(key: str):
        async with limit:
            return await zarr_store.get(key, prototype)

    return await asyncio.gather(*(get(key) for key in keys))
