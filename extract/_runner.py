"""The extraction loop: source -> tokenise -> frozen forward -> background writer -> committed parts.

One part is one task: :func:`extract_part` is all a worker needs, whether parts run one after another
here or (later) as tasks on a cluster. Committed parts are skipped, so re-running the same command
resumes an interrupted extraction and redoes only unfinished parts.
"""

from __future__ import annotations

import math
import platform
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from unipt.store import FeatureStore, part_key

from ._backbone import TextEncoder
from ._sources import Example, SourceData, load_source
from .config import BackboneConfig, ExtractConfig, SourceConfig


@dataclass
class ExtractSummary:
    store: str
    examples: dict[str, int] = field(default_factory=dict)  # per split, extracted in this run
    tokens: dict[str, int] = field(default_factory=dict)
    parts_written: int = 0
    parts_skipped: int = 0  # already committed: resumed past
    seconds: float = 0.0
    tokenize_seconds: float = 0.0
    forward_seconds: float = 0.0
    write_seconds: float = 0.0  # busy time of the background writer (overlaps the forward pass)
    write_wait_seconds: float = 0.0  # time the forward pass waited for a full writer queue

    @property
    def examples_per_s(self) -> float:
        return sum(self.examples.values()) / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens.values()) / max(self.seconds, 1e-9)

    def describe(self) -> str:
        n, t = sum(self.examples.values()), sum(self.tokens.values())
        return (f"extracted {n} examples ({t} tokens) into {self.parts_written} parts, {self.parts_skipped} parts "
                f"already committed; {self.seconds:.1f}s = {self.examples_per_s:.0f} examples/s, "
                f"{self.tokens_per_s:.0f} tokens/s (tokenize {self.tokenize_seconds:.1f}s, forward "
                f"{self.forward_seconds:.1f}s, writer busy {self.write_seconds:.1f}s, waited on writer "
                f"{self.write_wait_seconds:.1f}s)")


@dataclass(frozen=True)
class PartTask:
    split: str
    index: int
    start: int  # first example of the part in the split's source order
    examples: Sequence[Example]


def resolve_extract_layers(selection, num_hidden_states: int) -> list[int]:
    """"all" or indices (negative from the end) onto hidden-state indices 0 .. num_hidden_states - 1."""
    if isinstance(selection, str):
        return list(range(num_hidden_states))
    layers = []
    for index in selection:
        layer = index + num_hidden_states if index < 0 else index
        if not 0 <= layer < num_hidden_states:
            raise ValueError(f"layer {index} is out of range: the backbone has hidden states 0 .. "
                             f"{num_hidden_states - 1} (0 = embeddings)")
        layers.append(layer)
    if len(set(layers)) != len(layers) or layers != sorted(layers):
        raise ValueError(f"extract.layers must be increasing and distinct, got {list(selection)}")
    return layers


def plan_parts(split: str, examples: Sequence[Example], part_size: int) -> list[PartTask]:
    return [PartTask(split, i, i * part_size, examples[i * part_size : (i + 1) * part_size])
            for i in range(math.ceil(len(examples) / part_size))]


def extraction_provenance(source: SourceConfig, data: SourceData, encoder: TextEncoder, config: ExtractConfig,
                          layers: list[int]) -> dict[str, Any]:
    import numcodecs
    import torch
    import transformers
    import zarr

    return {
        "backbone": encoder.provenance(),
        "source": {
            "location": source.path,
            "fingerprint": data.fingerprint,
            "text_column": source.text_column,
            "label_column": source.label_column,
            "id_column": source.id_column,
            "dedupe": source.dedupe,
            "splits": source.splits,
            "split_column": source.split_column,
            "max_examples": source.max_examples,
        },
        "extraction": {"layers": layers, "dtype": config.dtype, "part_size": config.part_size,
                       "mode": "eval"},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "zarr": zarr.__version__,
                     "numcodecs": numcodecs.__version__},
    }


def run_extraction(
    source: SourceConfig,
    backbone: BackboneConfig,
    config: ExtractConfig,
    store_url: str,
    *,
    progress: bool = True,
    storage_options: dict | None = None,
    encoder: TextEncoder | None = None,
) -> ExtractSummary:
    """Extract every requested split of ``source`` into the store at ``store_url`` (resuming if it exists)."""
    started = time.perf_counter()
    data = load_source(source)
    splits = list(config.splits or data.splits)
    unknown = sorted(set(splits) - set(data.splits))
    if unknown:
        raise ValueError(f"extract.splits names {unknown}; the source has splits {sorted(data.splits)}")
    encoder = encoder or TextEncoder(backbone)
    layers = resolve_extract_layers(config.layers, encoder.num_hidden_states)
    store = FeatureStore.create(
        store_url, layers=layers, layer_widths=[encoder.widths[l] for l in layers], dtype=config.dtype,
        label_names=data.label_names, provenance=extraction_provenance(source, data, encoder, config, layers),
        compression=config.compression, storage_options=storage_options,
    )
    summary = ExtractSummary(store=store_url)
    tasks = []
    for split in splits:
        done = store.committed(split)
        for task in plan_parts(split, data.splits[split], config.part_size):
            if part_key(task.index) in done:
                summary.parts_skipped += 1
            else:
                tasks.append(task)
    if config.workers or config.scheduler:
        from ._distributed import run_on_dask

        distributed, _ = run_on_dask(tasks, backbone, store_url, batch_size=config.batch_size,
                                     writer_queue=config.writer_queue, workers=config.workers,
                                     scheduler=config.scheduler, retries=config.retries,
                                     storage_options=storage_options, progress=progress)
        distributed.parts_skipped += summary.parts_skipped
        distributed.seconds = time.perf_counter() - started
        return distributed
    total = sum(len(t.examples) for t in tasks)
    writer = BackgroundWriter(config.writer_queue)
    with tqdm(total=total, desc="extract", unit="ex", disable=not progress, dynamic_ncols=True) as bar:
        try:
            for task in tasks:
                extract_part(encoder, store, task, config.batch_size, writer, summary, bar)
        finally:
            writer.close()
    summary.write_seconds = writer.busy_seconds
    summary.seconds = time.perf_counter() - started
    return summary


def extract_part(encoder: TextEncoder, store: FeatureStore, task: PartTask, batch_size: int,
                 writer: "BackgroundWriter", summary: ExtractSummary, bar: tqdm | None = None) -> None:
    """Run one part: tokenise, sort by length, forward batch by batch, and queue writes + the commit."""
    t0 = time.perf_counter()
    features = encoder.tokenize([ex.text for ex in task.examples])
    lengths = np.array([len(f["input_ids"]) for f in features], dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")  # longest first: the largest batch runs (or fails) first
    summary.tokenize_seconds += time.perf_counter() - t0
    n_tokens = int(lengths.sum())

    part: dict[str, Any] = {}  # the PartWriter, created on the writer thread (it does I/O)

    def open_part() -> None:
        part["writer"] = store.part_writer(task.split, task.index, n_examples=len(task.examples),
                                           n_tokens=n_tokens, source_start=task.start)

    writer.submit(open_part)
    layers = store.layers
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        t0 = time.perf_counter()
        hidden, mask = encoder.hidden_states([features[i] for i in rows])
        # Drop padding: boolean-mask indexing keeps real tokens in (example, position) order = CSR rows.
        # A blocking copy: the writer thread reads these tensors, and must not see an unfinished GPU copy.
        tokens = {layer: hidden[layer][mask].to("cpu") for layer in layers}
        summary.forward_seconds += time.perf_counter() - t0
        summary.write_wait_seconds += writer.submit(lambda tokens=tokens: part["writer"].append(tokens))
        summary.tokens[task.split] = summary.tokens.get(task.split, 0) + int(lengths[rows].sum())
        if bar is not None:
            bar.update(len(rows))
            elapsed = max(bar.format_dict["elapsed"], 1e-9)
            bar.set_postfix(split=task.split, tokens_s=f"{sum(summary.tokens.values()) / elapsed:.0f}", refresh=False)
    ids = [task.examples[i].id for i in order]
    labels = [task.examples[i].label for i in order]
    writer.submit(lambda: part["writer"].finish(ids, labels, lengths[order]))
    summary.examples[task.split] = summary.examples.get(task.split, 0) + len(task.examples)
    summary.parts_written += 1


class BackgroundWriter:
    """Runs submitted write operations in order on one thread, behind a bounded queue.

    The forward pass keeps going while the previous batch is cast, compressed and written; a full queue
    makes it wait (that wait is returned by :meth:`submit`). The first failure is re-raised on the caller's
    thread at the next submit or at close, and nothing after it is written (so a failed part is never
    committed).
    """

    def __init__(self, maxsize: int):
        self._queue: queue.Queue[Callable[[], Any] | None] = queue.Queue(maxsize=maxsize)
        self._error: BaseException | None = None
        self.busy_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="unipt-writer", daemon=True)
        self._thread.start()

    def submit(self, op: Callable[[], Any]) -> float:
        self._raise_if_failed()
        t0 = time.perf_counter()
        self._queue.put(op)
        return time.perf_counter() - t0

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def _run(self) -> None:
        while (op := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain without writing: nothing after a failure may commit
            t0 = time.perf_counter()
            try:
                op()
            except BaseException as exc:
                self._error = exc
            self.busy_seconds += time.perf_counter() - t0

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


def summary_dict(summary: ExtractSummary) -> dict[str, Any]:
    return {**asdict(summary), "examples_per_s": summary.examples_per_s, "tokens_per_s": summary.tokens_per_s}
