"""The feature store: a Zarr v3 group of splits made of immutable, committed parts."""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from . import _format as fmt
from ._dtypes import SCALE_SUFFIX, STORAGE_DTYPES, STORED_NUMPY, as_tensor, dequantize, encode
from ._claims import Claims, Owner, list_claims
from ._provenance import check_provenance
from ._recording import RecordingStore


class StoreError(RuntimeError):
    """The store is missing, incomplete, or does not hold what was asked for."""


class CorruptChunkError(StoreError):
    """A stored object failed to decode; the message names the split, part and array."""


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

    @property
    def index(self) -> int:
        return fmt.part_index(self.name)


@dataclass
class PartData:
    """One decoded part. Example ``i``'s tokens of layer ``l`` are ``layers[l][offsets[i]:offsets[i+1]]``."""

    info: PartInfo
    example_id: np.ndarray  # (n,) str
    label: np.ndarray  # (n,) int64
    length: np.ndarray  # (n,) int32
    offsets: np.ndarray  # (n + 1,) int64
    layers: dict[int, torch.Tensor]  # layer -> (total_tokens, D_l), stored dtype (int8 for int8 stores)
    scales: dict[int, torch.Tensor] = field(default_factory=dict)  # int8 stores: layer -> (total_tokens,)

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
        self.url = url
        meta = root.attrs.get(fmt.ROOT_ATTR)
        if meta is None:
            raise StoreError(f"{url} is a Zarr group but not a unipt feature store (no {fmt.ROOT_ATTR!r} attribute)")
        version = meta.get("format_version")
        if version != fmt.FORMAT_VERSION:
            raise StoreError(
                f"{url} has store format version {version}; this unipt reads version {fmt.FORMAT_VERSION}. "
                "Re-extract it or use the unipt release that wrote it."
            )
        self.meta: dict[str, Any] = meta

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(cls, url: str, *, mode: str = "r", storage_options: dict | None = None) -> "FeatureStore":
        """Open an existing store; ``mode="r"`` (default) refuses every write."""
        url = _local_path(url)
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}; use FeatureStore.create to make a store")
        try:
            root = zarr.open_group(store=url, mode=mode, zarr_format=3, storage_options=storage_options)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise StoreError(f"no feature store at {url}: run `unipt extract` first, or check the path") from exc
        return cls(root, url)

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
    ) -> "FeatureStore":
        """Create a store, or re-open an existing one whose provenance matches (to resume into it).

        ``layer_shapes``: one (H, W, C) per layer for a store of fixed-shape feature maps (layout "maps",
        e.g. a CNN's stage maps, C = the layer's width); None = token rows (layout "tokens").

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
        if layer_shapes is not None:
            layer_shapes = [[int(n) for n in shape] for shape in layer_shapes]
            if len(layer_shapes) != len(layers) or any(
                    len(shape) != 3 or shape[-1] != width or min(shape) < 1
                    for shape, width in zip(layer_shapes, layer_widths)):
                raise ValueError(f"layer_shapes must give one (H, W, C) per layer with C = its width; got "
                                 f"{layer_shapes} for widths {list(layer_widths)}")
        meta = {
            "format_version": fmt.FORMAT_VERSION,
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
        }
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
                                       attributes={fmt.ROOT_ATTR: meta})
                return cls(root, url)
            except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError) as exc:
                root = _concurrently_created(url, storage_options)
                if root is None:
                    raise StoreError(f"{url} exists and is not a unipt store; choose a new or empty location") from exc
        existing = cls(root, url)
        check_provenance(
            existing.meta,
            meta,
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
        return list(self.meta["label_names"])

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.meta["provenance"])

    @property
    def read_only(self) -> bool:
        return self._root.read_only

    def splits(self) -> list[str]:
        # Listed directly rather than through zarr's member scan, which warns about (and a strict reader
        # fails on) the `*.partial` temporary file a killed write can leave beside the split folders.
        return [name for name in _child_names(self._root, None)
                if not name.startswith("_") and self._split_group(name, create=False) is not None]

    def parts(self, split: str) -> list[PartInfo]:
        """Committed parts of ``split`` in index order. Uncommitted (half-written) parts are invisible."""
        group = self._split_group(split, create=False)
        if group is None:
            return []
        infos = []
        for name in _child_names(group):
            info = self._committed_info(group, split, name)
            if info is not None:
                infos.append(info)
        return infos

    def committed(self, split: str) -> set[str]:
        return {p.name for p in self.parts(split)}

    def is_committed(self, split: str, name: str) -> bool:
        """Whether part ``name`` of ``split`` is committed: one metadata read, not a listing of the split."""
        group = self._split_group(split, create=False)
        return group is not None and self._committed_info(group, split, name) is not None

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
            group = self._root[fmt.SKIPPED]
            committed = fmt.COMMIT_ATTR in group.attrs
        except (KeyError, FileNotFoundError):
            committed = False
        if committed:
            where = f"{self.url} {fmt.SKIPPED}"
            ids, rows, reasons = (_read_array(group, key, where) for key in (fmt.EXAMPLE_ID, fmt.SOURCE_ROW, fmt.REASON))
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
            arr = group.create_array(key, shape=values.shape, dtype=dtype, chunks=values.shape, config=_ALWAYS_WRITE)
            arr[:] = values
        counts: dict[str, int] = {}
        for reason in reasons:
            counts[reason] = counts.get(reason, 0) + 1
        group.attrs[fmt.COMMIT_ATTR] = {"n": len(records), "reasons": counts}

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
        self, split: str, index: int, *, n_examples: int, n_tokens: int, source_start: int
    ) -> "PartWriter":
        """Start (or restart) part ``index`` of ``split``. Anything already under its name is discarded.

        Refuses to touch a committed part: committed parts are immutable.
        """
        if self.read_only:
            raise StoreError(f"{self.url} is open read-only; open it with mode='r+' to write")
        split_group = self._split_group(split, create=True)
        name = fmt.part_key(index)
        if self._committed_info(split_group, split, name) is not None:
            raise StoreError(f"{split}/{name} is already committed in {self.url}; committed parts are immutable")
        if self.layout == fmt.MAPS and n_tokens != n_examples:
            raise ValueError(f"a maps store holds one row per example: n_tokens ({n_tokens}) must equal "
                             f"n_examples ({n_examples})")
        info = PartInfo(split, name, n_examples, n_tokens, source_start, source_start + n_examples)
        # Written through a store that records the sha256 of every object as it is stored: the commit
        # marker lists them, and `verify` re-hashes what is there now (no read-back at write time).
        recorder = RecordingStore(self._root.store)
        group = zarr.open_group(store=recorder, path=_join(self._root.path, split, name), mode="w", zarr_format=3)
        group.attrs[fmt.PART_ATTR] = {
            "n_examples": n_examples,
            "n_tokens": n_tokens,
            "source_start": source_start,
            "source_stop": source_start + n_examples,
        }
        return PartWriter(group, info, self.row_shapes, self.dtype, self.meta["compression"], recorder)

    # ----------------------------------------------------------------- reading
    def read_part(self, part: PartInfo | tuple[str, str], layers: Iterable[int] | None = None) -> PartData:
        """Decode one committed part; ``layers`` (default: all stored) limits which layers are decoded."""
        split, name = (part.split, part.name) if isinstance(part, PartInfo) else part
        split_group = self._split_group(split, create=False)
        info = None if split_group is None else self._committed_info(split_group, split, name)
        if info is None:
            raise StoreError(f"{split}/{name} is not a committed part of {self.url}")
        layers = self.layers if layers is None else list(layers)
        missing = sorted(set(layers) - set(self.layers))
        if missing:
            raise StoreError(f"layers {missing} are not in {self.url}; it stores layers {self.layers}")
        group = split_group[name]
        where = f"{self.url} {split}/{name}"
        columns = {key: _read_array(group, key, where) for key in (fmt.EXAMPLE_ID, fmt.LABEL, fmt.LENGTH, fmt.OFFSETS)}
        decoded, scales = {}, {}
        for layer in layers:
            key = fmt.layer_key(layer)
            arr = _read_array(group, key, where, complete=True)
            if arr.shape[0] != info.n_tokens:
                raise CorruptChunkError(f"{where}/{key} has {arr.shape[0]} rows, expected {info.n_tokens}")
            decoded[layer] = as_tensor(arr, self.dtype)
            if self.dtype == "int8":
                scales[layer] = torch.from_numpy(_read_array(group, key + SCALE_SUFFIX, where, complete=True))
        return PartData(
            info=info,
            example_id=columns[fmt.EXAMPLE_ID].astype(object),  # numpy StringDType -> python str
            label=columns[fmt.LABEL].astype(np.int64),
            length=columns[fmt.LENGTH].astype(np.int32),
            offsets=columns[fmt.OFFSETS].astype(np.int64),
            layers=decoded,
            scales=scales,
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

    @staticmethod
    def _committed_info(split_group: zarr.Group, split: str, name: str) -> PartInfo | None:
        try:
            attrs = split_group[name].attrs.asdict()
        except Exception:  # a metadata document cut short by a crash reads as "not committed"
            return None
        commit = attrs.get(fmt.COMMIT_ATTR)
        if commit is None:
            return None
        return PartInfo(split, name, commit["n_examples"], commit["n_tokens"], commit["source_start"],
                        commit["source_stop"], len(commit.get("truncated", ())))


# Zarr skips chunks equal to the fill value by default; a part stores every chunk, so that a missing
# object always means damage (an all-zero label column is a real column, not an absent one).
_ALWAYS_WRITE = {"write_empty_chunks": True}


class PartWriter:
    """Writes one part: per-layer token rows in order, then the per-example columns, then the commit marker.

    Rows arrive in batches (``append``) and are written in shard-aligned blocks, so each stored object is
    written exactly once (a partial write into a Zarr shard would read, merge and rewrite it). A row is one
    token (D,) or, in a maps store, one example's whole (H, W, C) map: ``row_shapes`` says which per layer.
    """

    def __init__(self, group: zarr.Group, info: PartInfo, row_shapes: Mapping[int, tuple[int, ...]], dtype: str,
                 compression: str = fmt.DEFAULT_COMPRESSION, recorder: RecordingStore | None = None):
        self.group, self.info, self.dtype = group, info, dtype
        self.compression, self.recorder = compression, recorder
        self._layers = list(row_shapes)
        self._arrays: dict[str, zarr.Array] = {}  # array key -> array (a layer, and its scales for int8)
        self._pending: dict[str, list[np.ndarray]] = {}
        self._pending_rows: dict[str, int] = {}
        self._written: dict[str, int] = {}
        self._block_rows: dict[str, int] = {}
        stored = STORED_NUMPY[dtype]
        for layer, row_shape in row_shapes.items():
            key = fmt.layer_key(layer)
            row_shape = tuple(row_shape)
            chunk_rows, shard_rows = _chunk_layout(math.prod(row_shape), stored.itemsize, info.n_tokens)
            self._add_array(key, row_shape, stored, chunk_rows, shard_rows)
            if dtype == "int8":  # one scale per token (per map position), laid out like its layer
                self._add_array(key + SCALE_SUFFIX, row_shape[:-1], np.dtype("float32"), chunk_rows, shard_rows)

    def _add_array(self, key: str, row_shape: tuple[int, ...], dtype: np.dtype, chunk_rows: int, shard_rows: int) -> None:
        self._arrays[key] = self.group.create_array(
            key, shape=(self.info.n_tokens, *row_shape), dtype=dtype, chunks=(chunk_rows, *row_shape),
            shards=(shard_rows, *row_shape), compressors=_compressor(dtype.itemsize, self.compression), fill_value=0,
            config=_ALWAYS_WRITE,
        )
        self._pending[key], self._pending_rows[key], self._written[key] = [], 0, 0
        self._block_rows[key] = shard_rows

    def append(self, rows: Mapping[int, torch.Tensor | np.ndarray]) -> None:
        """Append rows ``(t, *row_shape_l)`` for every layer (same ``t`` for all), in storage order."""
        if set(rows) != set(self._layers):
            raise ValueError(f"expected rows for layers {sorted(self._layers)}, got {sorted(rows)}")
        for layer, block in rows.items():
            key = fmt.layer_key(layer)
            encoded = encode(torch.as_tensor(block), self.dtype, f"layer {layer} of {self.info.split}/{self.info.name}")
            for suffix, values in encoded.items():
                self._pending[key + suffix].append(values)
                self._pending_rows[key + suffix] += values.shape[0]
                self._flush(key + suffix, final=False)

    def finish(self, example_id: Sequence[str], label: Sequence[int], length: Sequence[int], *,
               truncated: Sequence[str] = (), skipped: Sequence[tuple[str, int, str]] = (),
               before_commit: Callable[[], None] | None = None) -> PartInfo:
        """Write the per-example columns and then the commit marker. Returns the committed part's info.

        ``truncated``: ids of examples cut to the backbone's max_length (recorded in the commit).
        ``skipped``: (example id, source row, reason) of the part's source examples left out as bad input
        when they were prepared (an image that does not decode); recorded in the commit.
        ``before_commit``: called just before the marker is written; raising there leaves the part
        uncommitted (extraction checks that it still holds the part's claim).
        """
        length = np.asarray(length, dtype=np.int32)
        n = self.info.n_examples
        if not (len(example_id) == len(label) == len(length) == n):
            raise ValueError(f"part {self.info.name}: expected {n} ids/labels/lengths, got "
                             f"{len(example_id)}/{len(label)}/{len(length)}")
        for key in self._arrays:
            self._flush(key, final=True)
            if self._written[key] != self.info.n_tokens:
                raise ValueError(f"{key}: wrote {self._written[key]} rows, expected {self.info.n_tokens}")
        if int(length.sum()) != self.info.n_tokens:
            raise ValueError(f"lengths sum to {int(length.sum())}, expected {self.info.n_tokens} tokens")
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(length, out=offsets[1:])
        self._write_column(fmt.OFFSETS, offsets)
        self._write_column(fmt.LENGTH, length)
        self._write_column(fmt.LABEL, np.asarray(label, dtype=np.int64))
        self._write_column(fmt.EXAMPLE_ID, np.asarray([str(i) for i in example_id], dtype=object), dtype=str)
        # The commit marker goes last: until this line, readers do not see the part. It lists the sha256 of
        # every object written for the part (the part's own metadata document, rewritten here, excepted).
        if before_commit is not None:
            before_commit()
        prefix = self.group.store_path.path + "/"
        objects = {} if self.recorder is None else {
            key[len(prefix):]: digest for key, digest in sorted(self.recorder.digests.items())
            if key.startswith(prefix) and key != prefix + "zarr.json"}
        self.group.attrs[fmt.COMMIT_ATTR] = {
            "n_examples": n,
            "n_tokens": self.info.n_tokens,
            "source_start": self.info.source_start,
            "source_stop": self.info.source_stop,
            "committed": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "truncated": [str(i) for i in truncated],
            **({"skipped": [[str(i), int(row), str(why)] for i, row, why in skipped]} if skipped else {}),
            "sha256": objects,
        }
        return replace(self.info, truncated=len(truncated))

    def _write_column(self, key: str, values: np.ndarray, dtype: Any = None) -> None:
        arr = self.group.create_array(
            key, shape=values.shape, dtype=dtype or values.dtype, chunks=(max(1, values.shape[0]),),
            compressors=_compressor(values.dtype.itemsize, self.compression) if dtype is None else "auto",
            config=_ALWAYS_WRITE,
        )
        if values.shape[0]:
            arr[:] = values

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


def _read_array(group: zarr.Group, key: str, where: str, complete: bool = False) -> np.ndarray:
    """Decode ``group[key]``; errors name the part and array. ``complete``: refuse missing chunk objects,
    which Zarr would otherwise read back as fill values."""
    try:
        array = group[key]
        if complete:
            expected = _stored_chunks(array)
            if array.nchunks_initialized != expected:
                raise CorruptChunkError(f"{where}/{key}: {expected - array.nchunks_initialized} of {expected} chunks "
                                        "are missing; delete the part and re-run extraction to redo it")
        return array[...]
    except CorruptChunkError:
        raise
    except KeyError as exc:
        raise CorruptChunkError(f"{where}: array {key!r} is missing") from exc
    except Exception as exc:  # decoding errors surface as codec-specific exception types
        raise CorruptChunkError(f"{where}/{key} failed to decode ({type(exc).__name__}: {exc}); "
                                "delete the part and re-run extraction to redo it") from exc




def _local_path(url: str) -> str:
    """``file://`` URLs become plain paths: Zarr's LocalStore creates folders as it writes; fsspec's local
    filesystem, reached through a URL, does not."""
    return url[len("file://"):] if url.startswith("file://") else url


def _interrupted_creation(url: str, storage_options: dict | None) -> bool:
    """True when ``url`` holds nothing but what a process killed while creating the store leaves: temporary
    ``*.partial`` files of an atomic write (Zarr's LocalStore writes through them), and at most a root
    zarr.json that is cut short or has no attributes at all. A group carrying anyone's attributes is not
    touched."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        if not fs.isdir(path):
            return False
        names = {name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(path, detail=False)}
        names = {name for name in names if not name.endswith(".partial")}
        if not names:
            return bool(fs.ls(path, detail=False))  # only leftovers of writes cut short
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


def _stored_chunks(array: zarr.Array) -> int:
    """Chunks a fully written array holds as Zarr counts them (whole shards times chunks per shard)."""
    if array.shards is None:
        return array.nchunks
    shards = math.prod(math.ceil(n / s) for n, s in zip(array.shape, array.shards))
    return shards * math.prod(s // c for s, c in zip(array.shards, array.chunks))


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
