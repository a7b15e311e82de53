"""Online reference training: the backbone runs inside the loop, on raw text, at every step.

These are the baselines the cached path is compared against, so they are ordinary training loops with
nothing cached:

* ``online_unipt`` — the UniPT side network fed by the frozen backbone's hidden states, computed on the
  fly every step (backbone in eval mode, its forward under ``torch.no_grad``): exactly what a store holds;
* ``online_unipt_train`` — the same with the backbone's dropout on while training (the official UniPT
  protocol: the frozen backbone runs in train mode, so every epoch sees different hidden states), the
  reference that stochastic views (``extract.views``) approximate; evaluation still runs it in eval mode;
* ``full_finetune`` — the whole backbone plus a head (masked mean of the last hidden layer -> Linear),
  all trainable;
* ``lora`` — LoRA adapters (``peft``) on the attention query and value projections, plus the same head.

Fairness with the cached path is by construction: the examples come from :func:`load_source` (the
function extraction uses, so a split holds exactly the examples a store extracted from the same source
config holds), they are tokenised by the extraction's :class:`TextEncoder`, and the loop takes the
cached trainer's :class:`TrainConfig` (optimiser, schedule, seed, splits, selection metric) and its
length-bucketed batching policy (``LoaderConfig.bucket_batches``).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from unipt.extract import BackboneConfig, SourceConfig, SourceData, TextEncoder, TextInputs, load_source
from unipt.train import (
    ClassificationHead,
    LoaderConfig,
    MetricsLog,
    TrainConfig,
    UniPTConfig,
    count_trainable,
    get_method,
    resolve_layers,
)
from unipt.train._methods import Method
from unipt.train.tasks import ClassificationTask
from unipt.train._trainer import _autocast, _schedule, resolve_device

from ._memory import PeakMemory

Features = list[dict[str, list[int]]]  # unpadded token ids per example, as TextEncoder.tokenize returns them


# --------------------------------------------------------------------------- method configs
@dataclass
class FineTuneConfig:
    dropout: float = 0.1
    """Dropout before the classification head."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass
class LoraTuningConfig:
    r: int = 8
    """Rank of each LoRA update B·A."""
    alpha: float = 16.0
    """LoRA scaling numerator: the update is (alpha / r)·B·A."""
    dropout: float = 0.1
    """Dropout on the adapters' input (peft's lora_dropout)."""
    target_modules: Sequence[str] | None = None
    """Modules that get adapters (names or name suffixes, as peft takes them); None = the attention query
    and value projections, found by name (BERT query/value, MPNet q/v, DistilBERT q_lin/v_lin, ...)."""
    head_dropout: float = 0.1
    """Dropout before the classification head."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        for name in ("dropout", "head_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.target_modules is not None and (isinstance(self.target_modules, str) or not self.target_modules):
            raise ValueError(f"target_modules must be a non-empty list of module names, got {self.target_modules!r}")


# --------------------------------------------------------------------------- models
class OnlineUniPT(nn.Module):
    """Frozen backbone (no_grad) -> selected hidden states -> UniPT side network + head -> logits.

    ``backbone_dropout``: the backbone's dropout is on while the side network trains (train mode; its weights
    stay frozen); otherwise the backbone is always in eval mode."""

    def __init__(self, encoder: TextEncoder, config: UniPTConfig, num_labels: int, backbone_dropout: bool = False):
        super().__init__()
        self.backbone_dropout = backbone_dropout
        self.encoder = encoder  # tokenizer, padding and the frozen forward: the extraction's own code path
        self.backbone = encoder.model  # registered so .to() and state_dict() see it; frozen by TextEncoder
        self.layers = resolve_layers(config.layers, range(encoder.num_hidden_states))
        widths = [encoder.widths[l] for l in self.layers]
        self.side = get_method("unipt").build(config, widths, num_labels)  # the cached path's UniPTClassifier

    def train(self, mode: bool = True) -> "OnlineUniPT":
        super().train(mode)
        # the backbone's weights never train; its dropout is on only in training, and only when asked for
        self.backbone.train(mode and self.backbone_dropout)
        return self

    def forward(self, features: Features) -> torch.Tensor:
        hidden, mask = self.encoder.hidden_states(features)  # (B, N, D_l) each, (B, N); under no_grad
        # float32, as the cached loader hands them over (the backbone may run under fp16 autocast on a GPU)
        return self.side([hidden[l].float() for l in self.layers], mask)  # (B, classes)


class BackboneClassifier(nn.Module):
    """Trainable backbone (fully, or through adapters) -> last hidden layer -> masked mean -> Linear."""

    def __init__(self, encoder: TextEncoder, backbone: nn.Module, num_labels: int, dropout: float):
        super().__init__()
        self.encoder = encoder  # tokenizer and device
        self.backbone = backbone  # encoder.model itself, or a peft model wrapping it
        self.head = ClassificationHead(encoder.widths[-1], num_labels, dropout=dropout)

    def forward(self, features: Features) -> torch.Tensor:
        batch = self.encoder.tokenizer.pad(features, return_tensors="pt")
        batch = {k: v.to(self.encoder.device, non_blocking=True) for k, v in batch.items()}
        y = self.backbone(**batch).last_hidden_state  # (B, N, D)
        return self.head(y, batch["attention_mask"])  # (B, classes)


# Leaf names of the attention query and value projections, by model family; the first pair found wins.
_QUERY_VALUE_NAMES = (("query", "value"), ("q_proj", "v_proj"), ("query_proj", "value_proj"), ("q_lin", "v_lin"),
                      ("q", "v"))


def attention_query_value_modules(model: nn.Module) -> list[str]:
    """Qualified names of the attention query and value ``nn.Linear`` modules of a transformers model.

    BERT, RoBERTa, ELECTRA: ``…attention.self.query`` / ``.value``; MPNet: ``…attention.attn.q`` / ``.v``;
    DistilBERT: ``q_lin`` / ``v_lin``; DeBERTa-v2: ``query_proj`` / ``value_proj``; T5 and most decoders:
    ``q`` / ``v`` or ``q_proj`` / ``v_proj``. Only Linear modules under an attention module count.
    """
    linear = [name for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and any("attn" in s or "attention" in s for s in name.lower().split("."))]
    leaves = {name.rsplit(".", 1)[-1] for name in linear}
    for query, value in _QUERY_VALUE_NAMES:
        if query in leaves and value in leaves:
            return [name for name in linear if name.rsplit(".", 1)[-1] in (query, value)]
    raise ValueError(f"found no attention query/value Linear modules in {type(model).__name__} (looked for the "
                     f"pairs {[list(p) for p in _QUERY_VALUE_NAMES]}; its attention Linear modules are named "
                     f"{sorted(leaves)}); set the lora method's target_modules")


def _drop_unused_pooler(model: nn.Module) -> None:
    """The head pools the last hidden layer itself: BERT-like models' pooler would be dead weight that
    counts as trainable but never gets a gradient. BERT, RoBERTa and MPNet skip a pooler set to None."""
    if isinstance(getattr(model, "pooler", None), nn.Module):
        model.pooler = None


def _build_online_unipt(config: UniPTConfig, encoder: TextEncoder, num_labels: int) -> nn.Module:
    return OnlineUniPT(encoder, config, num_labels)


def _build_online_unipt_train(config: UniPTConfig, encoder: TextEncoder, num_labels: int) -> nn.Module:
    return OnlineUniPT(encoder, config, num_labels, backbone_dropout=True)


def _build_full_finetune(config: FineTuneConfig, encoder: TextEncoder, num_labels: int) -> nn.Module:
    _drop_unused_pooler(encoder.model)
    encoder.model.requires_grad_(True)  # TextEncoder loads it frozen
    return BackboneClassifier(encoder, encoder.model, num_labels, config.dropout)


def _build_lora(config: LoraTuningConfig, encoder: TextEncoder, num_labels: int) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ImportError("the lora method needs `peft`: pip install peft") from exc
    _drop_unused_pooler(encoder.model)
    targets = list(config.target_modules or attention_query_value_modules(encoder.model))
    lora = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets,
                      bias="none")
    with warnings.catch_warnings():  # peft asks transformers >= 5 a deprecated question; nothing to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        backbone = get_peft_model(encoder.model, lora)  # freezes every base weight, adds trainable A and B
    return BackboneClassifier(encoder, backbone, num_labels, config.head_dropout)


@dataclass(frozen=True)
class OnlineMethod(Method):
    """A method trained with the backbone in the loop: ``build(config, loaded encoder, num labels)``."""


ONLINE_METHODS: dict[str, OnlineMethod] = {
    "online_unipt": OnlineMethod("online_unipt", UniPTConfig, _build_online_unipt),
    "online_unipt_train": OnlineMethod("online_unipt_train", UniPTConfig, _build_online_unipt_train),
    "full_finetune": OnlineMethod("full_finetune", FineTuneConfig, _build_full_finetune),
    "lora": OnlineMethod("lora", LoraTuningConfig, _build_lora),
}


def get_online_method(name: str) -> OnlineMethod:
    return get_method(name, ONLINE_METHODS, "online method")


def build_online_model(config: TrainConfig, encoder: TextEncoder, num_labels: int) -> nn.Module:
    """``config.method``'s model around a freshly loaded ``encoder`` (full_finetune and lora modify it).

    Seeds torch with ``config.seed`` first, as the cached trainer does before building, so online_unipt's
    side network starts from the same weights as a cached ``unipt`` run with the same seed and options.
    """
    method = get_online_method(config.method)
    method_config = method.make_config(config.model)
    torch.manual_seed(config.seed)
    return method.build(method_config, encoder, num_labels)


# --------------------------------------------------------------------------- data
@dataclass
class TextSplit:
    """One split tokenised once, the way extraction tokenises it."""

    name: str
    features: Features
    labels: torch.Tensor  # (n,) int64; -1 = unlabelled
    example_ids: list[str]
    lengths: np.ndarray  # (n,) tokens per example, special tokens included

    def __len__(self) -> int:
        return len(self.example_ids)


def tokenize_splits(data: SourceData, encoder: TextEncoder, names: Sequence[str]) -> dict[str, TextSplit]:
    """The named splits of ``data`` (empty names skipped) as :class:`TextSplit` s."""
    splits = {}
    for name in dict.fromkeys(n for n in names if n):
        if name not in data.splits:
            raise ValueError(f"split {name!r} is not in the source; it has splits {sorted(data.splits)}")
        examples = data.splits[name]
        inputs = TextInputs.of(examples)  # pairs are encoded together, as extraction encodes them
        features = encoder.tokenize(inputs.texts, inputs.pairs, inputs.words)
        splits[name] = TextSplit(name, features, torch.tensor([ex.label for ex in examples], dtype=torch.int64),
                                 [ex.id for ex in examples],
                                 np.array([len(f["input_ids"]) for f in features], dtype=np.int64))
    return splits


def epoch_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, *,
                  bucket_batches: int) -> Iterator[np.ndarray]:
    """Row indices of one epoch's batches, by the cached loader's policy: a full shuffle, then a sort by
    length within windows of ``bucket_batches`` batches, batches cut, and their order shuffled."""
    order = rng.permutation(len(lengths))
    window = batch_size * bucket_batches
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        for j in rng.permutation(len(batches)):
            yield batches[j]


def _in_length_order(lengths: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    order = np.argsort(-lengths, kind="stable")  # evaluation order does not matter: pad as little as possible
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


# --------------------------------------------------------------------------- the loop
@dataclass
class OnlineRunResult:
    """What :class:`unipt.train.RunResult` reports (no checkpoint), plus per-epoch time and peak memory."""

    name: str
    method: str
    trainable_params: int
    best_epoch: int
    eval_metrics: dict[str, float]
    test_metrics: dict[str, float] | None  # the test split scored with the best epoch's weights
    train_seconds: float  # training steps only: evaluation is not timed
    train_examples_per_s: float
    epoch_seconds: list[float]
    peak_memory_bytes: int  # above the process's memory with model and data loaded (see PeakMemory)
    memory_device: str  # "cpu": process RSS, sampled; "cuda…": torch.cuda.max_memory_allocated
    history: list[dict[str, Any]] = field(default_factory=list)


def fit_online(
    name: str,
    source: SourceConfig | SourceData,
    backbone: BackboneConfig,
    config: TrainConfig,
    *,
    loader_config: LoaderConfig | None = None,
    log: MetricsLog | None = None,
    progress: bool = True,
) -> OnlineRunResult:
    """Load the backbone and the source's splits, build ``config.method``'s model and train it online.

    ``config.device`` decides where the backbone runs (``backbone.device`` is overridden by it); a
    :class:`SourceData` may stand in for the source config (e.g. a hand-picked subset in a test).
    """
    get_online_method(config.method).make_config(config.model)  # refuse a bad config before loading anything
    data = source if isinstance(source, SourceData) else load_source(source)
    if getattr(source, "task", "classification") != "classification":
        raise ValueError(f"the online references train single-label classifiers; source.task is {source.task!r} "
                         "(train it from a store with `unipt train`)")
    if not data.label_names:
        raise ValueError("the source has no labels (label_column is None); online training needs labelled data")
    device = resolve_device(config.device)
    encoder = TextEncoder(replace(backbone, device=str(device)))
    model = build_online_model(config, encoder, len(data.label_names))
    # Evaluation splits the source lacks are skipped, as the cached trainer skips those a store lacks.
    names = [config.train_split] + [s for s in (config.eval_split, config.test_split) if s in data.splits]
    splits = tokenize_splits(data, encoder, names)
    return train_online(name, model, splits, config, num_labels=len(data.label_names), loader_config=loader_config,
                        log=log, progress=progress)


def train_online(
    name: str,
    model: nn.Module,
    splits: Mapping[str, TextSplit],
    config: TrainConfig,
    *,
    num_labels: int,
    loader_config: LoaderConfig | None = None,
    log: MetricsLog | None = None,
    progress: bool = True,
) -> OnlineRunResult:
    """Train ``model`` (an online model: token features -> logits) on ``splits[config.train_split]``.

    AdamW on the trainable parameters, linear warm-up then ``config.schedule`` decay, gradient clipping,
    evaluation after every epoch; the best epoch on ``config.eval_split`` (by ``config.select_metric``;
    the last epoch without one) is kept. Its trainable weights go to a temporary safetensors file (a copy
    of a whole backbone kept in memory would inflate the peak this loop measures), and the test split is
    scored once, with them, at the end. Peak memory covers every epoch, evaluation included (it runs
    without gradients at the training batch size, so it stays below training).
    """
    log = log or MetricsLog(None)
    loader_config = loader_config or LoaderConfig()
    if config.train_split not in splits:
        raise ValueError(f"no train split {config.train_split!r}; splits given: {sorted(splits)}")
    train = splits[config.train_split]
    for split in (train, splits.get(config.eval_split), splits.get(config.test_split)):
        if split is not None and bool((split.labels < 0).any()):
            raise ValueError(f"split {split.name!r} has unlabelled examples (label -1); it cannot be trained or scored")
    eval_split, test_split = splits.get(config.eval_split), splits.get(config.test_split)

    device = model.encoder.device
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config, total_steps))

    best_score, best_epoch, best_metrics = -math.inf, -1, {}
    best_state = _BestWeights()
    history, epoch_seconds = [], []
    step, seen = 0, 0
    with PeakMemory(device) as peak:
        for epoch in range(config.epochs):
            model.train()
            rng = np.random.default_rng([config.seed, epoch])
            start, epoch_seen, loss_sum = time.perf_counter(), 0, 0.0
            bar = tqdm(epoch_batches(train.lengths, config.batch_size, rng, bucket_batches=loader_config.bucket_batches),
                       total=steps_per_epoch, desc=f"{name} epoch {epoch + 1}/{config.epochs}", unit="batch",
                       disable=not progress, leave=False, dynamic_ncols=True)
            for rows in bar:
                labels = train.labels[rows].to(device, non_blocking=True)
                with _autocast(device):
                    logits = model([train.features[i] for i in rows])
                loss = F.cross_entropy(logits.float(), labels)
                optimizer.zero_grad(set_to_none=True)
                peak.sample()  # the autograd graph holds every activation now
                loss.backward()
                if config.grad_clip:
                    nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                scheduler.step()
                peak.sample()  # gradients and (from the first step on) optimiser state
                step += 1
                epoch_seen += len(rows)
                loss_sum += loss.item() * len(rows)
                bar.set_postfix(loss=f"{loss.item():.3f}", ex_s=f"{epoch_seen / (time.perf_counter() - start):.0f}",
                                refresh=False)
                if config.max_steps and step >= config.max_steps:
                    break
            bar.close()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            epoch_seconds.append(elapsed)
            seen += epoch_seen
            record = {"run": name, "epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(epoch_seen, 1),
                      "train_examples_per_s": epoch_seen / elapsed, "epoch_seconds": elapsed}
            metrics, score = {}, float(epoch)  # no eval split: keep the last epoch
            if eval_split is not None:
                metrics = evaluate_online(model, eval_split, config.batch_size, num_labels)
                record.update({f"{eval_split.name}_{k}": v for k, v in metrics.items()})
                score = metrics[config.select_metric or "accuracy"]
            history.append(record)
            log.write(**record)
            if score > best_score:
                best_score, best_epoch, best_metrics = score, epoch + 1, metrics
                best_state.save(model)
            if config.max_steps and step >= config.max_steps:
                break
        best_test = None
        if test_split is not None:  # the best epoch's weights, scored once
            best_state.load(model)
            best_test = evaluate_online(model, test_split, config.batch_size, num_labels)
            log.write(run=name, epoch=best_epoch, **{f"{test_split.name}_{k}": v for k, v in best_test.items()})
    best_state.close()

    train_seconds = sum(epoch_seconds)
    return OnlineRunResult(name=name, method=config.method, trainable_params=count_trainable(model),
                           best_epoch=best_epoch, eval_metrics=best_metrics, test_metrics=best_test,
                           train_seconds=train_seconds, train_examples_per_s=seen / max(train_seconds, 1e-9),
                           epoch_seconds=epoch_seconds, peak_memory_bytes=peak.bytes, memory_device=str(device),
                           history=history)


class _BestWeights:
    """The best epoch's trainable parameters, kept on disk (as a checkpoint would be), not in memory."""

    def __init__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="unipt-online-")
        self._path = os.path.join(self._dir.name, "best.safetensors")

    def save(self, model: nn.Module) -> None:
        save_file({k: p.detach().contiguous().cpu() for k, p in model.named_parameters() if p.requires_grad},
                  self._path)

    def load(self, model: nn.Module) -> None:
        device = next(model.parameters()).device
        # strict=False: the file holds the trainable parameters only; the frozen rest never changed.
        model.load_state_dict(load_file(self._path, device=str(device)), strict=False)

    def close(self) -> None:
        self._dir.cleanup()


@torch.no_grad()
def evaluate_online(model: nn.Module, split: TextSplit, batch_size: int, num_labels: int) -> dict[str, float]:
    """Accuracy, macro-F1 and mean cross-entropy of an online model over every example of ``split``."""
    model.eval()
    device = model.encoder.device
    outputs, targets = [], []
    for rows in _in_length_order(split.lengths, batch_size):
        with _autocast(device):
            outputs.append(model([split.features[i] for i in rows]).float().cpu())
        targets.append(split.labels[rows])
    # scored as the cached trainer scores a classifier (the same task object, over the whole split)
    task = ClassificationTask([str(k) for k in range(num_labels)])
    return task.metrics(torch.cat(outputs), torch.cat(targets), tune=False)
