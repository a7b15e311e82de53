"""Streamed, sharded text sources: extraction plans and reads a source piece by piece, never all of it at once.

A source is a list of **shards** (one file; a folder of CSV/TSV/JSONL/Parquet files or webdataset tars in
name order; the Arrow files of a `datasets` folder), and each shard is cut into **pieces** of
``block_rows`` rows in reading order. A piece is the unit of planning: its parts are a function of its own
rows alone (their ids hash-ordered, then cut into parts of ``part_size``, so each part is a uniform random
sample of its piece, whatever order the source is in), numbered after the parts of the pieces before it.

Two passes over the source, each holding one piece at a time (memory stays flat however long the source):

1. :func:`plan_source` reads every row once to validate it, deduplicate it, draw its split and count: the
   plan (pieces with their sha256, parts and examples per split, the label names, the skipped rows).
2. :meth:`SourcePlan.tasks` reads the pieces again and yields the :class:`PartTask` s still to do.

**Deduplication** (``source.dedupe``) is global: a text seen in any earlier piece (in piece order) is
dropped, the first occurrence kept, exactly as reading the whole source into memory would. The texts
seen so far live in an on-disk set (SQLite, :class:`SeenSet`): ~16 bytes of key per example on disk,
a bounded page cache in memory. Without dedupe, nothing crosses pieces.

**Growth.** A store records the pieces of every source version it was extracted from (``_sources/`` in
the store, :mod:`unipt.store._versions`). Re-running extraction on a source that gained rows or shards
reads the recorded pieces first, in their order, checks each one's sha256 (a recorded piece whose rows
changed is refused: that is an edit, not growth), and cuts what is new into new pieces after them: the
committed parts stay as they are, and only the new pieces' parts are extracted.

**Caps** (``source.max_examples``) keep the ``cap`` examples of a split with the smallest subset hash over
the whole source, as the in-memory reader does: a heap of ``cap`` entries (memory O(cap), not O(rows)).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import logging
import math
import sqlite3
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from . import _targets as targets
from ._resolve import resolve_path
from ._sources import (Example, Record, RowReader, Skipped, SplitDraw, _count_reasons, _csv_rows, _jsonl_rows,
                       _target_columns, _webdataset_rows, hash_unit, report_kept, source_format, warn_if_one_label,
                       webdataset_shards)
from .config import DEFAULT_BLOCK_ROWS, SourceConfig

log = logging.getLogger(__name__)

PIECE_ORDER = "piece-hash"  # provenance "part_order" of stores planned piece by piece (older stores: "hash")
_FILE_FORMATS = {"csv": (".csv",), "tsv": (".tsv",), "jsonl": (".jsonl", ".ndjson"), "parquet": (".parquet",)}


@dataclass(frozen=True)
class Shard:
    name: str  # stable and relative (the file's name within the source; "" for a one-file source): recorded
    path: str  # where this machine reads it
    split: str | None = None  # a `datasets` DatasetDict's split the shard belongs to


@dataclass
class Piece:
    """``rows`` rows of shard ``shard`` from row ``start`` (0-based), and what the plan made of them."""

    shard: str
    start: int
    rows: int
    sha256: str  # of the piece's rows in canonical form (format-independent: see _row_bytes)
    # split -> [first part index, parts, examples, the split-order position of its first example]
    parts: dict[str, list[int]] = field(default_factory=dict)

    def record(self) -> list:
        return [self.shard, self.start, self.rows, self.sha256, self.parts]

    @classmethod
    def from_record(cls, record: Sequence) -> "Piece":
        shard, start, rows, sha256, parts = record
        return cls(shard, int(start), int(rows), sha256, {s: [int(v) for v in p] for s, p in parts.items()})


@dataclass(frozen=True)
class PartTask:
    split: str
    index: int
    start: int  # first example of the part in the split's part order (its commit record's source_start)
    examples: Sequence[Example]

    @property
    def name(self) -> str:
        from unipt.store import part_key

        return part_key(self.index)

    @property
    def n_examples(self) -> int:
        return len(self.examples)


# ----------------------------------------------------------------------------------------------- shards
def source_shards(config: SourceConfig) -> tuple[str, list[Shard]]:
    """The source's format and its shards in reading order."""
    path = resolve_path(config.path)
    fmt = source_format(config, path)
    if fmt == "webdataset":
        return fmt, [Shard(Path(p).name, p) for p in webdataset_shards(path)]
    if fmt == "hf":
        return fmt, _hf_shards(path)
    if Path(path).is_dir():
        files = sorted(p for p in Path(path).iterdir() if p.suffix.lower() in _FILE_FORMATS[fmt])
        if not files:
            raise FileNotFoundError(f"source folder {path!r} holds no {fmt} files ({', '.join(_FILE_FORMATS[fmt])})")
        return fmt, [Shard(p.name, str(p)) for p in files]
    if not Path(path).is_file():
        raise FileNotFoundError(f"source file {path!r} does not exist")
    return fmt, [Shard("", path)]  # a one-file source's shard has no name: the file may move and resume


def _hf_shards(path: str) -> list[Shard]:
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("Hugging Face dataset sources need `datasets`: pip install 'unipt[hf]'") from exc
    data = datasets.load_from_disk(path) if Path(path).is_dir() else datasets.load_dataset(path)
    parts = data.items() if isinstance(data, datasets.DatasetDict) else [(None, data)]
    shards = []
    for split, dataset in parts:
        for file in dataset.cache_files:
            name = Path(file["filename"]).name
            shards.append(Shard(name if split is None else f"{split}/{name}", file["filename"], split))
    if not shards:
        raise ValueError(f"the `datasets` source {path!r} has no Arrow files to read (an in-memory dataset): "
                         "save it with save_to_disk and point source.path at that folder")
    return shards


def shard_rows(config: SourceConfig, fmt: str, shard: Shard, start: int = 0) -> Iterator[dict[str, Any]]:
    """The raw rows of one shard from row ``start`` on, read as a stream (Parquet by row group)."""
    if fmt == "parquet":
        return _parquet_rows(shard.path, start)
    if fmt in ("csv", "tsv"):
        rows = _csv_rows(shard.path, config.encoding, "\t" if fmt == "tsv" else ",")
    elif fmt == "jsonl":
        rows = _jsonl_rows(shard.path, config.encoding)
    elif fmt == "webdataset":
        rows = _webdataset_rows(config, [shard.path])
    else:
        rows = _hf_rows(shard)
    return itertools.islice(rows, start, None)


def _parquet_rows(path: str, start: int) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    skip, groups = start, []
    for group in range(file.metadata.num_row_groups):  # whole row groups before `start` are never read
        rows = file.metadata.row_group(group).num_rows
        if skip >= rows and not groups:
            skip -= rows
        else:
            groups.append(group)
    if not groups:
        return
    for batch in file.iter_batches(batch_size=4096, row_groups=groups):
        rows = batch.to_pylist()
        if skip:
            rows, skip = rows[skip:], max(0, skip - len(rows))
        yield from rows


def _hf_rows(shard: Shard) -> Iterator[dict[str, Any]]:
    import datasets

    for row in datasets.Dataset.from_file(shard.path):
        yield row if shard.split is None else {**row, "__split__": shard.split}


def _shard_label(name: str) -> str:
    return f"shard {name}" if name else "the file"


def _row_bytes(row: dict[str, Any]) -> bytes:
    """A row in canonical form for the piece's sha256: the same rows read from CSV, JSONL or Parquet give the
    same bytes only when their values are equal as read (a CSV's "1" is not a Parquet's 1)."""
    content = {k: v for k, v in row.items() if k != "__line__"}
    return json.dumps(content, sort_keys=True, ensure_ascii=True, default=repr).encode("ascii") + b"\n"


# ----------------------------------------------------------------------------------------------- dedupe
class SeenSet:
    """A set of 16-byte keys with a small value each, on disk (SQLite in a temporary folder): membership for
    any number of keys with flat memory. Keys are looked up and added a piece at a time."""

    _BATCH = 500  # keys per IN (...) query: below SQLite's bound on host parameters

    def __init__(self):
        self._folder = tempfile.TemporaryDirectory(prefix="unipt-seen-")
        # Not bound to one thread: a piece stream may be consumed on a prefetch thread and closed on another.
        self._db = sqlite3.connect(str(Path(self._folder.name) / "seen.sqlite"), check_same_thread=False)
        # The set is rebuilt by every run (it follows from the source), so nothing needs to survive a crash.
        self._db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-2048;"
                               "CREATE TABLE seen (key BLOB PRIMARY KEY, value BLOB) WITHOUT ROWID;")

    def known(self, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        """The keys among ``keys`` already in the set, with their values."""
        found: dict[bytes, bytes] = {}
        for i in range(0, len(keys), self._BATCH):
            batch = keys[i : i + self._BATCH]
            query = f"SELECT key, value FROM seen WHERE key IN ({','.join('?' * len(batch))})"
            found.update(self._db.execute(query, batch).fetchall())
        return found

    def add(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        self._db.executemany("INSERT OR IGNORE INTO seen VALUES (?, ?)", items)

    def close(self) -> None:
        self._db.close()
        self._folder.cleanup()


def _digest(text: str, size: int = 16) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:size]


# ----------------------------------------------------------------------------------------------- reading
@dataclass
class PieceRead:
    """One piece as read: its records in reading order (dedupe applied), and what was left out."""

    piece: Piece
    row_base: int  # rows of the source before this piece
    records: list[Record]
    skipped: list[Skipped]
    duplicates: int = 0
    conflicts: int = 0


def read_pieces(config: SourceConfig, fmt: str, shards: Sequence[Shard], recorded: Sequence[Piece],
                block_rows: int, *, wanted: set[int] | None = None, grow: bool = True) -> Iterator[PieceRead]:
    """Every piece of the source in piece order: the ``recorded`` ones first (each checked against its sha256),
    then (``grow``) the rows past them, cut into new pieces of ``block_rows``. ``wanted`` (piece numbers):
    yield only those, and pass the others over unread when nothing has to be carried across pieces (no
    dedupe)."""
    by_name = {shard.name: shard for shard in shards}
    gone = sorted({p.shard for p in recorded} - set(by_name))
    if gone:
        raise ValueError(f"source {config.path} no longer has shard(s) {gone[:5]} that this store was extracted "
                         "from; a store only grows: restore them, or extract into a new store")
    keyed = fmt == "webdataset"
    readers = {name: RowReader(config, keyed=keyed, path=by_name[name].path) for name in by_name}
    seen = SeenSet() if config.dedupe else None
    keys = SeenSet() if keyed and not config.id_column else None  # sample keys are ids: unique across shards
    stream: dict[str, Any] = {}  # the one open shard reader: {"shard", "next", "rows"}

    def take(shard: Shard, start: int, rows: int | None) -> Iterator[dict[str, Any]]:
        """The piece's raw rows, one at a time (a row is dropped as soon as it is read: only records stay)."""
        if stream.get("shard") != shard.name or stream["next"] != start:
            stream.update(shard=shard.name, next=start, rows=shard_rows(config, fmt, shard, start))
        for row in itertools.islice(stream["rows"], block_rows if rows is None else rows):
            stream["next"] += 1
            yield row

    def layout() -> Iterator[tuple[Shard, int, int | None, Piece | None]]:
        ends: dict[str, int] = {}
        for piece in recorded:
            ends[piece.shard] = max(ends.get(piece.shard, 0), piece.start + piece.rows)
            yield by_name[piece.shard], piece.start, piece.rows, piece
        for shard in shards if grow else ():  # what is new: the rows past each shard's recorded pieces, new shards
            start = ends.get(shard.name, 0)
            while True:
                yield shard, start, None, None
                if stream.get("shard") != shard.name or stream["next"] < start + block_rows:
                    break  # the shard ended inside this piece
                start += block_rows

    row_base = 0
    try:
        for number, (shard, start, rows, known) in enumerate(layout()):
            if wanted is not None and known is not None and number not in wanted and seen is None and keys is None:
                row_base += known.rows
                continue
            piece = known if known is not None else Piece(shard.name, start, 0, "")
            read, sha, n = _read_rows(readers[shard.name], take(shard, start, rows), row_base, piece, seen, keys,
                                      shard.name)
            if not n:
                if known is not None:
                    raise ValueError(f"source {config.path}: {_shard_label(shard.name)} now ends before row "
                                     f"{start + known.rows}, which this store extracted; a store only grows")
                continue
            if known is not None and (sha != known.sha256 or n != known.rows):
                raise ValueError(f"source {config.path}: rows {start}..{start + known.rows - 1} of {_shard_label(shard.name)} "
                                 "changed since this store extracted them (their sha256 differs). A store grows by "
                                 "appended rows and new shards only; extract an edited source into a new store")
            if known is None:
                piece.rows, piece.sha256 = n, sha
            row_base += n
            if wanted is None or number in wanted:
                yield read
            read = None  # not held while the next piece is read: one piece in memory at a time
    finally:
        for s in (seen, keys):
            if s is not None:
                s.close()


def _read_rows(reader: RowReader, rows: Iterable[dict[str, Any]], row_base: int, piece: Piece,
               seen: SeenSet | None, keys: SeenSet | None, shard: str) -> tuple[PieceRead, str, int]:
    """Validate a piece's rows and drop the texts seen before (in this piece or an earlier one); also the
    sha256 of its rows and how many there were."""
    out = PieceRead(piece, row_base, [], [])
    records: list[Record] = []
    digest, n = hashlib.sha256(), 0
    for offset, row in enumerate(rows):
        digest.update(_row_bytes(row))
        n += 1
        record = reader.read(row_base + offset + 1, row)
        (out.skipped if isinstance(record, Skipped) else records).append(record)
    if keys is not None:
        _check_unique_keys(records, keys, shard)
    if seen is None:
        out.records = records
        return out, digest.hexdigest(), n
    first: dict[bytes, tuple[Record, bytes]] = {}  # this piece's first occurrences, in reading order
    for record in records:
        key = _digest(record.content)
        target = _digest(json.dumps(record.target, default=repr), 8)
        if key in first:
            out.duplicates += 1
            out.conflicts += first[key][1] != target
        else:
            first[key] = (record, target)
    earlier = seen.known(list(first))
    for key, value in earlier.items():
        out.duplicates += 1
        out.conflicts += first[key][1] != value
    out.records = [record for key, (record, _) in first.items() if key not in earlier]
    seen.add((key, target) for key, (_, target) in first.items() if key not in earlier)
    return out, digest.hexdigest(), n


def _check_unique_keys(records: list[Record], keys: SeenSet, shard: str) -> None:
    ids = [record.example.id.encode("utf-8", "surrogatepass") for record in records]
    again = keys.known(ids)
    if again:
        key = next(iter(again)).decode("utf-8", "surrogatepass")
        raise ValueError(f"webdataset sample key {key!r} occurs twice (in {again[key.encode()].decode()} and "
                         f"{shard}); keys are the example ids, so they must be unique. Set source.id_column to a "
                         "member or json field holding a unique id instead.")
    keys.add((i, (shard or "the file").encode()) for i in ids)


# ----------------------------------------------------------------------------------------------- planning
@dataclass
class SourcePlan:
    """What extraction makes of a source, from one streamed pass: its pieces and their parts per split."""

    config: SourceConfig
    fmt: str
    shards: list[Shard]
    pieces: list[Piece]
    part_size: int
    block_rows: int
    label_names: list[str]
    split_names: list[str]  # in the order they first appear
    fingerprint: str  # sha256 over the pieces' sha256: the source's content, not its paths
    stats: dict[str, Any]
    skipped: list[Skipped]
    kept: dict[str, set[str]] = field(default_factory=dict)  # capped splits: the ids the caps keep
    new_pieces: int = 0  # pieces past the ones recorded in the store (growth)

    @property
    def plan(self) -> dict[str, dict[str, int]]:
        """``{split: {"examples": n, "parts": k}}`` over every piece (the store's plan record)."""
        out: dict[str, dict[str, int]] = {name: {"examples": 0, "parts": 0} for name in self.split_names}
        for piece in self.pieces:
            for split, (_, parts, examples, _) in piece.parts.items():
                out[split]["examples"] += examples
                out[split]["parts"] += parts
        return out

    def tasks(self, splits: Sequence[str], skip: dict[str, set[str]] | None = None,
              want: dict[str, set[str]] | None = None) -> Iterator[PartTask]:
        """The parts of ``splits`` to extract, piece by piece (one piece's examples in memory at a time):
        all but those named in ``skip``; only those named in ``want`` when given."""
        from unipt.store import part_key

        skip, selected = skip or {}, set(splits)

        def needed(piece: Piece) -> bool:
            for split, (first, parts, _, _) in piece.parts.items():
                names = {part_key(i) for i in range(first, first + parts)} if split in selected else set()
                names -= skip.get(split, set())
                if want is not None:
                    names &= want.get(split, set())
                if names:
                    return True
            return False

        wanted = {i for i, piece in enumerate(self.pieces) if needed(piece)}
        if not wanted:
            return
        label_index = {name: i for i, name in enumerate(self.label_names)}
        labelled = bool(self.config.label_column or self.config.target_columns)
        draw = SplitDraw(self.config.splits)
        for read in read_pieces(self.config, self.fmt, self.shards, self.pieces, self.block_rows, wanted=wanted,
                                grow=False):
            by_split = self._by_split(read.records, draw)
            read.records.clear()  # only the split lists hold them now: each is dropped once its parts are cut
            for split in list(by_split):
                records = by_split.pop(split)
                if split not in selected:
                    continue
                first, parts, examples, start = read.piece.parts[split]
                if len(records) != examples:
                    raise ValueError(f"source {self.config.path} changed while it was being extracted: piece "
                                     f"{read.piece.shard}@{read.piece.start} now gives {len(records)} {split} "
                                     f"examples, {examples} when planned; re-run extraction")
                ordered = sorted((replace(r.example, label=targets.encode_target(self.config.task, r.target, label_index)
                                          if labelled else -1) for r in records),
                                 key=lambda ex: hash_unit(ex.id, "part"))
                for k in range(parts):
                    task = PartTask(split, first + k, start + k * self.part_size,
                                    ordered[k * self.part_size : (k + 1) * self.part_size])
                    if task.name in skip.get(split, ()) or (want is not None and task.name not in want.get(split, ())):
                        continue
                    yield task
                records = ordered = task = None  # not held while the next piece is read
            del read

    def _by_split(self, records: list[Record], draw: SplitDraw) -> dict[str, list[Record]]:
        out: dict[str, list[Record]] = {}
        for record in records:
            split = draw(record.split, record.example)
            if split in self.kept and record.example.id not in self.kept[split]:
                continue
            out.setdefault(split, []).append(record)
        return out


def plan_source(config: SourceConfig, *, part_size: int, block_rows: int = DEFAULT_BLOCK_ROWS,
                recorded: Sequence[Piece] = (), allow_new: bool = True) -> SourcePlan:
    """Read the source once, piece by piece, and plan its parts (see the module docstring).

    ``recorded``: the pieces of the store's latest source version (growth keeps them, checked); with
    ``allow_new`` False, rows past them are refused (caps: a grown source would shift the kept subset).
    """
    if block_rows < 1:
        raise ValueError(f"extract.block_rows must be >= 1, got {block_rows}")
    fmt, shards = source_shards(config)
    draw = SplitDraw(config.splits)
    pieces: list[Piece] = []
    counts: list[dict[str, int]] = []  # per piece: examples per split (before caps)
    heaps: dict[str, list[tuple[float, str, int]]] = {split: [] for split in config.max_examples}
    split_names: dict[str, None] = {}
    distinct: set[Any] = set()
    skipped: list[Skipped] = []
    rows = duplicates = conflicts = 0
    for number, read in enumerate(read_pieces(config, fmt, shards, recorded, block_rows)):
        pieces.append(read.piece)
        rows += read.piece.rows
        duplicates, conflicts = duplicates + read.duplicates, conflicts + read.conflicts
        skipped += read.skipped
        count: dict[str, int] = {}
        for record in read.records:
            split = draw(record.split, record.example)
            split_names.setdefault(split)
            count[split] = count.get(split, 0) + 1
            if record.target is not None and config.task != targets.REGRESSION:  # regression: names = columns
                distinct.update(record.target if config.task in (targets.MULTILABEL, targets.TAGGING)
                                else [record.target])
            heap = heaps.get(split)
            if heap is not None:  # the cap smallest subset hashes: a max-heap of the kept, by negated hash
                entry = (-hash_unit(record.example.id, "subset"), record.example.id, number)
                if len(heap) < config.max_examples[split]:
                    heapq.heappush(heap, entry)
                elif entry > heap[0]:
                    heapq.heapreplace(heap, entry)
        counts.append(count)
        del read  # not held while the next piece is read
    new_pieces = len(pieces) - len(recorded)
    if new_pieces and recorded and not allow_new:
        raise ValueError(f"source {config.path} has grown by {new_pieces} piece(s), but source.max_examples caps "
                         "its splits: the capped subset of a grown source is not the one extracted. Extract "
                         "the grown source into a new store, or drop the caps")
    kept_examples = sum(sum(c.values()) for c in counts)
    report_kept(config.path, kept_examples, skipped, "rows")
    if conflicts:
        log.warning("%d duplicated texts carried different labels; the first occurrence was kept", conflicts)
    unknown = sorted(set(config.max_examples) - set(split_names))
    if unknown:
        raise ValueError(f"source.max_examples names split {unknown[0]!r}; the source has {sorted(split_names)}")
    kept: dict[str, set[str]] = {}
    for split, heap in heaps.items():
        if len(heap) < sum(c.get(split, 0) for c in counts):  # the cap bites
            kept[split] = {example_id for _, example_id, _ in heap}
            per_piece: dict[int, int] = {}
            for _, _, number in heap:
                per_piece[number] = per_piece.get(number, 0) + 1
            for number, count in enumerate(counts):
                count[split] = per_piece.get(number, 0)
    _number_parts(pieces, counts, list(split_names), part_size)
    labelled = bool(config.label_column or config.target_columns)
    label_names = targets.target_names(config.task, sorted(distinct, key=repr) if config.task == targets.CLASSIFICATION
                                       else [sorted(distinct, key=repr)], _target_columns(config)) if labelled else []
    plan = SourcePlan(config, fmt, shards, pieces, part_size, block_rows, label_names, list(split_names),
                      hashlib.sha256("".join(f"{p.rows}:{p.sha256}\n" for p in pieces).encode()).hexdigest(),
                      {}, skipped, kept, new_pieces)
    examples = {split: p["examples"] for split, p in plan.plan.items()}
    plan.stats = {"rows": rows, "duplicates_dropped": duplicates, "label_conflicts": conflicts,
                  "skipped": _count_reasons(skipped), "examples": examples, "pieces": len(pieces),
                  "shards": len(shards)}
    if config.task == targets.CLASSIFICATION and labelled and len(label_names) == 1:
        warn_if_one_label(config.path, {0}, label_names, config.label_column)
    return plan


def _number_parts(pieces: list[Piece], counts: list[dict[str, int]], splits: list[str], part_size: int) -> None:
    """Give each piece its parts per split: numbered on from the pieces before it, in piece order (recorded
    pieces keep the numbers they were given: they come first and their counts are what they were)."""
    next_part = {split: 0 for split in splits}
    next_example = {split: 0 for split in splits}
    for piece, count in zip(pieces, counts):
        parts = {}
        for split in splits:
            n = count.get(split, 0)
            if n:
                k = math.ceil(n / part_size)
                parts[split] = [next_part[split], k, n, next_example[split]]
                next_part[split] += k
                next_example[split] += n
        if piece.parts and piece.parts != parts:
            raise ValueError(f"piece {piece.shard}@{piece.start} plans to {parts} now, {piece.parts} when the store "
                             "recorded it; the source's splits or dedupe changed: extract into a new store")
        piece.parts = parts
