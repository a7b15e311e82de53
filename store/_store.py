"""The feature store: a Zarr v3 group of splits made of immutable, committed parts."""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from . import _format as fmt
from . import _index
from ._dtypes import SCALE_SUFFIX, STORAGE_DTYPES, STORED_NUMPY, as_tensor, dequantize, encode
from ._claims import Claims, Owner, claim_state, list_claims
from ._provenance import check_provenance
from ._versions import latest_version
from ._wrappers import MissingObject, RecordingStore, StrictReads


_UNREAD = object()  # a lazily read record not read yet


class StoreError(RuntimeError):
    """The store is missing, incomplete, or does not hold what was asked for."""


class CorruptChunkError(StoreError):
    """A stored object is missing, fails its checksum or does not decode; the message names the split, part
    and array."""


class IncompleteStoreError(StoreError):
    """Training or scoring was asked to read splits whose extraction has not finished."""


@dataclass(frozen=True)
class PartInfo:
    """A committed part: where it lives and what it holds."""

    split: str
    name: str
    n_examples: int
    n_tokens: int
    source_start: int  # index of its first example in the split's source order
    source_stop: int
    truncated: int = 0  # examples cut to the backbone's max_length (their ids are in the commit record)
    views: int = 1  # stochastic views stored per example (1 = the eval-mode cache only)

    @property
    def index(self) -> int:
        return fmt.part_index(self.name)


@dataclass(frozen=True)
class PartFolder:
    """What one part folder of a split holds, committed or not (see :meth:`FeatureStore.part_folders`)."""

    split: str
    name: str
    state: str  # committed | uncommitted (no commit marker yet) | unreadable (metadata cut short) | damaged
    info: PartInfo | None = None  # committed parts
    detail: str = ""  # why it is unreadable or damaged
    record_sha256: str | None = None  # committed parts: their commit record's digest (None: an older unipt's)


@dataclass(frozen=True)
class SplitStatus:
    """How far extraction of one split has got (see :meth:`FeatureStore.split_status`)."""

    split: str
    committed_parts: int
    committed_examples: int
    planned_parts: int | None  # None: the store records no plan (written before unipt did) or lacks the split
    planned_examples: int | None
    uncommitted: tuple[str, ...] = ()  # part folders without a commit marker (being written, or left by a crash)
    claims: tuple[tuple[str, str], ...] = ()  # (part, "writing: pid 12 on host, run ab12cd34") per claim held

    @property
    def complete(self) -> bool:
        if self.uncommitted or self.claims:
            return False
        return self.planned_parts is None or self.committed_parts >= self.planned_parts

    def describe(self) -> str:
        if self.planned_parts is not None:
            text = (f"{self.split}: {self.committed_parts} of {self.planned_parts} parts committed "
                    f"({self.committed_examples:,} of {self.planned_examples:,} examples)")
        else:
            text = f"{self.split}: {self.committed_parts} parts committed ({self.committed_examples:,} examples)"
        if self.claims:
            text += f"; claimed: {', '.join(f'{part} ({holder})' for part, holder in self.claims)}"
        other = sorted(set(self.uncommitted) - {part for part, _ in self.claims})
        if other:
            text += f"; not committed, no claim (left by a run that stopped): {', '.join(other)}"
        return text


@dataclass(frozen=True)
class _PartsView:
    """The committed parts of a split as one reader sees them, and where it got them from."""

    parts: tuple[PartInfo, ...]
    digests: Mapping[str, str | None]  # part name -> its commit record's record_sha256
    from_index: bool  # True: from the split's index, which read_part then holds each part to


@dataclass
class PartData:
    """One decoded part. Example ``i``'s tokens of layer ``l`` are ``layers[l][offsets[i]:offsets[i+1]]``."""

    info: PartInfo
    example_id: np.ndarray  # (n,) str
    label: np.ndarray  # the task's targets (fmt.TARGETS): (n,) int64 classes, (n, C) uint8, (n, k) float32, or
    #                    (total_tokens,) int32 token tags when token_targets
    length: np.ndarray  # (n,) int32
    offsets: np.ndarray  # (n + 1,) int64
    layers: dict[int, torch.Tensor]  # layer -> (total_tokens, D_l), stored dtype (int8 for int8 stores)
    scales: dict[int, torch.Tensor] = field(default_factory=dict)  # int8 stores: layer -> (total_tokens,)
    token_targets: bool = False  # targets are per stored token (tagging), rows like the layers'

    def example(self, i: int, layer: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Example ``i``'s token rows of ``layer`` as float ``dtype`` (dequantised for int8 stores)."""
        rows = slice(int(self.offsets[i]), int(self.offsets[i + 1]))
        scale = self.scales.get(layer)
        return dequantize(self.layers[layer][rows], None if scale is None else scale[rows], dtype)


class FeatureStore:
    """A unipt feature store at a local path or any fsspec URL (``s3://``, ``memory://``, ...).

    Create one for writing with :meth:`create` (which also re-opens a matching store to resume), open
    one for reading with :meth:`open`.
    """

    def __init__(self, root: zarr.Group, url: str):
        self._root = root
        self._reads = StrictReads(root.store)  # every array is read through it: a missing chunk is damage
        self.url = url
        attrs = root.attrs.asdict()
        meta = attrs.get(fmt.ROOT_ATTR)
        if meta is None:
            raise StoreError(f"{url} is a Zarr group but not a unipt feature store (no {fmt.ROOT_ATTR!r} attribute)")
        version = meta.get("format_version")
        if version not in fmt.READABLE_VERSIONS:
            raise StoreError(
                f"{url} has store format version {version}; this unipt reads versions "
                f"{', '.join(map(str, fmt.READABLE_VERSIONS))}. Re-extract it or use the unipt release that wrote it."
            )
        recorded = attrs.get(fmt.ROOT_DIGEST_ATTR)  # None: written before unipt recorded it
        if recorded is not None and fmt.record_digest(meta) != recorded:
            raise CorruptChunkError(
                f"{url}: the store's root metadata (the {fmt.ROOT_ATTR!r} attribute of its zarr.json: labels, "
                "layers, provenance) does not match the sha256 recorded when the store was created, so it was "
                "edited or damaged since; restore zarr.json from a copy of the store, or re-extract it")
        self.meta: dict[str, Any] = meta
        self._views: dict[str, _PartsView] = {}  # split -> the parts last read (kept for good when read-only)
        self._version: Any = _UNREAD  # the source version record, read on first use (source_version)

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(cls, url: str, *, mode: str = "r", storage_options: dict | None = None) -> "FeatureStore":
        """Open an existing store; ``mode="r"`` (default) refuses every write."""
        url = _local_path(url)
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}; use FeatureStore.create to make a store")
        try:
            root = zarr.open_group(store=url, mode=mode, zarr_format=3, storage_options=storage_options)
        except (FileNotFoundError, NotADirectoryError, zarr.errors.GroupNotFoundError) as exc:
            if _is_file(url, storage_options):
                raise StoreError(f"{url} is a file, not a feature store (a folder or prefix); check the path") from exc
            raise StoreError(f"no feature store at {url}: run `unipt extract` first, or check the path") from exc
        except zarr.errors.ContainsArrayError as exc:
            raise StoreError(f"{url} is a Zarr array, not a unipt feature store (a group)") from exc
        except ValueError as exc:  # a root zarr.json that is not JSON, or not Zarr v3 metadata
            raise CorruptChunkError(f"{url}: the store's root zarr.json cannot be read ({exc}); restore it from a "
                                    "copy of the store, or re-extract it") from exc
        store = cls(root, url)
        if mode == "r":
            store.source_version()  # a reader is pinned to the source version there is when it opens
        return store

    @classmethod
    def create(
        cls,
        url: str,
        *,
        layers: Sequence[int],
        layer_widths: Sequence[int],
        dtype: str,
        label_names: Sequence[str],
        provenance: Mapping[str, Any],
        compression: str = fmt.DEFAULT_COMPRESSION,
        storage_options: dict | None = None,
        layer_shapes: Sequence[Sequence[int]] | None = None,
        plan: Mapping[str, Mapping[str, int]] | None = None,
        chunk_checksum: str | None = fmt.CHUNK_CHECKSUM,
        task: str = fmt.CLASSIFICATION,
        views: Mapping[str, Any] | None = None,
    ) -> "FeatureStore":
        """Create a store, or re-open an existing one whose provenance matches (to resume into it).

        ``layer_shapes``: one (H, W, C) per layer for a store of fixed-shape feature maps (layout "maps",
        e.g. a CNN's stage maps, C = the layer's width); None = token rows (layout "tokens").
        ``plan``: ``{split: {"examples": n, "parts": k}}`` for every split of the source, so readers can tell
        a finished split from one whose extraction stopped (:meth:`split_status`). ``chunk_checksum``:
        "crc32c" (default) ends every chunk in a checksum that every read checks; None writes none (only to
        measure what checking costs). ``task``: the kind of targets the parts hold (:data:`fmt.TASK_KINDS`);
        ``label_names`` are then the classes, labels, target names or tags. A classification store is written
        as format version 1 with no task record, as before tasks existed; the other kinds as version 2.
        ``views``: ``{"count": K, "splits": [...]}``: parts of those splits hold K stochastic views of every
        layer (``fmt.layer_key(layer, view)``); None or a count of 1 writes no views record (today's store).

        A store made from another backbone, source or extraction config is refused with the list of
        differing fields: mixing parts from two configs in one store would silently corrupt training.
        """
        url = _local_path(url)
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not a storage dtype; choose one of {STORAGE_DTYPES}")
        if compression not in fmt.COMPRESSIONS:
            raise ValueError(f"compression {compression!r} is not one of {sorted(fmt.COMPRESSIONS)}")
        if len(layers) != len(layer_widths):
            raise ValueError(f"{len(layers)} layers but {len(layer_widths)} widths")
        if task not in fmt.TASK_KINDS:
            raise ValueError(f"task {task!r} is not one of {fmt.TASK_KINDS}")
        if task != fmt.CLASSIFICATION and not label_names:
            raise ValueError(f"a {task} store needs the names of its targets (label_names), got none")
        typed = task != fmt.CLASSIFICATION  # only then version 2 and a task record: see fmt.FORMAT_VERSION
        views = _views_record(views)
        if layer_shapes is not None:
            layer_shapes = [[int(n) for n in shape] for shape in layer_shapes]
            if len(layer_shapes) != len(layers) or any(
                    len(shape) != 3 or shape[-1] != width or min(shape) < 1
                    for shape, width in zip(layer_shapes, layer_widths)):
                raise ValueError(f"layer_shapes must give one (H, W, C) per layer with C = its width; got "
                                 f"{layer_shapes} for widths {list(layer_widths)}")
        meta = {
            "format_version": fmt.FORMAT_VERSION if typed else 1,
            **({"task": {"kind": task, "names": [str(n) for n in label_names]}} if typed else {}),
            "layers": [int(l) for l in layers],
            "layer_widths": [int(w) for w in layer_widths],
            "dtype": dtype,
            "compression": compression,
            "label_names": [str(n) for n in label_names],
            # Token stores carry no layout key (it is the default), so stores written before maps existed
            # still match on resume.
            **({} if layer_shapes is None else {"layout": fmt.MAPS, "layer_shapes": layer_shapes}),
            "provenance": json.loads(json.dumps(provenance)),  # JSON-normalised, as it will read back
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **({} if plan is None else {"plan": {split: {"examples": int(p["examples"]), "parts": int(p["parts"])}
                                                 for split, p in plan.items()}}),
            **({} if chunk_checksum is None else {"chunk_checksum": chunk_checksum}),
            # Only with K > 1 views: a K = 1 store's metadata stays what it has always been, byte for byte.
            **({} if views is None else {fmt.VIEWS: views}),
        }
        if chunk_checksum not in (None, fmt.CHUNK_CHECKSUM):
            raise ValueError(f"chunk_checksum must be {fmt.CHUNK_CHECKSUM!r} or None, got {chunk_checksum!r}")
        if _is_file(url, storage_options):
            raise StoreError(f"{url} is a file; a store is a folder (or prefix): choose a new or empty location")
        if _interrupted_creation(url, storage_options):
            mode = "w"  # only a root document from a creation cut short: nothing to lose, start it again
        else:
            try:
                root = zarr.open_group(store=url, mode="r+", zarr_format=3, storage_options=storage_options)
                mode = None
            except (FileNotFoundError, zarr.errors.GroupNotFoundError):
                mode = "w-"  # fails on anything already there: never clear a folder that is not a store
        if mode is not None:
            try:
                # The attributes go in with the group's one metadata write: a store is a unipt store from its
                # first byte, never a bare group that a crash could leave behind.
                root = zarr.open_group(store=url, mode=mode, zarr_format=3, storage_options=storage_options,
                                       attributes={fmt.ROOT_ATTR: meta, fmt.ROOT_DIGEST_ATTR: fmt.record_digest(meta)})
                return cls(root, url)
            except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError) as exc:
                root = _concurrently_created(url, storage_options)
                if root is None:
                    raise StoreError(f"{url} exists and is not a unipt store; choose a new or empty location") from exc
        existing = cls(root, url)
        # The plan follows from the source and its caps (which the provenance pins); the checksum setting
        # stays the store's own, so a store written before checksums existed resumes as it is.
        check_provenance(
            {k: v for k, v in existing.meta.items() if k not in _STORE_OWN},
            {k: v for k, v in meta.items() if k not in _STORE_OWN},
            what=f"cannot resume into {url}",
            hint="Extract into a new store URL, or delete the old store if it is no longer needed.",
        )
        return existing

    # ----------------------------------------------------------------- metadata
    @property
    def layers(self) -> list[int]:
        """Hidden-state layers stored (0 = embedding output)."""
        return list(self.meta["layers"])

    @property
    def layer_widths(self) -> dict[int, int]:
        return dict(zip(self.meta["layers"], self.meta["layer_widths"]))

    @property
    def dtype(self) -> str:
        return self.meta["dtype"]

    @property
    def layout(self) -> str:
        """"tokens" (ragged token rows, CSR) or "maps" (one fixed-shape (H, W, C) map per example)."""
        return self.meta.get("layout", fmt.TOKENS)

    @property
    def row_shapes(self) -> dict[int, tuple[int, ...]]:
        """Shape of one stored row per layer: (D,) for tokens, (H, W, C) for maps."""
        if self.layout == fmt.MAPS:
            return {layer: tuple(shape) for layer, shape in zip(self.meta["layers"], self.meta["layer_shapes"])}
        return {layer: (width,) for layer, width in self.layer_widths.items()}

    @property
    def label_names(self) -> list[str]:
        """The task's target names: classes (classification, multilabel), targets (regression) or tags."""
        return list(self.meta["label_names"])

    @property
    def task(self) -> str:
        """The kind of targets the parts hold (fmt.TASK_KINDS); stores without a task record: classification."""
        return self.meta.get("task", {}).get("kind", fmt.CLASSIFICATION)

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.meta["provenance"])

    def views(self, split: str) -> int:
        """Stochastic views stored per example of ``split``: ``extract.views`` for the splits extracted with
        views (by default the train split), 1 (the eval-mode cache alone) for the others and for stores
        without views. View 0 is always the eval-mode cache."""
        record = self.meta.get(fmt.VIEWS)
        return int(record["count"]) if record and split in record["splits"] else 1

    @property
    def view_splits(self) -> list[str]:
        """The splits whose parts hold more than one view ([] for a store without views)."""
        record = self.meta.get(fmt.VIEWS)
        return list(record["splits"]) if record else []

    @property
    def read_only(self) -> bool:
        return self._root.read_only

    @property
    def plan(self) -> dict[str, dict[str, int]] | None:
        """``{split: {"examples": n, "parts": k}}`` of the whole source, as extraction planned it: the latest
        source version's (:meth:`source_version`), else the one recorded at creation; None for stores
        written before unipt recorded it."""
        version = self.source_version()
        plan = version["plan"] if version is not None else self.meta.get("plan")
        return None if plan is None else {split: dict(p) for split, p in plan.items()}

    def source_version(self, *, refresh: bool = False) -> dict[str, Any] | None:
        """The newest record of the source versions this store was extracted from (stores planned piece by
        piece, :mod:`._versions`; None for others). Read once per opened store: a reader keeps the version
        it first saw while the store grows (``refresh`` reads it again, as a writer does)."""
        if self._version is _UNREAD or refresh:
            self._version = latest_version(self._root.store, self._root.path)
        return self._version

    @property
    def chunk_checksum(self) -> str | None:
        """"crc32c" when every chunk carries a checksum that reads check; None for older stores."""
        return self.meta.get("chunk_checksum")

    @property
    def metadata_checksummed(self) -> bool:
        """Whether the root metadata carries the sha256 that opening checks (stores written before: no)."""
        return fmt.ROOT_DIGEST_ATTR in self._root.attrs

    def splits(self) -> list[str]:
        # Listed directly rather than through zarr's member scan, which warns about (and a strict reader
        # fails on) the `*.partial` temporary file a killed write can leave beside the split folders.
        return [name for name in _child_names(self._root, None)
                if not name.startswith("_") and self._split_group(name, create=False) is not None]

    def parts(self, split: str) -> list[PartInfo]:
        """Committed parts of ``split`` in index order. Uncommitted (half-written) parts are invisible; a part
        whose commit record fails its checksum raises :class:`CorruptChunkError` naming it.

        Read from the split's index (two requests, whatever the number of parts) when it is complete, else by
        listing the split. A store opened read-only keeps the first list it read for each split, so one
        reader sees one consistent set of parts while extraction adds more; ``mode="r+"`` re-reads each time.
        """
        return list(self._parts_view(split).parts)

    def parts_digest(self, split: str) -> str:
        """sha256 over the (name, commit record sha256) of the parts :meth:`parts` gives: what a training run
        records to say exactly which parts it read."""
        view = self._parts_view(split)
        return _index.parts_digest((info.name, view.digests[info.name]) for info in view.parts)

    def _parts_view(self, split: str) -> _PartsView:
        view = self._views.get(split)
        if view is not None and self.read_only:
            return view
        planned = (self.plan or {}).get(split, {}).get("parts")
        entries = _index.trusted_entries(self._root.store, self._root.path.strip("/"), split, planned)
        if entries is not None:
            view = _PartsView(tuple(_info_of(split, entry) for entry in entries.values()),
                              {name: entry["record_sha256"] for name, entry in entries.items()}, from_index=True)
        else:
            folders = [f for f in self.part_folders(split, strict=True) if f.info is not None]
            if planned is not None and self.source_version() is not None:
                # The parts of this reader's source version only: a store that grew since holds more.
                folders = [f for f in folders if f.info.index < planned]
            view = _PartsView(tuple(f.info for f in folders), {f.name: f.record_sha256 for f in folders},
                              from_index=False)
        self._views[split] = view
        return view

    def part_folders(self, split: str, *, strict: bool = False) -> list[PartFolder]:
        """Every part folder of ``split`` in index order, committed or not, with its state. ``strict``: raise
        on a damaged part instead of reporting it."""
        group = self._split_group(split, create=False)
        if group is None:
            return []
        return [self._part_folder(group, split, name, strict=strict) for name in _child_names(group)]

    def committed(self, split: str) -> set[str]:
        return {p.name for p in self.parts(split)}

    def is_committed(self, split: str, name: str) -> bool:
        """Whether part ``name`` of ``split`` is committed: one metadata read, not a listing of the split."""
        group = self._split_group(split, create=False)
        return group is not None and self._part_folder(group, split, name, strict=True).info is not None

    def split_status(self, split: str) -> SplitStatus:
        """How much of ``split`` is committed, against the extraction plan when the store records one."""
        view = self._parts_view(split)
        if view.from_index:  # every planned part is committed: nothing else to list
            folders, committed = [], list(view.parts)
        else:
            folders = self.part_folders(split, strict=True)
            committed = [f.info for f in folders if f.info is not None]
        planned = (self.plan or {}).get(split)
        claims = [(part, f"{claim_state(document)}: {_claim_owner(document)}")
                  for claim_split, part, document in self.active_claims() if claim_split == split]
        return SplitStatus(
            split, len(committed), sum(p.n_examples for p in committed),
            None if planned is None else planned["parts"], None if planned is None else planned["examples"],
            uncommitted=tuple(f.name for f in folders if f.info is None), claims=tuple(claims))

    def check_complete(self, splits: Sequence[str], *, allow_incomplete: bool = False,
                       warn: Callable[[str], None] | None = None) -> list[str]:
        """Refuse to read ``splits`` unless their extraction has finished; returns the splits to use.

        A split the store's plan names but has not (fully) committed, or one with parts still claimed or
        left uncommitted, is refused with what is missing (:class:`IncompleteStoreError`); with
        ``allow_incomplete`` the same text goes to ``warn`` and the committed parts are used. A split the
        source never had (not in the plan) is dropped with a warning: no extraction would ever make it.
        Stores that record no plan are judged by their claims and uncommitted parts alone.
        """
        warn = warn or (lambda message: None)
        plan, usable, problems = self.plan, [], []
        for split in splits:
            if plan is not None and split not in plan:
                warn(f"store {self.url} has no split {split!r}: its source has {sorted(plan)}")
                continue
            status = self.split_status(split)
            if plan is None and not (status.committed_parts or status.claims or status.uncommitted):
                warn(f"store {self.url} has no split {split!r} (it holds {self.splits()})")
                continue
            usable.append(split)
            if not status.complete:
                problems.append(status.describe())
        if problems:
            message = (f"store {self.url} is not completely extracted: " + "; ".join(problems) + ". Let the "
                       "extraction finish (re-running it resumes: a claim whose run died is taken over)")
            if not allow_incomplete:
                raise IncompleteStoreError(message + ", or allow training on the committed parts only "
                                           "(`--allow-incomplete`)")
            warn(message + "; using the committed parts only, as asked")
        return usable

    def num_examples(self, split: str) -> int:
        return sum(p.n_examples for p in self.parts(split))

    def num_tokens(self, split: str) -> int:
        return sum(p.n_tokens for p in self.parts(split))

    def truncated(self, split: str) -> list[str]:
        """Ids of the examples of ``split`` that extraction cut to the backbone's max_length."""
        group = self._split_group(split, create=False)
        return [example_id for info in self.parts(split)
                for example_id in group[info.name].attrs[fmt.COMMIT_ATTR].get("truncated", [])]

    # ----------------------------------------------------------------- bad input and claims
    def skipped(self) -> list[dict[str, Any]]:
        """Source rows extraction left out as bad input: ``{"example_id", "source_row", "reason"}`` each, in
        source-row order. Rows found bad while reading the source are in the ``_skipped`` group; images found
        broken only when decoded are in the commit record of the part they belonged to."""
        records = [{"example_id": str(i), "source_row": int(r), "reason": str(why)}
                   for i, r, why in self._part_skipped()]
        try:
            attrs = self._root[fmt.SKIPPED].attrs.asdict()
        except (KeyError, FileNotFoundError):
            attrs = {}
        if fmt.COMMIT_ATTR in attrs:
            where = f"{self.url} {fmt.SKIPPED}"
            problem = _commit_problem(attrs)
            if problem is not None:
                raise CorruptChunkError(f"{where}: {problem}")
            path, n = _join(self._root.path, fmt.SKIPPED), attrs[fmt.COMMIT_ATTR]["n"]
            ids, rows, reasons = (_read_array(self._reads, path, key, where, n)
                                  for key in (fmt.EXAMPLE_ID, fmt.SOURCE_ROW, fmt.REASON))
            records += [{"example_id": str(i), "source_row": int(r), "reason": str(why)}
                        for i, r, why in zip(ids, rows, reasons)]
        return sorted(records, key=lambda r: r["source_row"])

    def _part_skipped(self) -> list[list]:
        """The skip records of every committed part: one metadata read per part."""
        out = []
        for split in self.splits():
            group = self._split_group(split, create=False)
            for name in _child_names(group):
                try:
                    commit = group[name].attrs.get(fmt.COMMIT_ATTR)
                except Exception:  # a metadata document cut short by a crash: not committed
                    continue
                out += (commit or {}).get("skipped", [])
        return out

    def record_skipped(self, records: Sequence[tuple[str, int, str]]) -> None:
        """Record the source rows left out as bad input, as ``(example_id, source_row, reason)``.

        Written once per store, columns first and the commit attribute last (a crash in between leaves no
        record, and the next run writes it again). The list follows from the source and the policy, which
        the provenance pins, so every run of one store would write the same one.
        """
        if not records or self.skipped():
            return
        group = zarr.open_group(store=self._root.store, path=_join(self._root.path, fmt.SKIPPED), mode="w",
                                zarr_format=3)
        ids, rows, reasons = zip(*records)
        for key, values, dtype in ((fmt.EXAMPLE_ID, ids, str), (fmt.SOURCE_ROW, rows, "int64"), (fmt.REASON, reasons, str)):
            values = np.asarray(values, dtype=object if dtype is str else dtype)
            compressor = _STRING_COMPRESSOR if dtype is str else _compressor(values.dtype.itemsize, self.meta["compression"])
            _write_column(group, key, values, dtype, _byte_codecs(compressor, self.chunk_checksum))
        counts: dict[str, int] = {}
        for reason in reasons:
            counts[reason] = counts.get(reason, 0) + 1
        commit = {"n": len(records), "reasons": counts}
        group.attrs[fmt.COMMIT_ATTR] = {**commit, fmt.RECORD_DIGEST: _commit_digest(None, commit)}

    def claims(self, run: str, ttl: float) -> Claims:
        """This process's claims on parts of this store, for extraction run ``run`` (see :mod:`._claims`)."""
        if self.read_only:
            raise StoreError(f"{self.url} is open read-only; open it with mode='r+' to claim parts")
        return Claims(self._root.store, self._root.path, Owner.current(run), ttl)

    def active_claims(self) -> list[tuple[str, str, dict[str, Any]]]:
        """Parts some run has claimed and not yet committed: (split, part, claim document)."""
        return list_claims(self._root.store, self._root.path)

    # ----------------------------------------------------------------- writing
    def part_writer(
        self, split: str, index: int, *, n_examples: int, n_tokens: int, source_start: int, run: str = ""
    ) -> "PartWriter":
        """Start (or restart) part ``index`` of ``split``. Anything already under its name is discarded.

        Refuses to touch a committed part: committed parts are immutable. Once committed, the part is entered
        in the split's index journal, under ``run`` (the extraction run's id, if any).
        """
        if self.read_only:
            raise StoreError(f"{self.url} is open read-only; open it with mode='r+' to write")
        split_group = self._split_group(split, create=True)
        name = fmt.part_key(index)
        if self._part_folder(split_group, split, name, strict=False).state in ("committed", "damaged"):
            raise StoreError(f"{split}/{name} is already committed in {self.url}; committed parts are immutable")
        if self.layout == fmt.MAPS and n_tokens != n_examples:
            raise ValueError(f"a maps store holds one row per example: n_tokens ({n_tokens}) must equal "
                             f"n_examples ({n_examples})")
        info = PartInfo(split, name, n_examples, n_tokens, source_start, source_start + n_examples,
                        views=self.views(split))
        # Written through a store that records the sha256 of every object as it is stored: the commit
        # marker lists them, and `verify` re-hashes what is there now (no read-back at write time).
        recorder = RecordingStore(self._root.store)
        group = zarr.open_group(store=recorder, path=_join(self._root.path, split, name), mode="w", zarr_format=3)
        store, root = self._root.store, self._root.path.strip("/")
        journal = lambda info, commit: _index.write_journal_entry(  # noqa: E731
            store, root, split, _index.entry_of(info, commit, writer=run))
        return PartWriter(group, info, self.row_shapes, self.dtype, self.meta["compression"], recorder,
                          checksum=self.chunk_checksum, task=self.task, n_targets=len(self.label_names),
                          journal=journal)

    # ----------------------------------------------------------------- reading
    def read_part(self, part: PartInfo | tuple[str, str], layers: Iterable[int] | None = None, *,
                  view: int = 0) -> PartData:
        """Decode one committed part; ``layers`` (default: all stored) limits which layers are decoded;
        ``view``: which stochastic view of them (0 = the eval-mode cache, the only one most stores hold)."""
        split, name = (part.split, part.name) if isinstance(part, PartInfo) else part
        split_group = self._split_group(split, create=False)
        folder = None if split_group is None else self._part_folder(split_group, split, name, strict=True)
        info = None if folder is None else folder.info
        seen = self._views.get(split)
        if seen is not None and seen.from_index and name in seen.digests and (
                info is None or folder.record_sha256 != seen.digests[name]):
            found = ("no committed part" if info is None
                     else f"a part whose commit record_sha256 is {folder.record_sha256}")
            raise CorruptChunkError(
                f"{self.url} {split}/{name}: the split's index lists it with commit record_sha256 "
                f"{seen.digests[name]}, but the store holds {found} there (it was removed or rewritten behind the "
                f"index's back); run `unipt store index {self.url}` to rebuild the index from the parts")
        if info is None:
            raise StoreError(f"{split}/{name} is not a committed part of {self.url}")
        layers = self.layers if layers is None else list(layers)
        missing = sorted(set(layers) - set(self.layers))
        if missing:
            raise StoreError(f"layers {missing} are not in {self.url}; it stores layers {self.layers}")
        if not 0 <= view < info.views:
            raise StoreError(f"{split}/{name} of {self.url} holds {info.views} view(s) (0 .. {info.views - 1}); "
                             f"view {view} was asked for")
        path, where = _join(self._root.path, split, name), f"{self.url} {split}/{name}"
        n, rows = info.n_examples, info.n_tokens
        read = lambda key, length: _read_array(self._reads, path, key, where, length)  # noqa: E731
        target, target_dtype, per = fmt.TARGETS[self.task]
        columns = {key: read(key, length) for key, length in
                   ((fmt.EXAMPLE_ID, n), (target, rows if per == "token" else n), (fmt.LENGTH, n), (fmt.OFFSETS, n + 1))}
        _check_columns(columns, rows, where)
        decoded, scales = {}, {}
        for layer in layers:
            key = fmt.layer_key(layer, view)
            decoded[layer] = as_tensor(read(key, rows), self.dtype)
            if self.dtype == "int8":
                scales[layer] = torch.from_numpy(read(key + SCALE_SUFFIX, rows))
        return PartData(
            info=info,
            example_id=columns[fmt.EXAMPLE_ID].astype(object),  # numpy StringDType -> python str
            label=columns[target].astype(target_dtype, copy=False),
            length=columns[fmt.LENGTH].astype(np.int32),
            offsets=columns[fmt.OFFSETS].astype(np.int64),
            layers=decoded,
            scales=scales,
            token_targets=per == "token",
        )

    # ----------------------------------------------------------------- internals
    def _split_group(self, split: str, *, create: bool) -> zarr.Group | None:
        try:
            group = self._root[split]
            if isinstance(group, zarr.Group):
                return group
        except (KeyError, FileNotFoundError):
            pass
        if not create:
            return None
        try:
            return self._root.create_group(split)
        except (zarr.errors.ContainsGroupError, FileExistsError):
            return self._root[split]  # another run extracting into this store created it first

    def _part_folder(self, split_group: zarr.Group, split: str, name: str, *, strict: bool) -> PartFolder:
        """One part folder's state from its metadata document (one read)."""
        try:
            attrs = split_group[name].attrs.asdict()
        except KeyError:
            return PartFolder(split, name, "uncommitted", detail="no metadata document yet")
        except Exception as exc:  # a metadata document cut short by a crash reads as "not committed"
            return PartFolder(split, name, "unreadable", detail=f"its zarr.json cannot be read ({type(exc).__name__})")
        commit = attrs.get(fmt.COMMIT_ATTR)
        if commit is None:
            return PartFolder(split, name, "uncommitted")
        problem = _commit_problem(attrs)
        if problem is not None:
            if strict:
                raise CorruptChunkError(f"{self.url} {split}/{name}: {problem}; `unipt store rm-part {self.url} "
                                        f"{split} {name}` and re-run extraction to redo it")
            return PartFolder(split, name, "damaged", detail=problem)
        info = PartInfo(split, name, commit["n_examples"], commit["n_tokens"], commit["source_start"],
                        commit["source_stop"], len(commit.get("truncated", ())), int(commit.get(fmt.VIEWS, 1)))
        return PartFolder(split, name, "committed", info, record_sha256=commit.get(fmt.RECORD_DIGEST))


# Zarr skips chunks equal to the fill value by default; a part stores every chunk, so that a missing
# object always means damage (an all-zero label column is a real column, not an absent one).
_ALWAYS_WRITE = {"write_empty_chunks": True}
# Root metadata that is the store's own rather than the extraction's: left out when a resuming run's
# metadata is compared with the store's (the plan follows from the provenance; the checksum setting stays
# as the store was created, so a store written before checksums resumes as it is).
_STORE_OWN = ("plan", "chunk_checksum")
# What Zarr picks for variable-length strings by default, named so that the checksum can follow it.
_STRING_COMPRESSOR = ZstdCodec(level=0, checksum=False)


class PartWriter:
    """Writes one part: per-layer token rows in order, then the per-example columns, then the commit marker.

    Rows arrive in batches (``append``) and are written in shard-aligned blocks, so each stored object is
    written exactly once (a partial write into a Zarr shard would read, merge and rewrite it). A row is one
    token (D,) or, in a maps store, one example's whole (H, W, C) map: ``row_shapes`` says which per layer.
    A part of ``info.views`` > 1 views takes every view's rows (``append(rows, view=v)``, in the same storage
    order for every view) and commits only once all of them are written.
    """

    def __init__(self, group: zarr.Group, info: PartInfo, row_shapes: Mapping[int, tuple[int, ...]], dtype: str,
                 compression: str = fmt.DEFAULT_COMPRESSION, recorder: RecordingStore | None = None, *,
                 checksum: str | None = fmt.CHUNK_CHECKSUM, task: str = fmt.CLASSIFICATION, n_targets: int = 0,
                 journal: Callable[[PartInfo, dict[str, Any]], None] | None = None):
        self.group, self.info, self.dtype = group, info, dtype
        self.journal = journal  # called with (info, commit record) once the part is committed
        self.task, self.n_targets = task, n_targets
        self.compression, self.recorder, self.checksum = compression, recorder, checksum
        self.declared = {"n_examples": info.n_examples, "n_tokens": info.n_tokens,
                         "source_start": info.source_start, "source_stop": info.source_stop}
        group.attrs[fmt.PART_ATTR] = self.declared
        self._layers = list(row_shapes)
        self._arrays: dict[str, zarr.Array] = {}  # array key -> array (a layer, and its scales for int8)
        self._pending: dict[str, list[np.ndarray]] = {}
        self._pending_rows: dict[str, int] = {}
        self._written: dict[str, int] = {}
        self._block_rows: dict[str, int] = {}
        self.view_bytes: dict[int, int] = {}  # after finish: stored bytes of each view's layer arrays
        stored = STORED_NUMPY[dtype]
        # View 0's arrays first, exactly as a part without views has them; then each further view's.
        for view in range(info.views):
            for layer, row_shape in row_shapes.items():
                key = fmt.layer_key(layer, view)
                row_shape = tuple(row_shape)
                chunk_rows, shard_rows = _chunk_layout(math.prod(row_shape), stored.itemsize, info.n_tokens)
                self._add_array(key, row_shape, stored, chunk_rows, shard_rows)
                if dtype == "int8":  # one scale per token (per map position), laid out like its layer
                    self._add_array(key + SCALE_SUFFIX, row_shape[:-1], np.dtype("float32"), chunk_rows, shard_rows)

    def _add_array(self, key: str, row_shape: tuple[int, ...], dtype: np.dtype, chunk_rows: int, shard_rows: int) -> None:
        self._arrays[key] = self.group.create_array(
            key, shape=(self.info.n_tokens, *row_shape), dtype=dtype, chunks=(chunk_rows, *row_shape),
            shards=(shard_rows, *row_shape), compressors=_byte_codecs(_compressor(dtype.itemsize, self.compression), self.checksum),
            fill_value=0, config=_ALWAYS_WRITE,
        )
        self._pending[key], self._pending_rows[key], self._written[key] = [], 0, 0
        self._block_rows[key] = shard_rows

    def append(self, rows: Mapping[int, torch.Tensor | np.ndarray], view: int = 0) -> None:
        """Append rows ``(t, *row_shape_l)`` for every layer (same ``t`` for all), in storage order, to view
        ``view`` (0 = the eval-mode cache; views >= 1 only in a part of several views)."""
        if set(rows) != set(self._layers):
            raise ValueError(f"expected rows for layers {sorted(self._layers)}, got {sorted(rows)}")
        if not 0 <= view < self.info.views:
            raise ValueError(f"{self.info.split}/{self.info.name} holds {self.info.views} view(s); got rows for "
                             f"view {view}")
        for layer, block in rows.items():
            key = fmt.layer_key(layer, view)
            where = f"layer {layer}{f' (view {view})' if view else ''} of {self.info.split}/{self.info.name}"
            encoded = encode(torch.as_tensor(block), self.dtype, where)
            for suffix, values in encoded.items():
                self._pending[key + suffix].append(values)
                self._pending_rows[key + suffix] += values.shape[0]
                self._flush(key + suffix, final=False)

    def finish(self, example_id: Sequence[str], label: Sequence | np.ndarray, length: Sequence[int], *,
               truncated: Sequence[str] = (), skipped: Sequence[tuple[str, int, str]] = (),
               before_commit: Callable[[], None] | None = None) -> PartInfo:
        """Write the per-example columns and then the commit marker. Returns the committed part's info.

        ``label``: the task's targets in storage order (fmt.TARGETS): one class index per example
        (classification), one multi-hot row per example (multilabel), one row of floats per example
        (regression), or one tag index per stored token (tagging; ``fmt.IGNORE_INDEX`` where not scored).

        ``truncated``: ids of examples cut to the backbone's max_length (recorded in the commit).
        ``skipped``: (example id, source row, reason) of the part's source examples left out as bad input
        when they were prepared (an image that does not decode); recorded in the commit.
        ``before_commit``: called just before the marker is written; raising there leaves the part
        uncommitted (extraction checks that it still holds the part's claim).
        """
        length = np.asarray(length, dtype=np.int32)
        n = self.info.n_examples
        column, dtype, per = fmt.TARGETS[self.task]
        targets = np.asarray(label, dtype=dtype)
        rows = self.info.n_tokens if per == "token" else n
        if not (len(example_id) == len(length) == n) or len(targets) != rows:
            raise ValueError(f"part {self.info.name}: expected {n} ids/lengths and {rows} target rows, got "
                             f"{len(example_id)}/{len(length)} and {len(targets)}")
        width = () if self.task in (fmt.CLASSIFICATION, fmt.TAGGING) else (self.n_targets,)
        if targets.shape[1:] != width:
            raise ValueError(f"part {self.info.name}: {self.task} targets must have shape (rows, *{width}), got "
                             f"{targets.shape}")
        for key in self._arrays:  # every view's arrays: a part missing any view's rows never commits
            self._flush(key, final=True)
            if self._written[key] != self.info.n_tokens:
                raise ValueError(f"{key}: wrote {self._written[key]} rows, expected {self.info.n_tokens}")
        if int(length.sum()) != self.info.n_tokens:
            raise ValueError(f"lengths sum to {int(length.sum())}, expected {self.info.n_tokens} tokens")
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(length, out=offsets[1:])
        self._write_column(fmt.OFFSETS, offsets)
        self._write_column(fmt.LENGTH, length)
        self._write_column(column, targets)
        self._write_column(fmt.EXAMPLE_ID, np.asarray([str(i) for i in example_id], dtype=object), dtype=str)
        # The commit marker goes last: until this line, readers do not see the part. It lists the sha256 of
        # every object written for the part (the part's own metadata document, rewritten here, excepted).
        if before_commit is not None:
            before_commit()
        prefix = self.group.store_path.path + "/"
        objects = {} if self.recorder is None else {
            key[len(prefix):]: digest for key, digest in sorted(self.recorder.digests.items())
            if key.startswith(prefix) and key != prefix + "zarr.json"}
        commit = {
            "n_examples": n,
            "n_tokens": self.info.n_tokens,
            "source_start": self.info.source_start,
            "source_stop": self.info.source_stop,
            "committed": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "truncated": [str(i) for i in truncated],
            **({"skipped": [[str(i), int(row), str(why)] for i, row, why in skipped]} if skipped else {}),
            **({fmt.VIEWS: self.info.views} if self.info.views > 1 else {}),
            "sha256": objects,
        }
        # The record vouches for itself and the declared counts beside it: an edited n_examples, source
        # range or object digest no longer matches (the objects' own digests cover everything else).
        commit[fmt.RECORD_DIGEST] = _commit_digest(self.declared, commit)
        if self.recorder is not None:
            self.view_bytes = {view: sum(size for key, size in self.recorder.sizes.items()
                                         if _view_of(key[len(prefix):]) == view) for view in range(self.info.views)}
        self.group.attrs[fmt.COMMIT_ATTR] = commit
        committed = replace(self.info, truncated=len(truncated))
        if self.journal is not None:  # after the marker: an index entry never names an uncommitted part
            self.journal(committed, commit)
        return committed

    def _write_column(self, key: str, values: np.ndarray, dtype: Any = None) -> None:
        compressor = _compressor(values.dtype.itemsize, self.compression) if dtype is None else _STRING_COMPRESSOR
        _write_column(self.group, key, values, dtype, _byte_codecs(compressor, self.checksum))

    def _flush(self, key: str, *, final: bool) -> None:
        block_rows = self._block_rows[key]
        while self._pending_rows[key] >= block_rows or (final and self._pending_rows[key] > 0):
            pending = self._pending[key]
            buffered = np.concatenate(pending) if len(pending) > 1 else pending[0]
            take = min(block_rows, buffered.shape[0])
            start = self._written[key]
            if start + take > self.info.n_tokens:
                raise ValueError(f"{key}: more rows than the {self.info.n_tokens} tokens declared")
            self._arrays[key][start : start + take] = buffered[:take]
            self._written[key] += take
            rest = buffered[take:]
            self._pending[key] = [rest] if rest.shape[0] else []
            self._pending_rows[key] = rest.shape[0]


def _info_of(split: str, entry: Mapping[str, Any]) -> PartInfo:
    return PartInfo(split, entry["name"], int(entry["n_examples"]), int(entry["n_tokens"]), int(entry["source_start"]),
                    int(entry["source_stop"]), int(entry["truncated"]), int(entry["views"]))


def _view_of(key: str) -> int | None:
    """The view whose layer data a part's object ``key`` ("layer_003_view1/c/0") holds; None for columns."""
    array = key.split("/", 1)[0]
    if not array.startswith("layer_"):
        return None
    name = array[: -len(SCALE_SUFFIX)] if array.endswith(SCALE_SUFFIX) else array
    _, _, view = name.partition(fmt.VIEW_SUFFIX)
    return int(view) if view else 0


def _views_record(views: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The root "views" record, checked; None when there is nothing beyond view 0."""
    if views is None:
        return None
    count, splits = views.get("count"), views.get("splits")
    if not isinstance(count, int) or count < 1 or not isinstance(splits, (list, tuple)) or not all(
            isinstance(split, str) for split in splits) or set(views) - {"count", "splits"}:
        raise ValueError(f"views must be {{'count': K >= 1, 'splits': [split names]}}, got {dict(views)}")
    if count == 1 or not splits:
        return None
    return {"count": count, "splits": sorted(set(splits))}


def _chunk_layout(row_values: int, itemsize: int, n_rows: int) -> tuple[int, int]:
    """Rows per inner chunk (~CHUNK_BYTES) and per shard (~SHARD_BYTES, a multiple of the chunk)."""
    row_bytes = row_values * itemsize
    chunk_rows = max(1, fmt.CHUNK_BYTES // row_bytes)
    chunks_per_shard = max(1, fmt.SHARD_BYTES // fmt.CHUNK_BYTES)
    # A small part gets one shard no bigger than it needs (rounded up to whole chunks).
    needed_chunks = max(1, math.ceil(n_rows / chunk_rows))
    chunk_rows = min(chunk_rows, max(1, n_rows))
    return chunk_rows, chunk_rows * min(chunks_per_shard, needed_chunks)


def _compressor(itemsize: int, compression: str) -> BloscCodec:
    cname, clevel = fmt.COMPRESSIONS[compression]
    # Bit shuffle for multi-byte values (measured smaller for float32/float16/bfloat16 on both codecs); none
    # for int8, where it measured larger (0.92 vs 0.83 bytes/value with zstd) and byte shuffle is a no-op.
    return BloscCodec(cname=cname, clevel=clevel, shuffle="bitshuffle" if itemsize > 1 else "noshuffle",
                      typesize=itemsize)


def _byte_codecs(compressor, checksum: str | None) -> list:
    """An array's bytes-to-bytes codecs: its compressor, then the chunk checksum when the store has one
    (innermost last: the checksum covers the compressed bytes, so a read checks it before decompressing)."""
    return [compressor, Crc32cCodec()] if checksum == fmt.CHUNK_CHECKSUM else [compressor]


def _write_column(group: zarr.Group, key: str, values: np.ndarray, dtype: Any, compressors: list) -> None:
    """A one-chunk array holding ``values`` (a per-example column, a skip record)."""
    arr = group.create_array(key, shape=values.shape, dtype=dtype or values.dtype,
                             chunks=tuple(max(1, n) for n in values.shape),
                             compressors=compressors, config=_ALWAYS_WRITE)
    if values.shape[0]:
        arr[:] = values


_REDO = "delete the part (`unipt store rm-part`) and re-run extraction to redo it"


def _read_array(reads: StrictReads, group_path: str, key: str, where: str, length: int) -> np.ndarray:
    """Decode the array ``key`` of the group at ``group_path`` through the strict reader, so a missing chunk
    object is refused (Zarr would read it back as fill values) and a chunk failing its checksum is named;
    ``length``: the rows the array must have. Errors name the part (``where``) and the array."""
    try:
        array = zarr.open_array(store=reads, path=_join(group_path, key), mode="r", zarr_format=3)
        values = array[...]
    except MissingObject as exc:
        relative = exc.key[len(group_path) + 1:] if exc.key.startswith(group_path + "/") else exc.key
        raise CorruptChunkError(f"{where}/{key}: the stored object {relative} is missing; {_REDO}") from exc
    except (FileNotFoundError, zarr.errors.ArrayNotFoundError, zarr.errors.NodeTypeValidationError) as exc:
        raise CorruptChunkError(f"{where}: array {key!r} is missing; {_REDO}") from exc
    except Exception as exc:  # checksum and decoding errors surface as codec-specific exception types
        checksum = "checksum" in str(exc).lower()
        what = "fails its checksum (its bytes changed since they were written)" if checksum else "failed to decode"
        raise CorruptChunkError(f"{where}/{key} {what} ({type(exc).__name__}: {exc}); {_REDO}") from exc
    if values.shape[0] != length:
        raise CorruptChunkError(f"{where}/{key} has {values.shape[0]} rows, expected {length}; {_REDO}")
    return values


def _check_columns(columns: Mapping[str, np.ndarray], n_tokens: int, where: str) -> None:
    """The per-example columns agree with each other and with the commit record's token count."""
    offsets, length = columns[fmt.OFFSETS].astype(np.int64), columns[fmt.LENGTH].astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != n_tokens or not np.array_equal(np.diff(offsets), length):
        raise CorruptChunkError(f"{where}: offsets and length do not describe the part's {n_tokens} token rows "
                                f"(offsets end at {int(offsets[-1])}, lengths sum to {int(length.sum())}); {_REDO}")


def _commit_digest(declared: Mapping[str, Any], commit: Mapping[str, Any]) -> str:
    return fmt.record_digest({"part": declared, "commit": {k: v for k, v in commit.items() if k != fmt.RECORD_DIGEST}})


def _commit_problem(attrs: Mapping[str, Any]) -> str | None:
    """Why a part's commit record cannot be trusted, or None. Records written before unipt checksummed
    them carry no digest and are taken as they are."""
    commit = attrs[fmt.COMMIT_ATTR]
    recorded = commit.get(fmt.RECORD_DIGEST) if isinstance(commit, Mapping) else None
    if not isinstance(commit, Mapping) or (recorded is not None
                                           and _commit_digest(attrs.get(fmt.PART_ATTR), commit) != recorded):
        return "its commit record does not match the checksum written with it (it was edited or damaged)"
    return None


def _claim_owner(document: Mapping[str, Any]) -> str:
    owner = document.get("owner", {})
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, run {str(owner.get('run', '?'))[:8]}"


def _local_path(url: str) -> str:
    """``file://`` URLs become plain paths: Zarr's LocalStore creates folders as it writes; fsspec's local
    filesystem, reached through a URL, does not."""
    return url[len("file://"):] if url.startswith("file://") else url


def _is_file(url: str, storage_options: dict | None) -> bool:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        return fs.isfile(path)
    except (OSError, ValueError):
        return False  # cannot look: the caller's own error stands


# Zarr's LocalStore writes a document through "<name>.<uuid4 hex>.partial" (Path.with_suffix) then renames it.
_ROOT_WRITE_TEMP = re.compile(r"zarr\.[0-9a-f]{32}\.partial")


def _interrupted_creation(url: str, storage_options: dict | None) -> bool:
    """True when ``url`` holds nothing but what a process killed while creating the store leaves: temporary
    files of Zarr's atomic write of the root document (LocalStore writes ``zarr.<32 hex digits>.partial`` and
    renames it), and at most a root zarr.json that is cut short or has no attributes at all. Anything else,
    a user's file (``notes.partial`` included) or a group carrying anyone's attributes, is not touched."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        if not fs.isdir(path):
            return False
        names = {name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(path, detail=False)}
        leftovers = {name for name in names if _ROOT_WRITE_TEMP.fullmatch(name)}
        names -= leftovers
        if not names:
            return bool(leftovers)  # only leftovers of the root document's write cut short
        if names != {"zarr.json"}:
            return False
        raw = fs.cat_file(f"{path.rstrip('/')}/zarr.json")
    except OSError:
        return False  # cannot look: decide nothing here, the normal open reports the problem
    try:
        document = json.loads(raw)
    except ValueError:
        return True  # a metadata document cut short: the creation never finished
    return isinstance(document, dict) and not document.get("attributes")


def _concurrently_created(url: str, storage_options: dict | None) -> zarr.Group | None:
    """The root group, when another run created this store between our look and our write (two runs started
    together); None when what is there is not a unipt store."""
    try:
        root = zarr.open_group(store=url, mode="r+", zarr_format=3, storage_options=storage_options)
    except Exception:
        return None
    return root if fmt.ROOT_ATTR in root.attrs else None


def _child_names(group: zarr.Group, prefix: str | None = "part-") -> list[str]:
    """Names of the child folders of ``group`` (those starting with ``prefix``; default: parts), listed
    without parsing their metadata: one cut short by a crash must not hide the others, and temporary files
    of writes cut short (``*.partial``) are not children."""
    from zarr.core.sync import sync

    async def listing() -> list[str]:
        return [name async for name in group.store_path.store.list_dir(group.store_path.path)]

    return sorted(name for name in sync(listing())
                  if name != "zarr.json" and not name.endswith(".partial") and name.startswith(prefix or ""))


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))
