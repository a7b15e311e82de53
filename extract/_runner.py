"""The extraction loop: source -> prepare -> frozen forward -> background writer -> committed parts.

One part is one task: :func:`extract_part` is all a worker needs, whether parts run one after another
here or as tasks on a dask cluster. Committed parts are skipped, so re-running the same command resumes an
interrupted extraction and redoes only unfinished parts. A part is claimed before it is written, so several
runs can extract into one store at once: each skips the parts another is writing and, at the end, waits for
them to commit (or takes them over when their run died).

Three stages overlap: the next part is prepared (texts tokenised; images decoded and processed on the image
processor's threads) on a helper thread while this part's batches go through the backbone, and a background
writer casts, compresses and writes the previous batch. Text and vision encoders offer the same four things
(prepare, hidden_states, layout and widths, provenance), so one loop serves both.

Stochastic views (``extract.views = K``): each batch of a part of a view split goes through the backbone K
times, view 0 in eval mode exactly as without views, views 1 .. K-1 with train-mode dropout seeded from the
view and the batch's example ids (images: also from augmented inputs, seeded per example; ``_augment``).
All K views are written into the same part, which commits only once every view is written.
"""

from __future__ import annotations

import contextlib
import logging
import math
import platform
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar, Union

import numpy as np
from tqdm.auto import tqdm

from unipt.store import FeatureStore, part_key
from unipt.store._claims import Claims, new_run_id
from unipt.store._format import SKIPPED

from ._augment import Augmentation, dropout_seed
from ._backbone import PreparedPart, TextEncoder
from ._image_sources import ImageSourceConfig, load_image_source
from ._sources import Example, SourceData, hash_unit, load_source
from ._stream import PIECE_ORDER, PartTask, Piece, SourcePlan, plan_source
from ._targets import target_rows
from ._vision import VisionEncoder
from .config import BackboneConfig, ExtractConfig, SourceConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
U = TypeVar("U")
Encoder = Union[TextEncoder, VisionEncoder]
AnySourceConfig = Union[SourceConfig, ImageSourceConfig]


@dataclass
class ExtractSummary:
    store: str
    examples: dict[str, int] = field(default_factory=dict)  # per split, extracted in this run
    tokens: dict[str, int] = field(default_factory=dict)
    parts_written: int = 0
    written: list[str] = field(default_factory=list)  # "split/part" of each part this run wrote and committed
    parts_skipped: int = 0  # already committed: resumed past
    parts_by_others: int = 0  # committed meanwhile by another run extracting into the same store
    skipped: dict[str, int] = field(default_factory=dict)  # bad source rows left out, by reason
    truncated: dict[str, int] = field(default_factory=dict)  # per split: examples cut to max_length
    seconds: float = 0.0
    read_seconds: float = 0.0  # reading, validating, deduplicating and splitting the source
    tokenize_seconds: float = 0.0
    forward_seconds: float = 0.0
    write_seconds: float = 0.0  # busy time of the background writer (overlaps the forward pass)
    write_wait_seconds: float = 0.0  # time the forward pass waited for a full writer queue
    view_examples: dict[str, int] = field(default_factory=dict)  # per split: examples x views (forward passes)
    view_bytes: dict[int, int] = field(default_factory=dict)  # per view: stored bytes of its layer arrays

    @property
    def examples_per_s(self) -> float:
        return sum(self.examples.values()) / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens.values()) / max(self.seconds, 1e-9)

    def describe(self) -> str:
        n, t = sum(self.examples.values()), sum(self.tokens.values())
        others = f", {self.parts_by_others} written by another run" if self.parts_by_others else ""
        text = (f"extracted {n} examples ({t} tokens) into {self.parts_written} parts, {self.parts_skipped} parts "
                f"already committed{others}; {self.seconds:.1f}s = {self.examples_per_s:.0f} examples/s, "
                f"{self.tokens_per_s:.0f} tokens/s (read source {self.read_seconds:.1f}s, tokenize "
                f"{self.tokenize_seconds:.1f}s, forward "
                f"{self.forward_seconds:.1f}s, writer busy {self.write_seconds:.1f}s, waited on writer "
                f"{self.write_wait_seconds:.1f}s)")
        if self.skipped:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.skipped.items()))
            text += f"; skipped {sum(self.skipped.values())} bad source rows ({reasons}; listed in the store)"
        if self.truncated:
            text += (f"; {sum(self.truncated.values())} examples cut to max_length "
                     f"({', '.join(f'{s} {c}' for s, c in sorted(self.truncated.items()))})")
        if len(self.view_bytes) > 1:
            per_split = ", ".join(f"{s} {self.view_examples[s] // max(self.examples.get(s, 1), 1)}"
                                  for s in sorted(self.view_examples) if self.view_examples[s] != self.examples.get(s))
            per_view = ", ".join(f"view {v} {self.view_bytes[v] / 2**20:.2f} MiB" for v in sorted(self.view_bytes))
            text += (f"; stochastic views per example: {per_split} ({sum(self.view_examples.values())} forward "
                     f"passes); layer bytes written per view: {per_view}")
        return text


@dataclass(frozen=True)
class PartRef:
    """A part to come back to (another run holds its claim): its examples are read again if it is needed."""

    split: str
    index: int
    n_examples: int

    @property
    def name(self) -> str:
        return part_key(self.index)


def load_examples(source: AnySourceConfig) -> SourceData:
    """Read, validate and split a text or an image source."""
    return load_image_source(source) if isinstance(source, ImageSourceConfig) else load_source(source)


def encoder_options(source: AnySourceConfig, config: ExtractConfig) -> dict | None:
    """None for a text source; for an image source, the VisionEncoder options (plain data: dask ships them)."""
    if isinstance(source, ImageSourceConfig):
        options = {"bad_input": source.bad_input, "max_grid": config.max_grid}
        return {**options, "augment": augmentation_options(config)} if config.views > 1 else options
    if config.max_grid is not None:
        raise ValueError("extract.max_grid pools CNN feature maps; a text source has none: leave it unset")
    return None


def augmentation_options(config: ExtractConfig) -> dict[str, Any]:
    """The Augmentation settings of image views >= 1, as plain data (dask ships them to workers)."""
    return {"scale": list(config.augment_scale), "ratio": list(config.augment_ratio), "flip": config.augment_flip}


def views_record(source: AnySourceConfig, config: ExtractConfig, splits: Sequence[str]) -> dict[str, Any] | None:
    """The store's views record {"count", "splits"} (None: a plain eval-mode store); ``splits``: the source's."""
    if config.views == 1:
        return None
    unknown = sorted(set(config.views_splits) - set(splits))
    if unknown:
        raise ValueError(f"extract.views_splits names {unknown}; the source has splits {sorted(splits)}")
    return {"count": config.views, "splits": sorted(config.views_splits)}


def views_provenance(source: AnySourceConfig, config: ExtractConfig) -> dict[str, Any]:
    """How views >= 1 were made, for the store's provenance (extraction.views)."""
    image = isinstance(source, ImageSourceConfig)
    return {"count": config.views, "splits": sorted(config.views_splits),
            "dropout": "train mode except normalisation layers with running statistics; seed "
                       "sha256(dropout, view, the batch's example ids)",
            "batch_size": config.batch_size,  # the dropout seeds follow the batches
            "augmentation": Augmentation(**augmentation_options(config)).describe() if image else None}


def build_encoder(backbone: BackboneConfig, vision: dict | None) -> Encoder:
    """The frozen encoder: a text model, or (``vision`` options given) an image model behind its processor."""
    return TextEncoder(backbone) if vision is None else VisionEncoder(backbone, **vision)


def make_encoder(source: AnySourceConfig, backbone: BackboneConfig, config: ExtractConfig) -> Encoder:
    """The frozen encoder for this kind of source."""
    return build_encoder(backbone, encoder_options(source, config))


def prefetch(items: Iterable[T], fn: Callable[[T], U]) -> Iterator[tuple[T, U]]:
    """Yield ``(item, fn(item))``; ``fn`` of the next item runs on a helper thread while the caller works."""
    items = iter(items)
    done = object()

    def step():
        item = next(items, done)
        return item, (None if item is done else fn(item))

    with ThreadPoolExecutor(1, thread_name_prefix="unipt-prefetch") as pool:
        future = pool.submit(step)
        while True:
            item, value = future.result()
            if item is done:
                return
            future = pool.submit(step)
            yield item, value


def resolve_extract_layers(selection, num_hidden_states: int, stages: Sequence[int] | None = None) -> list[int]:
    """"all", "stages" or indices (negative from the end) onto hidden-state indices 0 .. num_hidden_states - 1."""
    if selection == "stages" and stages is not None:
        return list(stages)
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


# Source fields added with tasks: recorded only where a source sets them, so the provenance of a store
# extracted before they existed is what a resuming run computes.
_TASK_SETTINGS = ("task", "text_pair_column", "label_delimiter", "target_columns", "group_column")
_UNSET = {"task": "classification", "text_pair_column": None, "label_delimiter": None, "target_columns": None,
          "group_column": None}

PART_ORDER = "hash"  # provenance "part_order" of stores planned from the whole source in memory


def plan_parts(split: str, examples: Sequence[Example], part_size: int) -> list[PartTask]:
    """Cut a split into parts of ``part_size`` examples, taken in the order of a hash of their ids.

    Each part is then a uniform random sample of the split, whatever order the source is in: sources sorted
    by label (or by time, or by anything a label correlates with) would otherwise give parts of one class,
    and a streaming loader whose shuffle buffer spans a few parts would train on near single-class batches.
    The hash order is stable (same ids, same parts), so resuming and concurrent runs agree on every part.
    """
    ordered = sorted(examples, key=lambda ex: hash_unit(ex.id, "part"))
    return [PartTask(split, i, i * part_size, ordered[i * part_size : (i + 1) * part_size])
            for i in range(math.ceil(len(ordered) / part_size))]


@dataclass
class InMemoryPlan:
    """The plan of a source read whole into memory (:func:`load_examples`): image sources, a ``data`` given
    by the caller, and stores planned that way before sources were streamed (provenance part_order "hash")."""

    data: SourceData
    part_size: int

    @property
    def split_names(self) -> list[str]:
        return list(self.data.splits)

    @property
    def plan(self) -> dict[str, dict[str, int]]:
        return {split: {"examples": len(examples), "parts": math.ceil(len(examples) / self.part_size)}
                for split, examples in self.data.splits.items()}

    @property
    def label_names(self) -> list[str]:
        return self.data.label_names

    @property
    def fingerprint(self) -> str:
        return self.data.fingerprint

    @property
    def stats(self) -> dict[str, Any]:
        return self.data.stats

    @property
    def skipped(self) -> list:
        return self.data.skipped

    def tasks(self, splits: Sequence[str], skip: dict[str, set[str]] | None = None,
              want: dict[str, set[str]] | None = None) -> Iterator[PartTask]:
        for split in splits:
            for task in plan_parts(split, self.data.splits[split], self.part_size):
                if task.name not in (skip or {}).get(split, ()) and (want is None or task.name in want.get(split, ())):
                    yield task


Plan = Union[InMemoryPlan, SourcePlan]


def plan_extraction(source: AnySourceConfig, config: ExtractConfig, existing: FeatureStore | None, *,
                    data: SourceData | None = None) -> Plan:
    """How this run plans the source: streamed piece by piece (text sources), or whole in memory (image
    sources, ``data`` given, or a store planned that way before: it resumes as it was planned).

    A store planned piece by piece hands its latest source version's pieces to the planner: a source that
    has grown since is planned as those pieces (checked unchanged) plus new ones."""
    order = (existing.provenance.get("extraction", {}).get("part_order") if existing is not None else None)
    if isinstance(source, ImageSourceConfig) or data is not None or order == PART_ORDER:
        return InMemoryPlan(data or load_examples(source), config.part_size)
    version = existing.source_version() if existing is not None else None
    recorded_layout = (existing.provenance.get("extraction", {}).get(k) for k in ("part_size", "block_rows")) \
        if existing is not None else ()
    if tuple(recorded_layout) != (config.part_size, config.block_rows):
        version = None  # planned otherwise: creating the store refuses it, naming the settings that differ
    recorded = [Piece.from_record(p) for p in version["pieces"]] if version is not None else []
    return plan_source(source, part_size=config.part_size, block_rows=config.block_rows, recorded=recorded,
                       allow_new=not source.max_examples)


def source_fingerprints(source: AnySourceConfig, store: FeatureStore, data: SourceData | None = None) -> tuple[str, str]:
    """(the source's fingerprint as the store computes it, the fingerprint the store records for it): equal when
    ``source`` is what the store was extracted from. A store planned piece by piece records the rows of its
    latest source version (``data``: the source already in memory, for the other stores)."""
    version = store.source_version()
    extraction = store.provenance.get("extraction", {})
    if version is not None and not isinstance(source, ImageSourceConfig):
        plan = plan_source(source, part_size=extraction["part_size"], block_rows=extraction["block_rows"])
        return plan.fingerprint, version["fingerprint"]
    data = data or load_examples(source)
    return data.fingerprint, store.provenance.get("source", {}).get("fingerprint")


def _existing_store(url: str, storage_options: dict | None) -> FeatureStore | None:
    from unipt.store import StoreError

    try:
        return FeatureStore.open(url, storage_options=storage_options)
    except StoreError:
        return None


def extraction_provenance(source: AnySourceConfig, data: Plan, encoder: Encoder, config: ExtractConfig,
                          layers: list[int], first_fingerprint: str | None = None) -> dict[str, Any]:
    """The store's provenance. ``first_fingerprint``: a grown store's, of the source version it was created
    from (the root provenance never changes; each later version is in the store's _sources records)."""
    import numcodecs
    import torch
    import transformers
    import zarr

    if isinstance(source, ImageSourceConfig):
        settings = {"modality": "image", **{k: v for k, v in asdict(source).items()
                                            if k != "path" and not (k in _UNSET and v == _UNSET[k])}}
    else:  # the text source's fields as stores have always recorded them, and the task's where they are set
        settings = {key: getattr(source, key) for key in ("text_column", "label_column", "id_column", "dedupe",
                                                            "splits", "split_column", "max_examples", "bad_input")}
        settings.update({key: getattr(source, key) for key in _TASK_SETTINGS if getattr(source, key) != _UNSET[key]})
    streamed = isinstance(data, SourcePlan)
    return {
        "backbone": encoder.provenance(),
        "source": {"location": source.path, "fingerprint": first_fingerprint or data.fingerprint, **settings},
        "extraction": {"layers": layers, "dtype": config.dtype, "part_size": config.part_size,
                       "part_order": PIECE_ORDER if streamed else PART_ORDER, "mode": "eval",
                       **({"block_rows": data.block_rows} if streamed else {}),
                       # K = 1: no key at all, so a store without views has the provenance it always had
                       **({"views": views_provenance(source, config)} if config.views > 1 else {})},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "zarr": zarr.__version__,
                     "numcodecs": numcodecs.__version__},
    }


def run_extraction(
    source: AnySourceConfig,
    backbone: BackboneConfig,
    config: ExtractConfig,
    store_url: str,
    *,
    progress: bool = True,
    storage_options: dict | None = None,
    encoder: Encoder | None = None,
    data: SourceData | None = None,
) -> ExtractSummary:
    """Extract every requested split of ``source`` (text or images) into the store at ``store_url`` (resuming
    if it exists, growing it when the source has gained rows or shards since).

    ``encoder`` / ``data``: an already loaded backbone / ``load_examples(source)`` (the source held in
    memory), to reuse across calls. Without ``data`` a text source is streamed (:mod:`._stream`).
    """
    started = time.perf_counter()
    existing = _existing_store(store_url, storage_options)  # the store to resume or grow, if there is one
    plan = plan_extraction(source, config, existing, data=data)
    read_seconds = time.perf_counter() - started
    unknown = sorted(set(config.splits or ()) - set(plan.split_names))
    if unknown:
        raise ValueError(f"extract.splits names {unknown}; the source has splits {sorted(plan.split_names)}")
    views = views_record(source, config, plan.split_names)
    own_encoder = encoder is None
    encoder = encoder or make_encoder(source, backbone, config)
    with contextlib.ExitStack() as cleanup:
        if own_encoder:
            cleanup.callback(encoder.close)  # the image processor's threads
        splits = list(config.splits or plan.split_names)
        layers = resolve_extract_layers(config.layers, encoder.num_hidden_states, encoder.stages)
        first = existing.provenance["source"].get("fingerprint") if existing is not None else None
        # A store with source versions keeps its first version's fingerprint in its provenance.
        versioned = isinstance(plan, SourcePlan) and existing is not None and existing.source_version() is not None
        store = FeatureStore.create(
            store_url, layers=layers, layer_widths=[encoder.widths[l] for l in layers], dtype=config.dtype,
            label_names=plan.label_names,
            provenance=extraction_provenance(source, plan, encoder, config, layers, first if versioned else None),
            compression=config.compression, storage_options=storage_options,
            layer_shapes=[encoder.row_shapes[l] for l in layers] if encoder.layout == "maps" else None,
            # every split of the source, whichever this run extracts: readers tell a finished split by it
            plan=plan.plan,
            task=getattr(source, "task", "classification"),
            views=views,
        )
        if isinstance(plan, SourcePlan):
            record_source_version(store, plan)
        run_id = new_run_id()
        summary = ExtractSummary(store=store_url, skipped=dict(plan.stats.get("skipped", {})),
                                 read_seconds=read_seconds)
        if plan.skipped:
            with store.claims(run_id, config.claim_ttl) as claims:
                if claims.acquire(SKIPPED, "records"):  # else another run started together is writing them
                    store.record_skipped([(s.id, s.row, s.reason) for s in plan.skipped])
        done: dict[str, set[str]] = {}
        done_examples = 0
        for split in splits:
            parts = store.parts(split)
            done[split] = {p.name for p in parts}
            done_examples += sum(p.n_examples for p in parts) * store.views(split)
            summary.parts_skipped += len(parts)
        # Forward passes still to run: each view of an example is one.
        total = sum(plan.plan[split]["examples"] * store.views(split) for split in splits) - done_examples
        if config.workers or config.scheduler:
            from ._distributed import run_on_dask

            distributed, _ = run_on_dask(plan.tasks(splits, skip=done), backbone, store_url,
                                         vision=encoder_options(source, config), total=total,
                                         batch_size=config.batch_size,
                                         writer_queue=config.writer_queue, workers=config.workers,
                                         scheduler=config.scheduler, retries=config.retries, run_id=run_id,
                                         claim_ttl=config.claim_ttl, storage_options=storage_options,
                                         progress=progress)
            distributed.parts_skipped += summary.parts_skipped
            distributed.skipped, distributed.read_seconds = summary.skipped, read_seconds
            finish_index(store, splits)
            distributed.seconds = time.perf_counter() - started
            return distributed
        desc = "extract" if views is None else f"extract ({config.views} views of {', '.join(views['splits'])})"
        with tqdm(total=total, desc=desc, unit="ex", disable=not progress, dynamic_ncols=True) as bar, \
                store.claims(run_id, config.claim_ttl) as claims:
            writer = BackgroundWriter(config.writer_queue)
            try:
                todo: Iterable[PartTask] = plan.tasks(splits, skip=done)
                while True:
                    deferred: list[PartRef] = []
                    for task, prepared in prefetch(todo, lambda task: encoder.prepare(
                            task.examples, views=store.views(task.split))):
                        if not extract_claimed_part(encoder, store, claims, task, config.batch_size, writer, summary,
                                                    bar, prepared=prepared):
                            deferred.append(PartRef(task.split, task.index, task.n_examples))
                    free = wait_for_other_runs(store, claims, deferred, summary, bar)
                    if not free:
                        break
                    # Parts whose claims went stale: their examples are read again (only theirs are kept).
                    want: dict[str, set[str]] = {}
                    for ref in free:
                        want.setdefault(ref.split, set()).add(ref.name)
                    todo = plan.tasks(splits, want=want)
            finally:
                writer.close()
        finish_index(store, splits)
        summary.write_seconds = writer.busy_seconds
        summary.seconds = time.perf_counter() - started
        return summary


def record_source_version(store: FeatureStore, plan: SourcePlan) -> None:
    """Record the source version ``plan`` read, unless the store's latest version is that one already."""
    from unipt.store._versions import record_version

    latest = store.source_version(refresh=True)
    if latest is not None and latest["fingerprint"] == plan.fingerprint:
        return
    version = 1 if latest is None else latest["version"] + 1
    record_version(store._root.store, store._root.path, version=version, fingerprint=plan.fingerprint,
                   block_rows=plan.block_rows, rows=plan.stats["rows"], plan=plan.plan,
                   pieces=[p.record() for p in plan.pieces], stats=plan.stats)
    store.source_version(refresh=True)
    if latest is not None:
        log.info("%s grew to source version %d: %d new piece(s), %d parts planned in all (new parts only are "
                 "extracted)", store.url, version, plan.new_pieces, sum(p["parts"] for p in plan.plan.values()))


def finish_index(store: FeatureStore, splits: Sequence[str]) -> None:
    """Fold this run's commits into each split's index (its journal into a new base); never fails the run:
    readers list a split whose index is behind, and `unipt store index` rebuilds it."""
    from unipt.store._claims import creates_exclusively
    from unipt.store._index import compact_index, index_missing

    if not creates_exclusively(store._root.store):
        log.info("%s cannot create objects exclusively: its split index is left to `unipt store index` (readers "
                 "list the splits meanwhile)", store.url)
        return
    for split in splits:
        try:
            result = compact_index(store, split)
            # Committed parts the index lacks (a run killed between a commit and its index entry): add them.
            if result.missing and index_missing(store, split, result.missing):
                compact_index(store, split)
        except Exception as exc:  # noqa: BLE001 - the parts are committed; the index is only an accelerator
            log.warning("the index of %s split %r was not updated (%s); readers list the split until `unipt "
                        "store index %s` rebuilds it", store.url, split, exc, store.url)


def extract_claimed_part(encoder: Encoder, store: FeatureStore, claims: Claims, task: PartTask,
                         batch_size: int, writer: "BackgroundWriter", summary: ExtractSummary,
                         bar: tqdm | None = None, prepared: PreparedPart | None = None) -> bool:
    """Claim ``task``'s part and extract it; False (and nothing written) when another run holds it.

    The claim is released by the writer once the part has committed (or by ``claims.close()`` on failure).
    """
    if not claims.acquire(task.split, task.name):
        return False
    if store.is_committed(task.split, task.name):  # another run committed it between planning and claiming
        claims.release(task.split, task.name)
        summary.parts_by_others += 1
        if bar is not None:
            bar.update(len(task.examples) * store.views(task.split))
        return True
    extract_part(encoder, store, task, batch_size, writer, summary, bar, prepared=prepared,
                 before_commit=lambda: claims.check(task.split, task.name), run=claims.owner.run)
    writer.submit(lambda: claims.release(task.split, task.name))
    return True


def wait_for_other_runs(store: FeatureStore, claims: Claims, deferred: Sequence[PartTask | PartRef],
                        summary: ExtractSummary, bar: tqdm | None = None) -> list[PartTask]:
    """Wait while other runs hold the claims on ``deferred`` parts; return those still to do here.

    A part another run commits is counted and dropped; a part whose claim goes stale (its run died, or
    stopped sending heartbeats for ``ttl`` seconds) comes back to be taken over.
    """
    pending = list(deferred)
    announced = False
    while pending:
        still = []
        for i, task in enumerate(pending):
            if store.is_committed(task.split, task.name):
                summary.parts_by_others += 1
                if bar is not None:
                    bar.update(task.n_examples * store.views(task.split))
                continue
            holder = claims.holder(task.split, task.name)
            if holder is None or claims.is_stale(holder):
                # Free to take: back to the extraction loop, without the parts counted as committed above
                # (they would be found committed there and counted again).
                return still + pending[i:]
            still.append(task)
        pending = still
        if pending:
            if not announced:
                log.info("waiting for %d parts another run is extracting into %s", len(pending), store.url)
                announced = True
            time.sleep(min(2.0, claims.ttl / 4))
    return []


def extract_part(encoder: Encoder, store: FeatureStore, task: PartTask, batch_size: int,
                 writer: "BackgroundWriter", summary: ExtractSummary, bar: tqdm | None = None, *,
                 prepared: PreparedPart | None = None, before_commit: Callable[[], None] | None = None,
                 run: str = "") -> None:
    """Run one part: prepare (unless done ahead), sort by length, forward batch by batch (each of the split's
    views in turn), and queue the writes + the commit on ``writer``. ``run``: the extraction run's id, recorded
    in the part's index entry (which run wrote it)."""
    views = store.views(task.split)
    prepared = prepared or encoder.prepare(task.examples, views=views)
    examples, lengths = prepared.examples, prepared.lengths
    order = np.argsort(-lengths, kind="stable")  # longest first: the largest batch runs (or fails) first
    summary.tokenize_seconds += prepared.seconds
    n_tokens = int(lengths.sum())

    part: dict[str, Any] = {}  # the PartWriter, created on the writer thread (it does I/O)

    def open_part() -> None:
        part["writer"] = store.part_writer(task.split, task.index, n_examples=len(examples),
                                           n_tokens=n_tokens, source_start=task.start, run=run)

    writer.submit(open_part)
    layers = store.layers
    maps = store.layout == "maps"
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch_ids = [examples[i].id for i in rows]
        for view in range(views):
            t0 = time.perf_counter()
            inputs = prepared.features_of(view)
            # View 0: eval mode, exactly the forward of a store without views. Views >= 1: train-mode dropout
            # seeded by the view and this batch's ids (deterministic: a part's batches always are the same).
            batch = [inputs[i] for i in rows]
            hidden, mask = (encoder.hidden_states(batch) if view == 0  # the call a store without views makes
                            else encoder.hidden_states(batch, dropout_seed=dropout_seed(view, batch_ids)))
            # Tokens: drop padding; boolean-mask indexing keeps real tokens in (example, position) order = CSR
            # rows. Maps: one (H, W, C) row per example (channels last: int8 scales then go per map position).
            # A blocking copy: the writer thread reads these tensors, and must not see an unfinished GPU copy.
            tokens = {layer: (hidden[layer].permute(0, 2, 3, 1) if maps else hidden[layer][mask]).to("cpu")
                      for layer in layers}
            summary.forward_seconds += time.perf_counter() - t0
            summary.write_wait_seconds += writer.submit(
                lambda tokens=tokens, view=view: part["writer"].append(tokens, view=view))
            if bar is not None:
                bar.update(len(rows))
        summary.tokens[task.split] = summary.tokens.get(task.split, 0) + int(lengths[rows].sum())
        if bar is not None:
            elapsed = max(bar.format_dict["elapsed"], 1e-9)
            bar.set_postfix(split=task.split, tokens_s=f"{sum(summary.tokens.values()) / elapsed:.0f}", refresh=False)
    if bar is not None and prepared.skipped:
        bar.update(len(prepared.skipped) * views)
    ids = [examples[i].id for i in order]
    labels = target_rows(store.task, [prepared.token_targets[i] if prepared.token_targets is not None
                                      else examples[i].label for i in order], len(store.label_names))
    truncated = [examples[i].id for i in prepared.truncated]
    skipped = [(s.id, s.row, s.reason) for s in prepared.skipped]

    def finish() -> None:
        part["writer"].finish(ids, labels, lengths[order], truncated=truncated, skipped=skipped,
                              before_commit=before_commit)
        for view, nbytes in part["writer"].view_bytes.items():  # (on the writer thread, as every write)
            summary.view_bytes[view] = summary.view_bytes.get(view, 0) + nbytes

    writer.submit(finish)
    summary.examples[task.split] = summary.examples.get(task.split, 0) + len(examples)
    summary.view_examples[task.split] = summary.view_examples.get(task.split, 0) + len(examples) * views
    for s in prepared.skipped:
        summary.skipped[s.reason] = summary.skipped.get(s.reason, 0) + 1
    if truncated:
        summary.truncated[task.split] = summary.truncated.get(task.split, 0) + len(truncated)
    summary.parts_written += 1
    summary.written.append(f"{task.split}/{task.name}")


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
