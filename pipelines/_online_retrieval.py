"""Online reference for two-tower retrieval: both backbones run inside the loop, on raw inputs, at every step.

The cached trainer (:func:`unipt.train.retrieval.fit_retrieval`) reads each tower's hidden states from its
store; this loop computes them live instead, and changes nothing else, so the two differ only in where the
activations come from:

* the model is the cached run's: :class:`unipt.train.retrieval._trainer._Run` builds it from the same
  TrainConfig and the two stores' layer lists and widths (same seed, same init, same random stream), and
  steps it with its own loss, AdamW, schedule and gradient clipping;
* each tower's raw examples come from its source config through :func:`unipt.extract.load_examples` (the
  reader extraction uses, so the ids are the ids the stores and the pair index hold), and go through the
  extraction's own encoder: texts tokenised once by :class:`TextEncoder`; images decoded and processed by
  :class:`VisionEncoder` batch by batch, inside the timed loop, as an online data loader does every epoch;
* the backbones are frozen (eval mode, forward under ``torch.no_grad``); a tower reads the hidden states its
  store holds, as float32 with padding zeroed (what the cached loader hands over), optionally rounded
  through the store's dtype (``round_to_store``: bit parity with a float16 cache; off by default, as in
  :mod:`._online`, where the side network sees the backbone's own float32 states);
* after every epoch the eval split's whole gallery (every query, every document of the split) is embedded
  online and scored by R@1/5/10 both ways; the best epoch by ``select_metric`` (default rsum) is kept and
  scored once on the test gallery at the end.

Batching: the train queries are taken in the query store's stored order and batched by the cached loader's
memory-mode policy with the same seeds (:func:`._online.epoch_batches` over the stored lengths, seeded by
``(shuffle_seed, epoch)``; one relevant document per query drawn by ``(shuffle_seed, epoch, 1)``), so the
batches equal those of a cached run whose query split is held in memory (``loader.mode = "memory"``, or
"auto" under the memory budget): the same examples in the same order. A cached run in stream mode mixes
parts through a shuffle buffer instead, so its batches differ (same sizes, same length bucketing, other
examples together). Either way a stored query that no pair names is dropped from its batch, as the cached
loader drops it. Reading the stored order touches only the stores' id and length columns.

Results are an :class:`._online.OnlineRunResult`: per-epoch seconds (training steps only, the backbones'
forwards and image decoding included; evaluation untimed) and peak memory above the loaded models, so a
benchmark can put the row beside the cached ones.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from unipt.extract import (BackboneConfig, ExtractConfig, ImageSourceConfig, SourceConfig, TextInputs,
                           backbone_hashes, load_examples, make_encoder)
from unipt.extract._runner import source_fingerprints
from unipt.store import FeatureStore, PairIndex, SplitPairs, round_trip
from unipt.train import Batch, LoaderConfig, MetricsLog, TrainConfig
from unipt.train._trainer import _autocast, resolve_device
from unipt.train.retrieval import PairBatch, TwoTower, load_two_tower, retrieval_metrics
from unipt.train.retrieval._trainer import _Run
from unipt.train.retrieval.config import TOWERS

from ._memory import PeakMemory
from ._online import OnlineRunResult, epoch_batches

TowerInputs = tuple[SourceConfig | ImageSourceConfig, BackboneConfig]  # a tower's raw source and its backbone


class OnlineTower:
    """One tower's raw examples and frozen backbone: for any ids of a split, the hidden states its store
    holds for them, computed live, as a :class:`unipt.train.Batch` (padded, masked, float32)."""

    def __init__(self, tower: str, source: SourceConfig | ImageSourceConfig, backbone: BackboneConfig,
                 store: FeatureStore, splits: Sequence[str], *, device: torch.device, round_to_store: bool = False):
        self.tower, self.store = tower, store
        self.storage_dtype = store.dtype if round_to_store else None
        self.maps = store.layout == "maps"
        self.images = isinstance(source, ImageSourceConfig)
        data = load_examples(source)
        found, recorded = source_fingerprints(source, store, data)
        if recorded != found:
            raise ValueError(f"the {tower} source {source.path!r} is not what the {tower} store {store.url} was "
                             f"extracted from (source fingerprint {found}, the store records {recorded}); "
                             "pass the source config the store was extracted with")
        max_grid = store.provenance.get("backbone", {}).get("max_grid")
        self.encoder = make_encoder(source, replace(backbone, device=str(device)), ExtractConfig(max_grid=max_grid))
        for key, value in backbone_hashes(self.encoder.folder).items():
            if store.provenance.get("backbone", {}).get(key) != value:
                raise ValueError(f"the {tower} backbone {backbone.model!r} is not the one the {tower} store "
                                 f"{store.url} was extracted with ({key} {value}, the store records "
                                 f"{store.provenance.get('backbone', {}).get(key)}); pass the store's backbone")
        missing = sorted(set(splits) - set(data.splits))
        if missing:
            raise ValueError(f"the {tower} source has no split(s) {missing}; it has {sorted(data.splits)}")
        self.examples = {split: {ex.id: ex for ex in data.splits[split]} for split in splits}
        self.features: dict[str, dict[str, Any]] = {}  # text: token ids per example id, tokenised once
        if not self.images:
            for split, examples in self.examples.items():
                listed = list(examples.values())
                inputs = TextInputs.of(listed)  # pairs are encoded together, as extraction encodes them
                tokens = self.encoder.tokenize(inputs.texts, inputs.pairs, inputs.words) if listed else []
                self.features[split] = {ex.id: f for ex, f in zip(listed, tokens)}
        self.order = {split: _stored_order(store, split) for split in splits}  # (ids, lengths), as stored
        for split, (ids, lengths) in self.order.items():
            self._check_stored(split, ids, lengths)

    def _check_stored(self, split: str, ids: list[str], lengths: np.ndarray) -> None:
        """Every stored example has its raw input here, of the stored length (text: max_length agrees)."""
        absent = [i for i in ids if i not in self.examples[split]]
        if absent:
            raise ValueError(f"{len(absent)} example(s) of split {split!r} of the {self.tower} store {self.store.url} "
                             f"are not in its source (e.g. {absent[:5]}); pass the source it was extracted from")
        if not self.images:
            differ = [i for i, n in zip(ids, lengths) if len(self.features[split][i]["input_ids"]) != n]
            if differ:
                raise ValueError(f"{len(differ)} example(s) of split {split!r} tokenise to another length than the "
                                 f"{self.tower} store holds (e.g. {differ[:5]}); extract and train with the same "
                                 "backbone.max_length")

    def lengths(self, split: str, ids: Sequence[str]) -> np.ndarray:
        """Tokens per example (the stored lengths)."""
        at = dict(zip(*self.order[split]))
        return np.array([at[i] for i in ids], dtype=np.int64)

    def batch(self, split: str, ids: Sequence[str], layers: Sequence[int]) -> Batch:
        """The stored ``layers`` for ``ids`` (in that order, repeats allowed), live from the backbone."""
        if self.images:
            examples = [self.examples[split][i] for i in ids]
            prepared = self.encoder.prepare(examples, batch_size=len(examples))  # decode + process, now
            if len(prepared.examples) != len(examples):
                raise ValueError(f"{len(examples) - len(prepared.examples)} image(s) of the {self.tower} source did "
                                 f"not decode ({[s.id for s in prepared.skipped][:5]}) but are in its store")
            features = prepared.features
        else:
            features = [self.features[split][i] for i in ids]
        hidden, mask = self.encoder.hidden_states(features)  # every candidate layer; under no_grad
        states = [self._as_cached(hidden[l], mask) for l in layers]
        return Batch(states, mask, torch.zeros(len(ids), dtype=torch.int64, device=mask.device), list(ids))

    def _as_cached(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A live hidden state as the cached loader hands it over: float32, zeros on padding, and (with
        ``round_to_store``) rounded as writing it to the store rounds it; maps stay (B, C, H, W)."""
        if self.maps:
            h = h.float()
            return h if self.storage_dtype is None else \
                round_trip(h.permute(0, 2, 3, 1), self.storage_dtype).permute(0, 3, 1, 2)  # stored channels last
        h = h.float().masked_fill(~mask[..., None], 0.0)  # (B, N, D)
        return h if self.storage_dtype is None else round_trip(h, self.storage_dtype)

    def close(self) -> None:
        self.encoder.close()


def _stored_order(store: FeatureStore, split: str) -> tuple[list[str], np.ndarray]:
    """A split's example ids and lengths in stored order (parts in order): the order the cached loader
    holds a split in memory. Reads the id and length columns only."""
    ids, lengths = [], []
    for part in store.parts(split):
        data = store.read_part(part, layers=[])
        ids += [str(i) for i in data.example_id]
        lengths.append(np.asarray(data.length, dtype=np.int64))
    return ids, np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)


def epoch_pairs(query_ids: Sequence[str], lengths: np.ndarray, relevant: Mapping[str, Sequence[str]],
                batch_size: int, seed: int, epoch: int, *,
                bucket_batches: int) -> Iterator[tuple[list[str], list[str], torch.Tensor]]:
    """One epoch's (query ids, document ids, (B, B) positives), as :class:`PairLoader` draws them from a query
    split held in memory: ``query_ids`` (the stored order) shuffled and length-bucketed by ``(seed, epoch)``,
    queries no pair names dropped, one relevant document per query drawn by ``(seed, epoch, 1)``."""
    rng = np.random.default_rng([seed, epoch])
    pick = np.random.default_rng([seed, epoch, 1])
    for rows in epoch_batches(lengths, batch_size, rng, bucket_batches=bucket_batches):
        queries = [query_ids[i] for i in rows if query_ids[i] in relevant]
        if not queries:
            continue
        options = [relevant[q] for q in queries]
        documents = [docs[int(pick.integers(len(docs)))] if len(docs) > 1 else docs[0] for docs in options]
        wanted = [set(docs) for docs in options]
        yield queries, documents, torch.tensor([[d in w for d in documents] for w in wanted], dtype=torch.bool)


@torch.no_grad()
def embed_online(model: TwoTower, tower: OnlineTower, split: str, ids: Sequence[str], layers: Sequence[int],
                 batch_size: int) -> torch.Tensor:
    """(n, E) float32 embeddings of ``ids`` (in that order) by one tower, computed live, longest first."""
    model.eval()
    order = np.argsort(-tower.lengths(split, ids), kind="stable")  # less padding; the order does not matter
    device = tower.encoder.device
    out = torch.full((len(ids), 0), float("nan"))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = tower.batch(split, [ids[i] for i in rows], layers)
        with _autocast(device):
            emb = model.embed(tower.tower, batch.hidden_states, batch.mask).cpu()
        if out.shape[1] == 0:
            out = torch.full((len(ids), emb.shape[1]), float("nan"))
        out[torch.as_tensor(rows)] = emb
    return out


def score_online(model: TwoTower, towers: Mapping[str, OnlineTower], layers: Mapping[str, Sequence[int]],
                 pairs: SplitPairs, split: str, batch_size: int) -> dict[str, float]:
    """R@K both ways and rsum over the split's whole gallery, both towers embedded live."""
    queries = embed_online(model, towers["query"], split, pairs.queries, layers["query"], batch_size)
    documents = embed_online(model, towers["document"], split, pairs.documents, layers["document"], batch_size)
    return retrieval_metrics(queries, documents, pairs.relevant)


def train_online_retrieval(
    name: str,
    config: TrainConfig,
    towers: Mapping[str, TowerInputs],
    index: PairIndex,
    *,
    query_store: FeatureStore,
    document_store: FeatureStore,
    loader_config: LoaderConfig | None = None,
    round_to_store: bool = False,
    log: MetricsLog | None = None,
    progress: bool = True,
) -> OnlineRunResult:
    """Train the two-tower model ``config`` describes with both backbones in the loop; see the module docstring.

    ``towers``: ``{"query": (source config, backbone config), "document": (...)}``, the configs the stores were
    extracted with (checked against their provenance). The stores give the model its layers and widths (it is
    built exactly as the cached run's) and the stored order the batches follow; ``loader_config`` only its
    ``bucket_batches``. ``config.device`` decides where the backbones run.
    """
    if set(towers) != set(TOWERS):
        raise ValueError(f"towers must name exactly {list(TOWERS)}, got {sorted(towers)}")
    index.check_stores(query_store, document_store)
    log = log or MetricsLog(None)
    loader_config = loader_config or LoaderConfig()
    stores = {"query": query_store, "document": document_store}
    device = resolve_device(config.device)
    splits = [s for s in dict.fromkeys((config.train_split, config.eval_split, config.test_split))
              if s and s in index.splits]
    if config.train_split not in splits:
        raise ValueError(f"the pair index has no train split {config.train_split!r}; it has {sorted(index.splits)}")

    with tempfile.TemporaryDirectory(prefix="unipt-online-retrieval-") as out_dir:
        live: dict[str, OnlineTower] = {}
        try:
            for t in TOWERS:  # backbones first: loading them draws on torch's generator, seeded for the run next
                source, backbone = towers[t]
                live[t] = OnlineTower(t, source, backbone, stores[t], splits, device=device,
                                      round_to_store=round_to_store)
            run = _Run(name, config, stores, Path(out_dir), device)  # seeds, builds, takes its random stream
            return _train(run, live, index, config, loader_config, device, log, progress)
        finally:
            for tower in live.values():
                tower.close()


def _train(run: _Run, towers: Mapping[str, OnlineTower], index: PairIndex, config: TrainConfig,
           loader_config: LoaderConfig, device: torch.device, log: MetricsLog, progress: bool) -> OnlineRunResult:
    layers = run.layers  # per tower, the stored layers its side network reads
    run.pick = {t: list(range(len(layers[t]))) for t in TOWERS}  # each live batch holds exactly its layers
    train = index.split(config.train_split)
    relevant = {q: [train.documents[d] for d in docs] for q, docs in zip(train.queries, train.relevant)}
    query_ids, lengths = towers["query"].order[config.train_split]
    steps_per_epoch = math.ceil(len(relevant) / config.batch_size)  # as len(PairLoader)
    run.start(steps_per_epoch)
    eval_pairs = index.splits.get(config.eval_split) if config.eval_split else None
    test_pairs = index.splits.get(config.test_split) if config.test_split else None
    epoch_seconds: list[float] = []

    with PeakMemory(device) as peak:
        for epoch in range(config.epochs):
            elapsed = 0.0
            if run.params:
                run.start_epoch()
                start = time.perf_counter()
                bar = tqdm(epoch_pairs(query_ids, lengths, relevant, config.batch_size, config.shuffle_seed, epoch,
                                       bucket_batches=loader_config.bucket_batches),
                           total=steps_per_epoch, desc=f"{run.name} epoch {epoch + 1}/{config.epochs}", unit="batch",
                           disable=not progress, leave=False, dynamic_ncols=True)
                for queries, documents, positives in bar:
                    batch = PairBatch(towers["query"].batch(config.train_split, queries, layers["query"]),
                                      towers["document"].batch(config.train_split, documents, layers["document"]),
                                      positives.to(device))
                    peak.sample()  # both backbones' outputs are held now
                    run.train_step(batch)
                    peak.sample()  # gradients and optimiser state
                    if progress:
                        bar.set_postfix(loss=f"{run.last_loss.item():.3f}", refresh=False)
                    if not run.stepping:  # max_steps reached
                        break
                bar.close()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - start
                epoch_seconds.append(elapsed)
            metrics = score_online(run.model, towers, layers, eval_pairs, config.eval_split, config.batch_size) \
                if eval_pairs is not None else None
            run.end_epoch(epoch, elapsed, metrics, log)  # history, best epoch, its checkpoint
            if run.done:
                break
        test_metrics = None
        if test_pairs is not None:
            best, _ = load_two_tower(run.checkpoint, map_location=str(device))
            test_metrics = score_online(best, towers, layers, test_pairs, config.test_split, config.batch_size)
            run.record_test(test_metrics, log)
    result = run.result(test_metrics, 1)
    return OnlineRunResult(name=result.name, method=f"online_{result.method}", trainable_params=result.trainable_params,
                           best_epoch=result.best_epoch, eval_metrics=result.eval_metrics, test_metrics=test_metrics,
                           train_seconds=result.train_seconds, train_examples_per_s=result.train_examples_per_s,
                           epoch_seconds=epoch_seconds, peak_memory_bytes=peak.bytes, memory_device=str(device),
                           history=result.history)
