"""Streams padded batches of cached activations from a feature store; no backbone is loaded.

Two ways through an epoch:

* **memory** — every part is decoded once (in threads) into one resident copy of the split in its stored
  dtype; each epoch is a full shuffle of all examples.
* **stream** — part order is shuffled each epoch, parts are decoded a few ahead in background threads,
  and examples are mixed across parts through a shuffle buffer. A buffer of ``shuffle_buffer`` examples
  over parts of ``P`` examples mixes each example with ~``shuffle_buffer / P`` parts' worth of others.
  What stays decoded is bounded by the buffer, not by the parts it has touched: the examples left in the
  buffer from mostly consumed parts are copied out, so those parts can be freed (see :func:`_compacted`).

Either way, examples are sorted by length within windows of ``bucket_batches`` batches before batching
(so batches carry little padding) and batch order is shuffled again. Unshuffled loaders keep the stored
order, or with ``length_sorted`` (evaluation, where order does not matter) sort within windows as well.
A batch is padded by one gather per layer from a source with a zero row (memory mode: the resident split;
stream mode: a copy of the batch's rows); where a core is free for it (or the model is on a GPU) that
happens on a background thread, so the training loop only takes ready batches off a queue.

A store of CNN feature maps (layout "maps") goes through the same two plans: each example is one stored row
per layer, a whole (H, W, C) map, and batches come out as (B, C, H, W) with an all-True (B, 1) mask.

Stochastic views (a split extracted with ``extract.views = K``): each epoch serves one view per example, from
the first ``n`` stored views (``views``; 0 = all K). ``view_schedule``:

* ``"rotate"`` — epoch e serves view ``e mod n`` of every example: each part decodes one view per epoch,
  the cost of a store without views. Memory mode holds all n views resident: n times the memory.
* ``"random"`` — each example draws its view per epoch from a hash of (data seed, epoch, example id), so
  one batch mixes views. Stream mode then decodes all n views of every part it reads (n times the decoding
  of rotate) and keeps the rows each example drew; memory mode holds n views, as for rotate.
* ``"eval"`` — view 0 always (the eval-mode cache): what every loader serves by default, and what the
  evaluation and test splits always read.
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from unipt.store import IGNORE_INDEX, FeatureStore, PartData, PartInfo, StoreError, bytes_per_row, dequantize

from .config import VIEW_SCHEDULES, LoaderConfig

# An example reference: (decoded part, row within the part).
_Ref = tuple[PartData, int]


@dataclass
class Batch:
    hidden_states: list[torch.Tensor]  # per requested layer: (B, N, D_l) zero-padded tokens, or (B, C, H, W) maps
    mask: torch.Tensor  # (B, N) bool, True = real token (maps: (B, 1), all True)
    labels: torch.Tensor  # the task's targets: (B,) int64 classes, (B, C) uint8 multi-hot, (B, k) float32, or
    #                       (B, N) int64 token tags (IGNORE_INDEX on padding and unscored tokens)
    example_ids: list[str]

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        return Batch(
            [h.to(device, non_blocking=non_blocking) for h in self.hidden_states],
            self.mask.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            self.example_ids,
        )

    def __len__(self) -> int:
        return len(self.example_ids)


class ActivationLoader:
    """Iterable of :class:`Batch` over one split of a store, for the requested layers only."""

    def __init__(
        self,
        store: FeatureStore,
        split: str,
        layers: Sequence[int],
        *,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        config: LoaderConfig | None = None,
        dtype: torch.dtype = torch.float32,
        pin_memory: bool = False,
        accelerator: bool = False,
        length_sorted: bool = False,
        views: int = 0,
        view_schedule: str = "eval",
    ):
        self.store, self.split, self.layers = store, split, list(layers)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        # Unshuffled batches sorted by length within windows: less padding, so less time and memory per
        # batch (an evaluation pass scores every example the same in any order).
        self.length_sorted = length_sorted
        self.config = config or LoaderConfig()
        self.dtype, self.pin_memory = dtype, pin_memory
        self.parts = store.parts(split)
        if not self.parts:
            raise StoreError(
                f"split {split!r} has no committed parts in {store.url} (splits present: {store.splits()}); "
                "run or resume `unipt extract` for it"
            )
        missing = sorted(set(self.layers) - set(store.layers))
        if missing:
            raise StoreError(f"layers {missing} are not in {store.url}; it stores layers {store.layers}")
        if view_schedule not in VIEW_SCHEDULES:
            raise ValueError(f"view_schedule must be one of {VIEW_SCHEDULES}, got {view_schedule!r}")
        stored = store.views(split)
        if not 0 <= views <= stored:
            raise StoreError(f"{views} views were asked for (train.views), but split {split!r} of {store.url} "
                             f"stores {stored} view(s) per example; ask for at most {stored} (0 = all of them), or "
                             "extract with more (extract.views)")
        self.view_schedule = view_schedule
        # Views served: the first n stored (eval: view 0 alone, so nothing beyond it is read or held).
        self.n_views = 1 if view_schedule == "eval" else (views or stored)
        self.num_examples = sum(p.n_examples for p in self.parts)
        row_shapes = self.row_shapes = store.row_shapes
        self.maps = store.layout == "maps"
        self.resident_bytes = self.n_views * sum(p.n_tokens for p in self.parts) * sum(
            bytes_per_row(store.dtype, row_shapes[l]) for l in self.layers)
        mode = self.config.mode
        if mode == "auto":
            mode = "memory" if self.resident_bytes <= self.config.memory_budget_gb * 2**30 else "stream"
        self.mode = mode
        self._resident: _Resident | None = None
        self._rows: dict[str, int] | None = None  # example id -> row of the resident split (batch_of)
        self.epoch = 0
        background = self.config.background
        spare_core = (os.cpu_count() or 1) > torch.get_num_threads()
        self.background = background == "on" or (background == "auto" and (accelerator or spare_core))

    def set_epoch(self, epoch: int) -> None:
        """Seeds this epoch's shuffle (and picks its views): same seed and epoch, same batches."""
        self.epoch = epoch

    def epoch_views(self, example_ids: Sequence[str], epoch: int | None = None) -> np.ndarray | None:
        """The view each of ``example_ids`` is served in ``epoch`` (default: the current one); None = view 0
        for all (one view served)."""
        epoch = self.epoch if epoch is None else epoch
        if self.n_views == 1:
            return None
        if self.view_schedule == "rotate":
            return np.full(len(example_ids), epoch % self.n_views, dtype=np.int64)
        return np.fromiter((_draw(self.seed, epoch, str(example_id), self.n_views) for example_id in example_ids),
                           dtype=np.int64, count=len(example_ids))

    def release(self) -> None:
        """Free the decoded split that memory mode keeps between epochs (a later epoch decodes it again)."""
        self._resident = self._rows = None

    def batch_of(self, example_ids: Sequence[str]) -> Batch:
        """The examples ``example_ids`` as one padded batch, in that order (repeats allowed), read from the
        split held in memory: the split is decoded once, on the first call, whatever the loader's mode."""
        if self._resident is None:
            self._resident = self._read_resident()
        if self._rows is None:
            self._rows = {str(example_id): row for row, example_id in enumerate(self._resident.example_id)}
        try:
            rows = [self._rows[str(example_id)] for example_id in example_ids]
        except KeyError as exc:
            raise StoreError(f"example {exc.args[0]!r} is not in split {self.split!r} of {self.store.url}") from None
        return self._collate([(self._resident, row) for row in rows])

    def __len__(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, self.epoch])

        def padded_batches() -> Iterator[Batch]:
            plan = self._memory_batches(rng) if self.mode == "memory" else self._stream_batches(rng)
            try:
                for refs in plan:
                    yield self._collate(refs)
            finally:
                # Close the plan here, on the producer thread. Left to the garbage collector, it could be
                # finalised on any thread, including zarr's event-loop thread, where shutting down its
                # decode pool (whose workers need that loop) would deadlock.
                plan.close()

        if not self.background:
            return padded_batches()
        return _in_background(padded_batches, self.config.prefetch_batches)

    # ------------------------------------------------------------------ epoch plans
    def _memory_batches(self, rng: np.random.Generator) -> Iterator[list[_Ref]]:
        if self._resident is None:
            self._resident = self._read_resident()
        # This epoch's views: the resident split with each example's view (its tensors shared, not copied).
        source = self._resident
        if self.n_views > 1:
            source = replace(source, example_view=self.epoch_views(source.example_id))
        refs = [(source, i) for i in range(source.info.n_examples)]
        if self.shuffle:
            refs = [refs[i] for i in rng.permutation(len(refs))]
            yield from self._bucketed(refs, rng)
        else:
            yield from self._in_order(refs)

    def _stream_batches(self, rng: np.random.Generator) -> Iterator[list[_Ref]]:
        order = rng.permutation(len(self.parts)) if self.shuffle else np.arange(len(self.parts))
        buffer: list[_Ref] = []
        window = self.batch_size * self.config.bucket_batches
        epoch = self.epoch  # read once: the decode threads must not see a later set_epoch
        read = lambda part: self._read_epoch(part, epoch)  # noqa: E731
        with closing(self._decoded([self.parts[i] for i in order], self.config.prefetch_parts, read)) as parts:
            for part in parts:
                buffer.extend((part, i) for i in range(part.info.n_examples))
                if not self.shuffle:  # whole batches in order; the rest waits for the next part
                    full = len(buffer) - len(buffer) % self.batch_size
                    yield from self._in_order(buffer[:full])
                    buffer = buffer[full:]
                while self.shuffle and len(buffer) >= max(self.config.shuffle_buffer, window):
                    rng.shuffle(buffer)
                    yield from self._bucketed(buffer[:window], rng)
                    buffer = buffer[window:]
                buffer = _compacted(buffer)
        if self.shuffle:
            rng.shuffle(buffer)
            yield from self._bucketed(buffer, rng)
        else:
            yield from self._in_order(buffer)

    def _bucketed(self, refs: list[_Ref], rng: np.random.Generator) -> Iterator[list[_Ref]]:
        """Sort shuffled refs by length within windows, cut into batches, shuffle the batch order."""
        for chunk in self._length_windows(refs):
            batches = list(_chunks(chunk, self.batch_size))
            for j in rng.permutation(len(batches)):
                yield batches[j]

    def _in_order(self, refs: list[_Ref]) -> Iterator[list[_Ref]]:
        """Unshuffled batches: the stored order, or sorted by length within windows (``length_sorted``)."""
        for chunk in self._length_windows(refs) if self.length_sorted else [refs]:
            yield from _chunks(chunk, self.batch_size)

    def _length_windows(self, refs: list[_Ref]) -> Iterator[list[_Ref]]:
        window = self.batch_size * self.config.bucket_batches
        for start in range(0, len(refs), window):
            yield sorted(refs[start : start + window], key=lambda r: int(r[0].length[r[1]]))

    # ------------------------------------------------------------------ decoding and padding
    def _read(self, part, view: int = 0) -> PartData:
        if view == 0:  # the call a store without views has always had (wrappers of read_part keep working)
            return self.store.read_part(part, layers=self.layers)
        return self.store.read_part(part, layers=self.layers, view=view)

    def _read_epoch(self, part: PartInfo, epoch: int) -> PartData:
        """A part as epoch ``epoch`` serves it (stream mode): rotate decodes the epoch's one view; random
        decodes the n views and keeps, per example, the rows of the view it drew."""
        if self.n_views == 1:
            return self._read(part)
        if self.view_schedule == "rotate":
            return self._read(part, epoch % self.n_views)
        decoded = [self._read(part, view) for view in range(self.n_views)]
        return _mixed(decoded, self.epoch_views(decoded[0].example_id, epoch))

    def _read_views(self, part: PartInfo) -> list[PartData]:
        """The n views served, each decoded (memory mode holds them all)."""
        return [self._read(part, view) for view in range(self.n_views)]

    def _decoded(self, parts: list[PartInfo], ahead: int, read: Callable | None = None) -> Iterator:
        """``parts`` decoded in order on the decode threads (by ``read``, default one view 0 each), at most
        ``ahead`` beyond the one handed out."""
        read = read or self._read
        with ThreadPoolExecutor(self.config.decode_threads) as pool:
            # Part k + ahead is submitted when part k is handed out, not earlier: one more in flight would be
            # one more decoded part in memory.
            futures = [pool.submit(read, p) for p in parts[:ahead]]
            for k in range(len(parts)):
                if k + ahead < len(parts):
                    futures.append(pool.submit(read, parts[k + ahead]))
                part = futures[k].result()
                futures[k] = None  # the consumer holds the only reference from here on
                yield part
                del part

    def _read_resident(self) -> "_Resident":
        """The whole split decoded into one :class:`_Resident` part, filled part by part as they decode (a
        split never exists twice in memory, as it would if the parts were decoded first and concatenated).
        With n views served, view v of the split's T token rows sits at rows v*T .. (v+1)*T - 1."""
        n_tokens = sum(p.n_tokens for p in self.parts)
        n_rows = self.n_views * n_tokens
        columns: dict[str, list[np.ndarray]] = {"example_id": [], "label": [], "length": []}
        layers: dict[int, torch.Tensor] = {}
        scales: dict[int, torch.Tensor] = {}
        row = 0
        with closing(self._decoded(self.parts, self.config.decode_threads, self._read_views)) as parts:
            for views in parts:
                part = views[0]
                for view, data in enumerate(views):
                    at = view * n_tokens + row
                    for source, into in ((data.layers, layers), (data.scales, scales)):
                        for layer, t in source.items():
                            if layer not in into:  # one extra all-zero row at the end: the padding row
                                into[layer] = t.new_empty((n_rows + 1, *t.shape[1:]))
                                into[layer][n_rows] = 0
                            into[layer][at : at + len(t)] = t
                for name, values in columns.items():
                    values.append(getattr(part, name))
                row += part.info.n_tokens
        lengths = np.concatenate(columns["length"])
        info = PartInfo(self.split, "resident", len(lengths), n_tokens, 0, len(lengths))
        token_targets = self.store.task == "tagging"
        labels = _with_padding_target(np.concatenate(columns["label"]), token_targets)
        return _Resident(info=info, example_id=np.concatenate(columns["example_id"]), label=labels, length=lengths,
                         offsets=_offsets(lengths), layers=layers, scales=scales, token_targets=token_targets,
                         padding_row=n_rows, view_stride=n_tokens)

    def _collate(self, refs: list[_Ref]) -> Batch:
        if isinstance(refs[0][0], _Resident):  # memory mode: the split is one part with a zero row
            source, rows = refs[0][0], np.array([i for _, i in refs])
        else:
            # The batch's token rows copied out of their parts in the stored dtype, one gather per part and
            # layer, into one source with a zero row; then, as in memory mode, one gather per layer pads the
            # batch. Measured on MiniLM tweets (7 layers, batches from ~14 parts): 3.2 ms per batch, against
            # 4.5 ms when each part's rows were cast and scattered into a zeroed float32 batch.
            source, rows = _gather(refs, padding_row=True)
        lengths = source.length[rows].astype(np.int64, copy=False)
        b, n = len(refs), int(lengths.max())
        mask = torch.arange(n)[None, :] < torch.from_numpy(lengths)[:, None]  # (B, N)
        ids = [str(example_id) for example_id in source.example_id[rows]]
        starts = source.offsets[rows]
        tokens = torch.from_numpy(starts[:, None] + np.arange(n)[None, :])  # (B, N) token rows of the source
        shift = 0 if source.example_view is None else source.example_view[rows] * source.view_stride
        # Each example's rows in the view it is served (resident views: view v's rows start at v * T).
        index = (tokens + torch.as_tensor(shift).view(-1, 1)).masked_fill_(~mask, source.padding_row).view(-1)
        if source.token_targets:  # one per token, gathered like the layers (the last target is IGNORE_INDEX)
            targets = tokens.masked_fill(~mask, len(source.label) - 1).view(-1)  # targets are the same every view
            labels = torch.from_numpy(source.label[targets.numpy()].astype(np.int64)).view(b, n)
        else:
            labels = torch.from_numpy(_as_batch_targets(source.label[rows]))
        hidden = []
        for layer in self.layers:
            scale = source.scales.get(layer)  # int8 stores: dequantise in torch, after the gather
            batch = dequantize(source.layers[layer].index_select(0, index),
                               None if scale is None else scale.index_select(0, index), self.dtype)
            hidden.append(self._shaped(batch.pin_memory() if self.pin_memory else batch, b, n))
        return Batch(hidden, mask, labels, ids)

    def _shaped(self, rows: torch.Tensor, b: int, n: int) -> torch.Tensor:
        """Gathered rows as the batch tensor: tokens (B * N, D) -> (B, N, D); maps, one row per example,
        (B, H, W, C) -> (B, C, H, W) as a channels-last view (no copy; convolutions take it as it is)."""
        return rows.permute(0, 3, 1, 2) if self.maps else rows.view(b, n, -1)


@dataclass
class _Resident(PartData):
    """Rows in one part with one extra all-zero row at ``padding_row`` (memory mode: the whole split; stream
    mode: one batch's examples): a padded batch is then one gather per layer (padding positions gather the
    zero row). In memory mode, against a gather + scatter per part (a batch of 32 drew from ~8 parts), UniPT
    r = 8 on MiniLM tweets went from 0.84 to 0.93 of its speed on pre-padded tensors (r = 2: 0.92 either
    way)."""

    padding_row: int = 0
    view_stride: int = 0  # memory mode with n views: view v of token row r is row v * view_stride + r
    example_view: np.ndarray | None = None  # this epoch's view of each example (None: view 0)


def _draw(seed: int, epoch: int, example_id: str, n: int) -> int:
    """The view example ``example_id`` is served in ``epoch`` under the random schedule: a hash of (data
    seed, epoch, id), so it is the same in every run with that seed, whatever the order or the mode."""
    digest = hashlib.blake2b(f"{seed}\0{epoch}\0{example_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


def _mixed(views: list[PartData], example_view: np.ndarray) -> PartData:
    """One part whose example i has the rows of ``views[example_view[i]]`` (the views of one part: the same
    examples, offsets and targets, other hidden states)."""
    first = views[0]
    token_view = np.repeat(example_view, np.diff(first.offsets))  # the view of each token row
    picks = [torch.from_numpy(np.flatnonzero(token_view == v)) for v in range(len(views))]

    def mixed(pick: Callable[[PartData], dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
        out = {}
        for layer, rows in pick(first).items():
            out[layer] = rows.clone()
            for v in range(1, len(views)):
                if len(picks[v]):
                    out[layer].index_copy_(0, picks[v], pick(views[v])[layer].index_select(0, picks[v]))
        return out

    return replace(first, layers=mixed(lambda p: p.layers), scales=mixed(lambda p: p.scales))


def _compacted(refs: list[_Ref]) -> list[_Ref]:
    """``refs`` with those into mostly consumed parts moved to a copy of just their rows.

    A decoded part stays in memory while any of its examples waits in the shuffle buffer. When parts do not
    fill the buffer in whole windows (a part of another size comes up), examples are left over from every
    part, and drawn at random a part's last examples wait for ~log2(part size) rounds, each round keeping
    another whole part alive: measured on MiniLM tweets (parts and buffer of 256 examples, one part ahead,
    one part of 160), 8 decoded parts (~370 MiB) were alive at once for a 256-example buffer. Copying out
    the rows left in parts that are at least half consumed bounds what is held to about twice the buffer
    plus the part being read (3 parts there), at the price of one extra copy of those rows in their stored
    dtype.
    """
    live = Counter(id(part) for part, _ in refs)
    stale = {id(part) for part, _ in refs if 2 * live[id(part)] <= part.info.n_examples}
    if not stale:
        return refs
    moved = [ref for ref in refs if id(ref[0]) in stale]
    copy, rows = _gather(moved)
    at = iter(rows)
    return [(copy, int(next(at))) if id(part) in stale else (part, i) for part, i in refs]


def _gather(refs: list[_Ref], padding_row: bool = False) -> tuple[PartData, np.ndarray]:
    """The examples of ``refs`` copied into one new part (rows in their stored dtype, one gather per source
    part and layer), and where each ref's example is in it. With ``padding_row``, a :class:`_Resident` with
    an all-zero row after the last."""
    groups: dict[int, list[int]] = {}  # source part -> positions in refs
    for k, (part, _) in enumerate(refs):
        groups.setdefault(id(part), []).append(k)
    order = np.array([k for ks in groups.values() for k in ks])  # refs in the copy's example order
    at = np.empty(len(refs), dtype=np.int64)
    at[order] = np.arange(len(refs))
    taken = [(refs[ks[0]][0], np.array([refs[k][1] for k in ks])) for ks in groups.values()]
    index = [(part, torch.from_numpy(_token_rows(part.offsets, rows))) for part, rows in taken]
    token_targets = taken[0][0].token_targets
    labels = np.concatenate([part.label[token_rows.numpy() if token_targets else rows]
                             for (part, rows), (_, token_rows) in zip(taken, index)])
    lengths = np.concatenate([part.length[rows] for part, rows in taken]).astype(np.int32)
    offsets = _offsets(lengths)

    def gathered(pick: Callable[[PartData], dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
        out = {}
        for layer, first in pick(taken[0][0]).items():
            pieces = [pick(part)[layer].index_select(0, rows) for part, rows in index]
            out[layer] = torch.cat(pieces + [first.new_zeros((1, *first.shape[1:]))] if padding_row else pieces)
        return out

    info = PartInfo(taken[0][0].info.split, "gathered", len(refs), int(offsets[-1]), 0, len(refs))
    fields = dict(info=info, example_id=np.concatenate([part.example_id[rows] for part, rows in taken]),
                  label=_with_padding_target(labels, token_targets) if padding_row else labels, length=lengths,
                  offsets=offsets, layers=gathered(lambda p: p.layers), scales=gathered(lambda p: p.scales),
                  token_targets=token_targets)
    return (_Resident(**fields, padding_row=int(offsets[-1])) if padding_row else PartData(**fields)), at


def _with_padding_target(labels: np.ndarray, token_targets: bool) -> np.ndarray:
    """Token targets with one IGNORE_INDEX after the last, for the padding row; per-example targets as they are."""
    return np.append(labels, np.asarray([IGNORE_INDEX], dtype=labels.dtype)) if token_targets else labels


def _as_batch_targets(values: np.ndarray) -> np.ndarray:
    """A batch's per-example targets as the trainer takes them: class indices as int64 (what cross-entropy
    takes), multi-hot rows and regression values in their stored dtype."""
    return values.astype(np.int64, copy=False) if values.ndim == 1 else np.ascontiguousarray(values)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """CSR offsets (n + 1,) of examples with these token counts."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _token_rows(offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The token rows of examples ``rows`` of a part with CSR ``offsets``, concatenated in that order."""
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    return np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


_DONE = object()


def _in_background(make: Callable[[], Iterator], maxsize: int) -> Iterator:
    """Run the iterator ``make()`` in a daemon thread, handing items over through a bounded queue.

    Exceptions in the producer re-raise in the consumer; a consumer that stops early stops the producer.
    """
    q: queue.Queue = queue.Queue(maxsize=maxsize)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        items = make()
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the consumer, re-raised there
            put(exc)
        finally:
            items.close()

    thread = threading.Thread(target=produce, daemon=True, name="unipt-loader")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
