"""Fit side networks from a feature store: AdamW, per-epoch evaluation, best checkpoint, test score.

One pass over the store per epoch feeds every run given to :func:`fit_many` (a sweep: learning rates,
``r``, seeds, methods); :func:`fit` is the one-run case. Each run keeps its own model, optimiser,
learning-rate schedule, gradient clipping and random stream (init and dropout), so it ends exactly as it
would have trained alone. The runs share only what the shared batches fix: batch size, splits, the seed of
the batch order and the device (:data:`PASS_FIELDS`; :func:`pass_groups` sorts runs into such groups).

Per epoch: one pass over the train split steps every run that is still training, one pass over the eval
split scores them all, and each run saves its best checkpoint. At the end, one pass over the test split
scores every run's best checkpoint.

What is predicted, how it is scored and how the best epoch is picked is the store's task (train/tasks/):
each run holds its own task object, which the trainer only calls.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from unipt.store import FeatureStore

from . import _resume
from ._checkpoint import (check_store_matches, checkpoint_task, load_checkpoint, read_checkpoint_config,
                          save_checkpoint, store_identity, write_config)
from ._files import join
from ._loader import ActivationLoader, Batch
from ._methods import config_dict, get_method, resolve_layers
from ._stacked import group_steppers
from .config import LoaderConfig, TrainConfig
from .tasks import ClassificationTask, Task, task_for

logger = logging.getLogger(__name__)

EpochHook = Callable[[str, int, "dict[str, float] | None"], bool]
"""``on_epoch(run name, epoch, eval metrics) -> prune?`` (see :func:`fit_many`)."""

PASS_FIELDS = ("batch_size", "train_split", "eval_split", "test_split", "shuffle_seed", "device", "views",
               "view_schedule")
"""What runs trained in one pass must share: the batches (their size, splits, order and stochastic views) and
the device."""


@dataclass
class RunResult:
    name: str
    method: str
    trainable_params: int
    best_epoch: int
    eval_metrics: dict[str, float]
    test_metrics: dict[str, float] | None
    train_seconds: float
    """Wall time of the passes this run trained in (shared with the other runs of its pass)."""
    train_examples_per_s: float
    checkpoint: str
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    """The run's resolved TrainConfig."""
    runs_in_pass: int = 1
    """How many runs trained from the same pass over the store (1: trained alone)."""
    task: str = "classification"
    """The task kind the run was trained for (its store's)."""
    select_metric: str = "accuracy"
    """The eval metric that picked its best epoch."""
    pruned_at: int | None = None
    """The epoch after which a search pruned the run (it left the pass; no test score); None: trained out."""
    stacked: bool = False
    """Whether it trained stacked with other runs of its pass (one batched step for all of them)."""
    post_train: dict[str, Any] = field(default_factory=dict)
    """What the method's own phase after the epochs recorded (``Method.finish``; Head2Toe: the chosen keep
    fraction, every candidate's eval metrics, the feature counts); {} for methods without one."""


def parts_used(store: FeatureStore, config: TrainConfig) -> dict[str, Any]:
    """Which parts of the store a run reads, per split it trains or selects on: their count, the sha256 over
    their names and commit records, and the store's source version (a store that has grown since holds more)."""
    version = store.source_version()
    used = {}
    for split in dict.fromkeys((config.train_split, config.eval_split)):
        if split and split in store.splits():
            used[split] = {"parts": len(store.parts(split)), "sha256": store.parts_digest(split),
                           "source_version": None if version is None else version["version"]}
    return used


def _absolute(url: str) -> str:
    """A local path made absolute (a checkpoint is often used from another folder); URLs unchanged."""
    return url if "://" in url else str(Path(url).resolve())


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class MetricsLog:
    """Append-only JSONL log: one object per line (run, epoch, split, metrics)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def make_task(config: TrainConfig, store: FeatureStore) -> Task:
    """The task a run trains for: the store's kind over its target names, with the run's task options."""
    return task_for(store.task, store.label_names, config.task)


def build_model(config: TrainConfig, store: FeatureStore, task: Task | None = None) -> tuple[nn.Module, Any, list[int]]:
    """The method's model for this store and task (default: the store's): (model, method config, layers)."""
    task = task or make_task(config, store)
    method = get_method(config.method)
    method.check_layout(store.layout, f"store {store.url}")
    method.check_task(task, store.layout)
    model_config = method.store_config(config.model, store)  # (a method may complete it from the store)
    layers = resolve_layers(model_config.layers, store.layers)
    widths = [store.layer_widths[l] for l in layers]
    return method.build(model_config, widths, task.head), model_config, layers


def split_targets(store: FeatureStore, split: str) -> np.ndarray:
    """Every target of ``split`` (its parts' target columns, no layers decoded)."""
    return np.concatenate([store.read_part(part, layers=[]).label for part in store.parts(split)])


def pass_key(config: TrainConfig) -> tuple:
    """Runs with equal keys can train from one pass over the store (see :data:`PASS_FIELDS`)."""
    return tuple(str(resolve_device(config.device)) if f == "device" else getattr(config, f) for f in PASS_FIELDS)


def pass_groups(runs: Mapping[str, TrainConfig]) -> list[dict[str, TrainConfig]]:
    """``runs`` split into groups that can each train in one pass, in order of first appearance."""
    groups: dict[tuple, dict[str, TrainConfig]] = {}
    for name, config in runs.items():
        groups.setdefault(pass_key(config), {})[name] = config
    return list(groups.values())


def fit(
    name: str,
    store: FeatureStore,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    loader_config: LoaderConfig | None = None,
    log: MetricsLog | None = None,
    progress: bool = True,
    allow_incomplete: bool = False,
) -> RunResult:
    """Train run ``name`` on ``config.train_split``; keep the best epoch on ``eval_split``; score ``test_split``.

    :func:`fit_many` with one run."""
    (result,) = fit_many({name: config}, store, out_dir, loader_config=loader_config, log=log, progress=progress,
                         allow_incomplete=allow_incomplete)
    return result


def fit_many(
    runs: Mapping[str, TrainConfig],
    store: FeatureStore,
    out_dir: str | Path,
    *,
    loader_config: LoaderConfig | None = None,
    log: MetricsLog | None = None,
    progress: bool = True,
    allow_incomplete: bool = False,
    on_epoch: EpochHook | None = None,
    resume: bool = True,
) -> list[RunResult]:
    """Train every run of ``runs`` (name -> config) from one pass over ``store`` per epoch.

    Every run gets what :func:`fit` would give it alone: records tagged with its name in ``log``, its best
    checkpoint in ``out_dir/<name>`` and the same numbers, bit for bit on CPU for runs stepped in turn (runs of
    equal shapes stacked into one batched step, ``TrainConfig.stack``: to float rounding; see ``_stacked``). (One caveat: the loader
    reads the union of the runs' layers, so with ``LoaderConfig(mode="auto")`` a union over the memory
    budget streams where one run alone would be held in memory, and its batches come in another order.)
    Runs must share :data:`PASS_FIELDS` (:func:`pass_groups` splits a sweep into such groups); a run whose
    epochs or ``max_steps`` are spent stops stepping while the others go on. Results come in the order of
    ``runs``.

    A store whose extraction has not finished for the runs' splits is refused (``allow_incomplete``: train
    on its committed parts, with a warning); see :meth:`unipt.store.FeatureStore.check_complete`.

    ``on_epoch(name, epoch, metrics)`` is called after each run's epoch (1-based; ``metrics`` on the eval
    split, None without one); returning True prunes the run: it leaves the pass, keeps its best checkpoint so
    far, and is not scored on the test split (a search's early stopping).

    ``resume`` (default): a run whose folder in ``out_dir`` (a local folder or an fsspec URL) holds a finished
    run's record is not trained again (its result is read back); one holding an unfinished run's epoch state
    goes on from its last saved epoch, ending exactly as an uninterrupted run (see ``_resume``). A record made
    with another training config or store is refused. ``resume=False`` forgets saved state and trains every
    run from scratch.
    """
    if not runs:
        raise ValueError("fit_many needs at least one run")
    _check_one_pass(runs)
    log = log or MetricsLog(None)
    identity = store_identity(store)
    finished: dict[str, RunResult] = {}
    for name, config in runs.items():
        folder = join(out_dir, name)
        if not resume:
            _resume.forget(folder)
        elif (record := _resume.load_result(folder, name, config_dict(config), identity)) is not None:
            finished[name] = RunResult(**record)
            logger.info("%s: finished earlier, result read from %s", name, folder)
    if len(finished) == len(runs):
        return [finished[name] for name in runs]
    all_runs, runs = runs, {name: config for name, config in runs.items() if name not in finished}
    loader_config = loader_config or LoaderConfig()
    first = next(iter(runs.values()))
    if first.train_split not in store.check_complete(
            [s for s in (first.train_split, first.eval_split, first.test_split) if s],
            allow_incomplete=allow_incomplete, warn=_warn):
        raise ValueError(f"store {store.url} has no train split {first.train_split!r} to fit on; it has "
                         f"{store.splits()} (set train_split)")
    if len(store.label_names) == 1 and store.task == "classification":
        _warn(f"store {store.url} has a single class ({store.label_names[0]!r}): a classifier learns nothing from "
              "it; check the source's label column")
    tasks = {name: make_task(config, store) for name, config in runs.items()}
    train_targets = split_targets(store, first.train_split)
    for task in tasks.values():
        task.check_targets(torch.from_numpy(train_targets), first.train_split)
        task.fit(train_targets)  # e.g. regression: the train split's target statistics
    device = resolve_device(first.device)
    pin = device.type == "cuda"
    # One loader over the union of the runs' layers; each run takes its own layers from every batch.
    layers = sorted({l for config in runs.values() for l in _layers(config, store)})
    train_loader = ActivationLoader(store, first.train_split, layers, batch_size=first.batch_size, shuffle=True,
                                    seed=first.shuffle_seed, config=loader_config, pin_memory=pin, accelerator=pin,
                                    views=first.views, view_schedule=first.view_schedule)
    eval_loader = _optional_loader(store, first.eval_split, layers, first.batch_size, loader_config, pin)
    trainers = [_Run(name, config, store, tasks[name], out_dir, device, layers, len(train_loader))
                for name, config in runs.items()]
    for run in trainers:
        if resume and _resume.restore_state(run, identity):
            logger.info("%s: resuming after epoch %d (step %d)", run.name, run.epochs_done, run.step)
            log.write(run=run.name, resumed_after_epoch=run.epochs_done, step=run.step)
        elif (prepare := get_method(run.config.method).prepare) is not None:
            prepare(run, train_loader, eval_loader)

    # Runs resumed from different epochs (a kill between two runs' saves) catch up: an epoch's pass steps the
    # runs whose next epoch it is, so each run sees the batches of its own epoch.
    waiting = [run.epochs_done for run in trainers if not run.done]
    for epoch in range(min(waiting, default=0), max(config.epochs for config in runs.values())):
        if all(run.done for run in trainers):
            break
        active = [run for run in trainers if not run.done and run.epochs_done == epoch]
        if not active:
            continue
        desc = _pass_description(active, trainers, epoch)
        start, end = _train_pass(active, train_loader, epoch, device, desc, progress)
        scores = [None] * len(active)  # no eval split: each run keeps its last epoch
        if eval_loader is not None:
            scores = _score([(run.model, run.pick, run.task) for run in active], eval_loader, device, tune=True)
        for run, metrics in zip(active, scores):
            run.end_epoch(epoch, (run.stopped_at or end) - start, metrics, log)
            if on_epoch is not None and on_epoch(run.name, epoch + 1, metrics) and not run.done:
                run.prune(epoch + 1, log)  # (a run that has just finished is not pruned)
            _resume.save_state(run, identity)

    for run in trainers:  # a method's own phase after its epochs (Head2Toe: feature selection, retraining)
        if (finish := get_method(run.config.method).finish) is not None and run.pruned_at is None:
            finish(run, train_loader, eval_loader, log)

    test_metrics: list[dict[str, float] | None] = [None] * len(trainers)
    test_loader = _optional_loader(store, first.test_split, layers, first.batch_size, loader_config, pin)
    if test_loader is not None:
        for loader in (train_loader, eval_loader):  # memory mode: the decoded splits are not needed any more
            if loader is not None:
                loader.release()
        for run in trainers:
            run.release_training_state()
        scored = [run for run in trainers if run.pruned_at is None]
        best = []
        for run in scored:
            model, saved = load_checkpoint(run.checkpoint, map_location=device)
            best.append((model.to(device), run.pick, checkpoint_task(saved)))  # the task as the best epoch left it
        by_run = dict(zip(scored, _score(best, test_loader, device, tune=False) if best else []))
        for run, metrics in by_run.items():
            run.record_test(metrics, log)
        test_metrics = [by_run.get(run) for run in trainers]
    for run, test in zip(trainers, test_metrics):
        finished[run.name] = run.result(test, len(all_runs))  # the pass it belongs to, read-back runs included
        _resume.save_result(run.checkpoint, finished[run.name], identity)
    return [finished[name] for name in all_runs]


def _pass_description(active: list[_Run], trainers: list[_Run], epoch: int) -> str:
    """The pass's bar title: the run (alone), or how many runs are active, pruned and done."""
    if len(trainers) == 1:
        return f"{active[0].name} epoch {epoch + 1}/{active[0].config.epochs}"
    pruned = sum(run.pruned_at is not None for run in trainers)
    done = sum(run.done and run.pruned_at is None for run in trainers)
    counts = f"{len(active)} active" + (f", {pruned} pruned" if pruned else "") + (f", {done} done" if done else "")
    return f"{len(trainers)} runs ({counts}) epoch {epoch + 1}/{max(run.config.epochs for run in active)}"


class _Run:
    """One side network in training: model, optimiser, schedule, random stream and best checkpoint so far."""

    stackable = True  # group_steppers may step it stacked with runs of the same shapes

    def __init__(self, name: str, config: TrainConfig, store: FeatureStore, task: Task, out_dir: str | Path,
                 device: torch.device, loader_layers: list[int], steps_per_epoch: int):
        self.name, self.config, self.device, self.task = name, config, device, task
        self.stackable = get_method(config.method).stackable
        self.select_metric = task.check_metric(config.select_metric)
        torch.manual_seed(config.seed)
        model, model_config, layers = build_model(config, store, task)
        self.model = model.to(device)
        self.rng = _RandomStream(device)  # goes on from the init's state, as it would training alone
        self.pick = [loader_layers.index(l) for l in layers]  # this run's layers, in its order, in each batch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for p in self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        total_steps = steps_per_epoch * config.epochs
        if config.max_steps:
            total_steps = min(total_steps, config.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(config, total_steps))
        self.checkpoint = join(out_dir, name)  # a local folder or a URL
        self.checkpoint_fields = {
            "method": config.method, "model_config": config_dict(model_config), "layers": layers,
            "layer_widths": [store.layer_widths[l] for l in layers], "store": store, "task": task}
        self.checkpoint_extra = {"run": name, "train": config_dict(config), "label_names": store.label_names,
                                 "store_url": _absolute(store.url), "parts_used": parts_used(store, config)}
        self.train_record = json.loads(json.dumps(config_dict(config)))  # as saved: JSON types
        self.step, self.seen, self.train_seconds, self.done, self.epochs_done = 0, 0, 0.0, False, 0
        self.best_score, self.best_epoch, self.best_metrics = None, -1, {}
        self.pruned_at: int | None = None
        self.stacked = False  # set by the stepper that steps it with others
        self.stack_state: dict = {}  # a stacked group's measured choice, kept across epochs (see _stacked)
        self.history: list[dict[str, Any]] = []
        self.post_train: dict[str, Any] = {}  # set by the method's finish phase, if it has one

    def start_epoch(self) -> None:
        self.model.train()
        self.stepping, self.stopped_at, self.epoch_seen = True, None, 0
        # Summed on the device in float64 (the same sums as Python floats): no host sync per step. The weight
        # is what each batch's mean loss averages over (examples; tagging: scored tokens).
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_weight = torch.zeros((), dtype=torch.float64, device=self.device)

    def train_step(self, batch: Batch) -> None:
        with self.rng:
            with _autocast(self.device):
                outputs = self.model([batch.hidden_states[i] for i in self.pick], batch.mask)
            loss = self.task.loss(outputs.float(), batch.labels)
            if (regularization := getattr(self.model, "regularization", None)) is not None:
                loss = loss + regularization()  # a model's own penalty (Head2Toe's group lasso)
            descend(self, loss, len(batch))
        self.record_step(loss, batch)

    def record_step(self, loss: torch.Tensor, batch: Batch) -> None:
        """Book a finished step: the epoch's loss sums, and whether ``max_steps`` is reached."""
        weight = self.task.loss_weight(batch.labels)
        self.loss_sum += loss.detach().double() * weight
        self.loss_weight += weight
        self.last_loss = loss.detach()
        if self.config.max_steps and self.step >= self.config.max_steps:
            self.stepping, self.stopped_at, self.done = False, time.perf_counter(), True

    def end_epoch(self, epoch: int, elapsed: float, metrics: dict[str, float] | None, log: MetricsLog) -> None:
        """Log the epoch, and save a checkpoint when ``metrics`` (on the eval split) beat the best so far."""
        self.train_seconds += elapsed
        self.seen += self.epoch_seen
        record = {"run": self.name, "epoch": epoch + 1, "step": self.step,
                  "train_loss": (self.loss_sum / self.loss_weight.clamp_min(1)).item(),
                  "train_examples_per_s": self.epoch_seen / elapsed, "epoch_seconds": elapsed}
        if metrics is not None:
            record.update({f"{self.config.eval_split}_{k}": v for k, v in metrics.items()})
            score = metrics[self.select_metric]
            better = self.task.better(self.select_metric, score, self.best_score)
        else:
            metrics, score, better = {}, float(epoch), True  # no eval split: keep the last epoch
        self.history.append(record)
        log.write(**record)
        if better:
            self.best_score, self.best_epoch, self.best_metrics = score, epoch + 1, metrics
            save_checkpoint(self.checkpoint, self.model, **self.checkpoint_fields,
                            extra={**self.checkpoint_extra, "epoch": epoch + 1, "eval": metrics})
        self.epochs_done = epoch + 1
        if epoch + 1 >= self.config.epochs:
            self.done = True

    def prune(self, epoch: int, log: MetricsLog) -> None:
        """Leave the pass after ``epoch`` (a search stopped the run early)."""
        self.done, self.pruned_at = True, epoch
        log.write(run=self.name, epoch=epoch, pruned=True)

    def release_training_state(self) -> None:
        """Free the model and optimiser state once training is over (the best checkpoint is on disk)."""
        self.model = self.optimizer = self.scheduler = self.params = None

    def record_test(self, metrics: dict[str, float], log: MetricsLog) -> None:
        log.write(run=self.name, epoch=self.best_epoch,
                  **{f"{self.config.test_split}_{k}": v for k, v in metrics.items()})
        meta = read_checkpoint_config(self.checkpoint)
        meta["test"] = metrics
        write_config(self.checkpoint, meta)

    def result(self, test_metrics: dict[str, float] | None, runs_in_pass: int) -> RunResult:
        return RunResult(name=self.name, method=self.config.method, trainable_params=self.trainable_params,
                         best_epoch=self.best_epoch, eval_metrics=self.best_metrics, test_metrics=test_metrics,
                         train_seconds=self.train_seconds,
                         train_examples_per_s=self.seen / max(self.train_seconds, 1e-9),
                         checkpoint=_absolute(self.checkpoint), history=self.history,
                         config=config_dict(self.config), runs_in_pass=runs_in_pass, task=self.task.kind,
                         select_metric=self.select_metric, pruned_at=self.pruned_at, stacked=self.stacked,
                         post_train=self.post_train)


def descend(run, loss: torch.Tensor, examples: int) -> None:
    """One optimiser step of ``run`` (a run in training: optimizer, scheduler, params, config, step and epoch
    counters) on ``loss``: backward, gradient clipping, AdamW, schedule; called inside the run's random stream."""
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    step_optimizer(run, examples)


def step_optimizer(run, examples: int) -> None:
    """The rest of :func:`descend` once ``run``'s gradients are in place: clipping, AdamW, schedule, counters."""
    if run.config.grad_clip:
        nn.utils.clip_grad_norm_(run.params, run.config.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.step += 1
    run.epoch_seen += examples


def _train_pass(runs: list[_Run], loader: ActivationLoader, epoch: int, device: torch.device, desc: str,
                progress: bool) -> tuple[float, float]:
    """One pass over the train split: every batch steps each of ``runs`` in turn, until all have stopped.

    Returns the pass's start and end (``time.perf_counter``)."""
    loader.set_epoch(epoch)
    for run in runs:
        run.start_epoch()
    start = shown = time.perf_counter()
    stepping, seen = group_steppers(runs), 0  # a run alone, or runs stacked into one batched step
    bar = tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False, dynamic_ncols=True)
    for batch in bar:
        batch = batch.to(device)  # moved once, whatever the number of runs
        for stepper in stepping:
            stepper.train_step(batch)
        stepping = [stepper for stepper in stepping if stepper.stepping]
        seen += len(batch)
        if progress and time.perf_counter() - shown > 0.5:  # reading the loss waits for the device: not every step
            shown = time.perf_counter()
            losses = [run.last_loss.item() for run in runs]
            bar.set_postfix(loss=f"{losses[0]:.3f}" if len(losses) == 1 else f"{min(losses):.3f}..{max(losses):.3f}",
                            ex_s=f"{seen / (shown - start):.0f}", refresh=False)
        if not stepping:
            break
    bar.close()
    return start, time.perf_counter()


def _check_one_pass(runs: Mapping[str, TrainConfig]) -> None:
    (first_name, first), *others = runs.items()
    for name, config in others:
        for f, mine, theirs in zip(PASS_FIELDS, pass_key(first), pass_key(config)):
            if mine != theirs:
                hint = (" (set the same data_seed to share a pass: seeds then vary init and dropout only)"
                        if f == "shuffle_seed" else "")
                raise ValueError(f"runs {first_name!r} and {name!r} cannot train in one pass over the store: "
                                 f"their {f} differs ({mine!r} vs {theirs!r}){hint}; train them in separate "
                                 f"passes (pass_groups splits runs into groups that can share one)")


def _layers(config: TrainConfig, store: FeatureStore) -> list[int]:
    return resolve_layers(get_method(config.method).store_config(config.model, store).layers, store.layers)


class _RandomStream:
    """A run's own torch random state (CPU, plus the GPU's when training on one), swapped in around its steps.

    Dropout draws from torch's global generators: runs stepping in turn would draw from each other's
    streams, and a run's result would depend on the runs it was trained with.
    """

    def __init__(self, device: torch.device):
        self.cuda = device if device.type == "cuda" else None
        self.state = self._get()

    def _get(self):
        return torch.get_rng_state(), None if self.cuda is None else torch.cuda.get_rng_state(self.cuda)

    def __enter__(self) -> None:
        cpu, gpu = self.state
        torch.set_rng_state(cpu)
        if gpu is not None:
            torch.cuda.set_rng_state(gpu, self.cuda)

    def __exit__(self, *exc) -> None:
        self.state = self._get()


@torch.no_grad()
def evaluate(model: nn.Module, loader: ActivationLoader, device: torch.device, task: Task | int,
             *, tune: bool = False) -> dict[str, float]:
    """The task's metrics of ``model`` over every example of ``loader`` (``task`` an int: a classifier of that
    many classes: accuracy, macro-F1, mean cross-entropy). ``tune``: tune what the task tunes (multilabel's
    threshold) on this split, as on an eval split."""
    if isinstance(task, int):
        task = ClassificationTask([str(k) for k in range(task)])
    return _score([(model, list(range(len(loader.layers))), task)], loader, device, tune=tune)[0]


@torch.no_grad()
def _score(models: Sequence[tuple[nn.Module, list[int], Task]], loader: ActivationLoader, device: torch.device,
           *, tune: bool) -> list[dict[str, float]]:
    """:func:`evaluate` for several (model, positions of its layers in the loader's, task) from one pass."""
    for model, _, _ in models:
        model.eval()
    kept: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in models]
    for batch in loader:
        models[0][2].check_targets(batch.labels, loader.split)  # every model's task is the store's kind
        batch = batch.to(device)
        for (model, pick, task), into in zip(models, kept):
            with _autocast(device):
                outputs = model([batch.hidden_states[i] for i in pick], batch.mask).float()
            into.append(task.scored(outputs, batch.labels))
    return [task.metrics(torch.cat([o for o, _ in pieces]), torch.cat([t for _, t in pieces]), tune=tune)
            for (_, _, task), pieces in zip(models, kept)]


def evaluate_checkpoint(checkpoint: str | Path, store: FeatureStore, split: str, *, batch_size: int = 64,
                        device: str = "auto", loader_config: LoaderConfig | None = None,
                        allow_incomplete: bool = False) -> dict[str, float]:
    """Score a saved checkpoint on ``split`` of ``store`` (refusing a store it was not trained for, and a
    split whose extraction has not finished unless ``allow_incomplete``)."""
    dev = resolve_device(device)
    model, config = load_checkpoint(checkpoint, map_location=dev)
    check_store_matches(config, store)
    if split not in store.check_complete([split], allow_incomplete=allow_incomplete, warn=_warn):
        raise ValueError(f"store {store.url} has no split {split!r}; it has {store.splits()}")
    loader = ActivationLoader(store, split, config["layers"], batch_size=batch_size, shuffle=False,
                              length_sorted=True, config=loader_config or LoaderConfig())
    return evaluate(model.to(dev), loader, dev, checkpoint_task(config))


def _warn(message: str) -> None:
    logger.warning("%s", message)


def _optional_loader(store, split, layers, batch_size, loader_config, pin) -> ActivationLoader | None:
    """An evaluation loader: batches of the training size (a larger one would make evaluation, not training,
    the memory peak; measured on MiniLM tweets, UniPT scoring at 64 peaked at 371 MiB vs 234 MiB at 32, in
    the same time), sorted by length so they carry little padding."""
    if not split or split not in store.splits() or not store.parts(split):
        return None
    return ActivationLoader(store, split, layers, batch_size=batch_size, shuffle=False, length_sorted=True,
                            config=loader_config, pin_memory=pin, accelerator=pin)


def _schedule(config: TrainConfig, total_steps: int):
    warmup = int(config.warmup * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if config.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return factor


def _autocast(device: torch.device):
    # bfloat16 autocast on GPU: the side network's matmuls run on tensor cores; CPU stays float32.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)
