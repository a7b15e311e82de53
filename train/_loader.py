"""Streams padded batches of cached activations from a feature store; no backbone is loaded.

Two ways through an epoch:

* **memory** — every part is decoded once (in threads) and kept resident in its stored dtype; each epoch
  is a full shuffle of all examples.
* **stream** — part order is shuffled each epoch, parts are decoded a few ahead in background threads,
  and examples are mixed across parts through a shuffle buffer. A buffer of ``shuffle_buffer`` examples
  over parts of ``P`` examples mixes each example with ~``shuffle_buffer / P`` parts' worth of others.

Either way, examples are sorted by length within windows of ``bucket_batches`` batches before batching
(so batches carry little padding) and batch order is shuffled again. Batches are padded with one gather
per part and layer; where a core is free for it (or the model is on a GPU) that happens on a background
thread, so the training loop only takes ready batches off a queue.

A store of CNN feature maps (layout "maps") goes through the same two plans: each example is one stored row
per layer, a whole (H, W, C) map, and batches come out as (B, C, H, W) with an all-True (B, 1) mask.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from unipt.store import FeatureStore, PartData, PartInfo, StoreError, bytes_per_row, dequantize

from .config import LoaderConfig

# An example reference: (decoded part, row within the part).
_Ref = tuple[PartData, int]


@dataclass
class Batch:
    hidden_states: list[torch.Tensor]  # per requested layer: (B, N, D_l) zero-padded tokens, or (B, C, H, W) maps
    mask: torch.Tensor  # (B, N) bool, True = real token (maps: (B, 1), all True)
    labels: torch.Tensor  # (B,) int64
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
    ):
        self.store, self.split, self.layers = store, split, list(layers)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
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
        self.num_examples = sum(p.n_examples for p in self.parts)
        row_shapes = self.row_shapes = store.row_shapes
        self.maps = store.layout == "maps"
        self.resident_bytes = sum(p.n_tokens for p in self.parts) * sum(
            bytes_per_row(store.dtype, row_shapes[l]) for l in self.layers)
        mode = self.config.mode
        if mode == "auto":
            mode = "memory" if self.resident_bytes <= self.config.memory_budget_gb * 2**30 else "stream"
        self.mode = mode
        self._resident: list[PartData] | None = None
        self.epoch = 0
        background = self.config.background
        spare_core = (os.cpu_count() or 1) > torch.get_num_threads()
        self.background = background == "on" or (background == "auto" and (accelerator or spare_core))

    def set_epoch(self, epoch: int) -> None:
        """Seeds this epoch's shuffle: same seed and epoch, same batches."""
        self.epoch = epoch

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
            with ThreadPoolExecutor(self.config.decode_threads) as pool:
                self._resident = [_concatenate(list(pool.map(self._read, self.parts)))]
        refs = [(part, i) for part in self._resident for i in range(part.info.n_examples)]
        if self.shuffle:
            refs = [refs[i] for i in rng.permutation(len(refs))]
            yield from self._bucketed(refs, rng)
        else:
            yield from _chunks(refs, self.batch_size)

    def _stream_batches(self, rng: np.random.Generator) -> Iterator[list[_Ref]]:
        order = rng.permutation(len(self.parts)) if self.shuffle else np.arange(len(self.parts))
        parts = [self.parts[i] for i in order]
        buffer: list[_Ref] = []
        with ThreadPoolExecutor(self.config.decode_threads) as pool:
            # While part k is consumed, parts k+1 .. k+prefetch_parts are decoding (part k+prefetch_parts is
            # submitted when k is taken, not earlier: one more in flight would be one more part in memory).
            ahead = self.config.prefetch_parts
            futures = [pool.submit(self._read, p) for p in parts[:ahead]]
            for k in range(len(parts)):
                if k + ahead < len(parts):
                    futures.append(pool.submit(self._read, parts[k + ahead]))
                part = futures[k].result()
                futures[k] = None  # drop the reference: the part lives on only through the buffer
                buffer.extend((part, i) for i in range(part.info.n_examples))
                if not self.shuffle:
                    full = len(buffer) - len(buffer) % self.batch_size
                    yield from _chunks(buffer[:full], self.batch_size)
                    buffer = buffer[full:]
                    continue
                window = self.batch_size * self.config.bucket_batches
                while len(buffer) >= max(self.config.shuffle_buffer, window):
                    rng.shuffle(buffer)
                    yield from self._bucketed(buffer[:window], rng)
                    buffer = buffer[window:]
        if self.shuffle:
            rng.shuffle(buffer)
            yield from self._bucketed(buffer, rng)
        else:
            yield from _chunks(buffer, self.batch_size)

    def _bucketed(self, refs: list[_Ref], rng: np.random.Generator) -> Iterator[list[_Ref]]:
        """Sort shuffled refs by length within windows, cut into batches, shuffle the batch order."""
        window = self.batch_size * self.config.bucket_batches
        for start in range(0, len(refs), window):
            chunk = sorted(refs[start : start + window], key=lambda r: int(r[0].length[r[1]]))
            batches = list(_chunks(chunk, self.batch_size))
            for j in rng.permutation(len(batches)):
                yield batches[j]

    # ------------------------------------------------------------------ decoding and padding
    def _read(self, part) -> PartData:
        return self.store.read_part(part, layers=self.layers)

    def _collate(self, refs: list[_Ref]) -> Batch:
        lengths = np.array([part.length[i] for part, i in refs], dtype=np.int64)
        b, n = len(refs), int(lengths.max())
        mask = torch.arange(n)[None, :] < torch.from_numpy(lengths)[:, None]  # (B, N)
        labels = torch.tensor([int(part.label[i]) for part, i in refs], dtype=torch.int64)
        ids = [str(part.example_id[i]) for part, i in refs]
        if isinstance(refs[0][0], _Resident):  # memory mode: one gather per layer, padding from the zero row
            resident = refs[0][0]
            starts = resident.offsets[np.array([i for _, i in refs])]
            index = torch.from_numpy(starts[:, None] + np.arange(n)[None, :])  # (B, N) token rows
            index = index.masked_fill_(~mask, resident.padding_row).view(-1)
            hidden = []
            for layer in self.layers:
                scale = resident.scales.get(layer)
                rows = dequantize(resident.layers[layer].index_select(0, index),
                                  None if scale is None else scale.index_select(0, index), self.dtype)
                hidden.append(self._shaped(rows.pin_memory() if self.pin_memory else rows, b, n))
            return Batch(hidden, mask, labels, ids)
        # Token rows to gather, grouped by part: source rows in the part's CSR arrays, destination rows in
        # the flattened (B * N) batch. Then one gather + scatter per part and layer, instead of a copy per
        # example and layer (the Python loop runs once per batch, not once per layer).
        groups: dict[int, tuple[PartData, list[np.ndarray], list[np.ndarray]]] = {}
        for row, (part, i) in enumerate(refs):
            _, src, dst = groups.setdefault(id(part), (part, [], []))
            src.append(np.arange(part.offsets[i], part.offsets[i] + lengths[row]))
            dst.append(np.arange(row * n, row * n + lengths[row]))
        index = [(part, torch.from_numpy(np.concatenate(src)), torch.from_numpy(np.concatenate(dst)))
                 for part, src, dst in groups.values()]
        hidden = []
        for layer in self.layers:
            out = torch.zeros(b * n, *self.row_shapes[layer], dtype=self.dtype, pin_memory=self.pin_memory)
            for part, src, dst in index:
                scale = part.scales.get(layer)  # int8 stores: dequantise in torch, after the gather
                rows = dequantize(part.layers[layer].index_select(0, src),
                                  None if scale is None else scale.index_select(0, src), self.dtype)
                out.index_copy_(0, dst, rows)
            hidden.append(self._shaped(out, b, n))
        return Batch(hidden, mask, labels, ids)

    def _shaped(self, rows: torch.Tensor, b: int, n: int) -> torch.Tensor:
        """Gathered rows as the batch tensor: tokens (B * N, D) -> (B, N, D); maps, one row per example,
        (B, H, W, C) -> (B, C, H, W) as a channels-last view (no copy; convolutions take it as it is)."""
        return rows.permute(0, 3, 1, 2) if self.maps else rows.view(b, n, -1)


@dataclass
class _Resident(PartData):
    """A whole split decoded into one part, each layer with one extra all-zero row at ``padding_row``:
    a padded batch is then one gather per layer (padding positions gather the zero row). Measured against
    the per-part gather + scatter (a batch of 32 drew from ~8 parts): UniPT r = 8 on MiniLM tweets went from
    0.84 to 0.93 of its speed on pre-padded tensors (r = 2: 0.92 either way)."""

    padding_row: int = 0


def _concatenate(parts: list[PartData]) -> _Resident:
    """The decoded parts of a split as one :class:`_Resident` part (see there)."""
    first = parts[0].info
    lengths = np.concatenate([p.length for p in parts])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    info = PartInfo(first.split, "resident", len(lengths), total, 0, len(lengths))

    def stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([*tensors, tensors[0].new_zeros((1, *tensors[0].shape[1:]))])

    layers = {layer: stacked([p.layers[layer] for p in parts]) for layer in parts[0].layers}
    scales = {layer: stacked([p.scales[layer] for p in parts]) for layer in parts[0].scales}
    return _Resident(info=info, example_id=np.concatenate([p.example_id for p in parts]),
                     label=np.concatenate([p.label for p in parts]), length=lengths, offsets=offsets,
                     layers=layers, scales=scales, padding_row=total)


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
