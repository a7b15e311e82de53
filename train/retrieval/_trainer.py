"""Fit two-tower retrieval models from two stores joined by a pair index; no backbone is loaded.

As :func:`unipt.train.fit_many` does for one store: one pass over the train pairs per epoch steps every run
given (a sweep: learning rates, methods, losses, seeds), each with its own model, optimiser, schedule and
random stream; after every epoch each run embeds the eval split's whole gallery (every query, every document)
and is scored by R@1/5/10 both ways; its best epoch by ``select_metric`` (default rsum) is checkpointed; at the
end the best checkpoints are scored on the test gallery. A run whose towers have nothing to train (``frozen``:
the backbones' own mean-pooled embeddings, the zero-shot line) is scored without training.
"""

from __future__ import annotations

import json
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from unipt.store import FeatureStore, PairIndex, SplitPairs

from .._loader import ActivationLoader
from .._methods import config_dict
from .._trainer import (MetricsLog, RunResult, _autocast, _check_one_pass, _RandomStream, _schedule, _train_pass,
                        _warn, descend, resolve_device)
from ..config import LoaderConfig, TrainConfig
from ._checkpoint import load_two_tower, save_two_tower, tower_record
from ._loader import PairBatch, PairLoader
from .config import TOWERS, RetrievalOptions
from .losses import hardest_negative_triplet, info_nce
from .metrics import metric_names, retrieval_metrics
from .model import TwoTower, build_tower

TASK = "retrieval"
DEFAULT_METRIC = "rsum"


def retrieval_options(config: TrainConfig) -> RetrievalOptions:
    """A run's RetrievalOptions from its ``task`` table, refusing unknown keys with the valid ones."""
    valid = {f.name for f in fields(RetrievalOptions)}
    unknown = sorted(set(config.task) - valid)
    if unknown:
        raise ValueError(f"unknown retrieval option(s) {unknown} in train.<run>.task; valid: {sorted(valid)}")
    return RetrievalOptions(**config.task)


def build_two_tower(config: TrainConfig, stores: Mapping[str, FeatureStore]) -> tuple[TwoTower, dict[str, dict]]:
    """The run's two-tower model for these stores, and each tower's checkpoint record."""
    options = retrieval_options(config)
    towers, records, widths = {}, {}, {}
    for tower in TOWERS:
        store = stores[tower]
        method = options.method(tower, config.method)
        module, model_config, layers = build_tower(method, options.model(tower, config.model), store.layer_widths,
                                                   store.layers, options.embed_dim, store.layout,
                                                   f"{tower} store {store.url}", residual=options.residual)
        towers[tower] = module
        records[tower] = tower_record(method, config_dict(model_config), layers, store)
        widths[tower] = getattr(module, "width", options.embed_dim)  # a frozen tower's width is its layer's
    if widths["query"] != widths["document"]:
        raise ValueError(f"the towers' embeddings differ in width (query {widths['query']}, document "
                         f"{widths['document']}): a frozen tower outputs its layer's width, so set task.embed_dim to "
                         "it, or make both towers frozen over layers of one width")
    model = TwoTower(towers["query"], towers["document"], temperature=options.temperature,
                     max_scale=options.max_scale, learn_temperature=options.learn_temperature)
    return model, records


def fit_retrieval(runs: Mapping[str, TrainConfig], query_store: FeatureStore, document_store: FeatureStore,
                  index: PairIndex, out_dir: str | Path, *, loader_config: LoaderConfig | None = None,
                  log: MetricsLog | None = None, progress: bool = True, allow_incomplete: bool = False) -> list[RunResult]:
    """Train every run of ``runs`` from one pass over the train pairs per epoch; results in ``runs``' order."""
    if not runs:
        raise ValueError("fit_retrieval needs at least one run")
    _check_one_pass(runs)
    index.check_stores(query_store, document_store)
    log = log or MetricsLog(None)
    loader_config = loader_config or LoaderConfig()
    first = next(iter(runs.values()))
    stores = {"query": query_store, "document": document_store}
    wanted = [s for s in (first.train_split, first.eval_split, first.test_split) if s]
    for store in stores.values():
        store.check_complete(wanted, allow_incomplete=allow_incomplete, warn=_warn)
    device = resolve_device(first.device)
    pin = device.type == "cuda"
    trainers = [_Run(name, config, stores, Path(out_dir), device) for name, config in runs.items()]
    layers = {t: sorted({l for run in trainers for l in run.layers[t]}) for t in TOWERS}
    for run in trainers:
        run.pick = {t: [layers[t].index(l) for l in run.layers[t]] for t in TOWERS}
    train_loader = PairLoader(query_store, document_store, index.split(first.train_split), first.train_split,
                              layers["query"], layers["document"], batch_size=first.batch_size, shuffle=True,
                              seed=first.shuffle_seed, config=loader_config, pin_memory=pin, accelerator=pin)
    for run in trainers:
        run.start(len(train_loader))
    galleries = {split: Gallery(stores, index.split(split), split, layers, first.batch_size, loader_config)
                 for split in (first.eval_split, first.test_split) if split and split in index.splits}

    for epoch in range(max(config.epochs for config in runs.values())):
        active = [run for run in trainers if not run.done]
        if not active:
            break
        training = [run for run in active if run.params]
        start = end = time.perf_counter()
        if training:
            who = training[0].name if len(trainers) == 1 else f"{len(training)} runs"
            desc = f"{who} epoch {epoch + 1}/{max(run.config.epochs for run in training)}"
            start, end = _train_pass(training, train_loader, epoch, device, desc, progress)
        scores: list[dict[str, float] | None] = [None] * len(active)
        if first.eval_split in galleries:
            scores = galleries[first.eval_split].score([(run.model, run.pick) for run in active], device)
        for run, metrics in zip(active, scores):
            run.end_epoch(epoch, (run.stopped_at or end) - start if run.params else 0.0, metrics, log)

    test_metrics: list[dict[str, float] | None] = [None] * len(trainers)
    if first.test_split in galleries:
        train_loader.release()  # memory mode: the decoded train and eval splits are not needed any more
        if first.eval_split in galleries and first.eval_split != first.test_split:
            galleries[first.eval_split].release()
        best = [(load_two_tower(run.checkpoint, map_location=str(device))[0], run.pick) for run in trainers]
        test_metrics = galleries[first.test_split].score(best, device)
        for run, metrics in zip(trainers, test_metrics):
            run.record_test(metrics, log)
    return [run.result(test, len(trainers)) for run, test in zip(trainers, test_metrics)]


class Gallery:
    """One split's every query and document, embedded batch by batch (unshuffled, length-sorted) by any number
    of models in one pass over each store, then scored against the pair index's relevance."""

    def __init__(self, stores: Mapping[str, FeatureStore], pairs: SplitPairs, split: str,
                 layers: Mapping[str, Sequence[int]], batch_size: int, config: LoaderConfig | None = None):
        self.pairs, self.split = pairs, split
        self.loaders = {t: ActivationLoader(stores[t], split, layers[t], batch_size=batch_size, shuffle=False,
                                            length_sorted=True, config=config or LoaderConfig()) for t in TOWERS}

    def release(self) -> None:
        """Free the decoded split each tower's loader keeps between passes (memory mode)."""
        for loader in self.loaders.values():
            loader.release()

    @torch.no_grad()
    def embed(self, models: Sequence[tuple[TwoTower, Mapping[str, list[int]]]], device: torch.device,
              tower: str) -> list[torch.Tensor]:
        """Per model, (n, E) embeddings of the split's queries or documents, in the index's order."""
        order = self.pairs.queries if tower == "query" else self.pairs.documents
        at = {example_id: i for i, example_id in enumerate(order)}
        out: list[torch.Tensor | None] = [None] * len(models)
        for model, _ in models:
            model.eval()
        for batch in self.loaders[tower]:
            rows = [at.get(example_id) for example_id in batch.example_ids]
            keep = [i for i, row in enumerate(rows) if row is not None]  # queries no pair names are not scored
            if not keep:
                continue
            batch = batch.to(device)
            for k, (model, pick) in enumerate(models):
                with _autocast(device):
                    emb = model.embed(tower, [batch.hidden_states[i] for i in pick[tower]], batch.mask)
                if out[k] is None:
                    out[k] = torch.full((len(order), emb.shape[1]), float("nan"))
                out[k][[rows[i] for i in keep]] = emb[keep].cpu()
        return out

    def score(self, models: Sequence[tuple[TwoTower, Mapping[str, list[int]]]], device: torch.device) -> list[dict[str, float]]:
        queries = self.embed(models, device, "query")
        documents = self.embed(models, device, "document")
        return [retrieval_metrics(q, d, self.pairs.relevant) for q, d in zip(queries, documents)]


def embed_split(model: TwoTower, store: FeatureStore, tower: str, split: str, layers: Sequence[int], *,
                batch_size: int = 64, device: str = "auto", config: LoaderConfig | None = None,
                progress: bool = False) -> tuple[list[str], torch.Tensor]:
    """Every example of one split of one tower's store, embedded: (ids in store order, (n, E) float32)."""
    dev = resolve_device(device)
    model = model.to(dev).eval()
    loader = ActivationLoader(store, split, layers, batch_size=batch_size, shuffle=False, config=config or LoaderConfig())
    ids: list[str] = []
    chunks = []
    with torch.no_grad():
        for batch in tqdm(loader, desc=f"embed {split}", unit="batch", disable=not progress, dynamic_ncols=True):
            batch = batch.to(dev)
            with _autocast(dev):
                chunks.append(model.embed(tower, batch.hidden_states, batch.mask).cpu())
            ids.extend(batch.example_ids)
    return ids, torch.cat(chunks) if chunks else torch.empty(0, 0)


def evaluate_two_tower(checkpoint: str | Path, query_store: FeatureStore, document_store: FeatureStore,
                       index: PairIndex, split: str, *, batch_size: int = 64, device: str = "auto") -> dict[str, float]:
    """R@K both ways and rsum of a saved two-tower checkpoint on one split's gallery."""
    dev = resolve_device(device)
    model, config = load_two_tower(checkpoint, map_location=str(dev))
    index.check_stores(query_store, document_store)
    stores = {"query": query_store, "document": document_store}
    layers = {t: config["towers"][t]["layers"] for t in TOWERS}
    picks = {t: list(range(len(layers[t]))) for t in TOWERS}
    return Gallery(stores, index.split(split), split, layers, batch_size).score([(model, picks)], dev)[0]


class _Run:
    """One two-tower model in training: model, optimiser, schedule, random stream, best checkpoint so far."""

    def __init__(self, name: str, config: TrainConfig, stores: Mapping[str, FeatureStore], out_dir: Path,
                 device: torch.device):
        self.name, self.config, self.device = name, config, device
        self.options = retrieval_options(config)
        self.select_metric = config.select_metric or DEFAULT_METRIC
        if self.select_metric not in metric_names():
            raise ValueError(f"select_metric {self.select_metric!r} is not a retrieval metric; choose one of "
                             f"{metric_names()} (or leave it unset for {DEFAULT_METRIC!r})")
        torch.manual_seed(config.seed)
        self.model, self.towers = build_two_tower(config, stores)
        self.model.to(device)
        self.rng = _RandomStream(device)
        self.layers = {t: self.towers[t]["layers"] for t in TOWERS}
        self.pick: dict[str, list[int]] = {}
        self.params = self.model.trainable()
        self.trainable_params = sum(p.numel() for p in self.params)
        self.checkpoint = out_dir / name
        self.step, self.seen, self.train_seconds, self.done = 0, 0, 0.0, False
        self.stepping, self.stopped_at = False, None
        self.best_score, self.best_epoch, self.best_metrics = None, -1, {}
        self.history: list[dict[str, Any]] = []

    def start(self, steps_per_epoch: int) -> None:
        if not self.params:  # frozen towers: scored once, never stepped
            return
        self.optimizer = torch.optim.AdamW(self.params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        total = steps_per_epoch * self.config.epochs
        if self.config.max_steps:
            total = min(total, self.config.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(self.config, total))

    def start_epoch(self) -> None:
        self.model.train()
        self.stepping, self.stopped_at, self.epoch_seen = True, None, 0
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.batches = 0

    def loss(self, q: torch.Tensor, d: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        if self.options.loss == "triplet":
            return hardest_negative_triplet(q, d, positives, self.options.margin)
        return info_nce(q, d, self.model.scale, positives)

    def train_step(self, batch: PairBatch) -> None:
        with self.rng:
            with _autocast(self.device):
                q, d = self.model([batch.query.hidden_states[i] for i in self.pick["query"]], batch.query.mask,
                                  [batch.document.hidden_states[i] for i in self.pick["document"]], batch.document.mask)
            loss = self.loss(q.float(), d.float(), batch.positives)
            descend(self, loss, len(batch))
        self.loss_sum += loss.detach().double()
        self.batches += 1
        self.last_loss = loss.detach()
        if self.config.max_steps and self.step >= self.config.max_steps:
            self.stepping, self.stopped_at, self.done = False, time.perf_counter(), True

    def end_epoch(self, epoch: int, elapsed: float, metrics: dict[str, float] | None, log: MetricsLog) -> None:
        self.train_seconds += elapsed
        record: dict[str, Any] = {"run": self.name, "epoch": epoch + 1, "step": self.step, "epoch_seconds": elapsed}
        if self.params:
            self.seen += self.epoch_seen
            record.update(train_loss=(self.loss_sum / max(self.batches, 1)).item(),
                          train_examples_per_s=self.epoch_seen / max(elapsed, 1e-9), scale=self.model.scale.item())
        if metrics is not None:
            record.update({f"{self.config.eval_split}_{k}": v for k, v in metrics.items()})
            score = metrics[self.select_metric]
            better = self.best_score is None or score > self.best_score
        else:
            metrics, score, better = {}, float(epoch), True
        self.history.append(record)
        log.write(**record)
        if better:
            self.best_score, self.best_epoch, self.best_metrics = score, epoch + 1, metrics
            save_two_tower(self.checkpoint, self.model, towers=self.towers, options=self.options,
                           extra={"run": self.name, "train": config_dict(self.config), "epoch": epoch + 1,
                                  "eval": metrics})
        if epoch + 1 >= self.config.epochs or not self.params:
            self.done = True

    def record_test(self, metrics: dict[str, float], log: MetricsLog) -> None:
        log.write(run=self.name, epoch=self.best_epoch, **{f"{self.config.test_split}_{k}": v for k, v in metrics.items()})
        path = self.checkpoint / "config.json"
        meta = json.loads(path.read_text())
        meta["test"] = metrics
        path.write_text(json.dumps(meta, indent=2) + "\n")

    def result(self, test_metrics: dict[str, float] | None, runs_in_pass: int) -> RunResult:
        methods = {self.towers[t]["method"] for t in TOWERS}
        return RunResult(name=self.name, method="/".join(sorted(methods)), trainable_params=self.trainable_params,
                         best_epoch=self.best_epoch, eval_metrics=self.best_metrics, test_metrics=test_metrics,
                         train_seconds=self.train_seconds,
                         train_examples_per_s=self.seen / max(self.train_seconds, 1e-9),
                         checkpoint=str(self.checkpoint), history=self.history, config=config_dict(self.config),
                         runs_in_pass=runs_in_pass, task=TASK, select_metric=self.select_metric)

