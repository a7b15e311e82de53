"""Training and loader configuration shared by every method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SCHEDULES = ("cosine", "linear", "constant")
LOADER_MODES = ("auto", "memory", "stream")
STACK_MODES = ("auto", "on", "off")
VIEW_SCHEDULES = ("rotate", "random", "eval")


@dataclass
class TrainConfig:
    method: str = "unipt"
    """Which side network / baseline to train (a folder under train/: unipt, unipt_cnn, lst, restuning,
    side4video, sherl, head2toe, scalar_mix, linear_probe; docs/methods.md compares them)."""
    model: dict[str, Any] = field(default_factory=dict)
    """The method's own config (e.g. UniPTConfig fields: reduction, layers, ...)."""
    lr: float = 5e-4
    """AdamW peak learning rate (UniPT's reference: 5e-4)."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    epochs: int = 5
    """Full passes over the training split."""
    batch_size: int = 32
    """Examples per optimiser step."""
    warmup: float = 0.06
    """Fraction of all steps spent warming the learning rate up linearly from 0."""
    schedule: str = "cosine"
    """Learning-rate decay after warm-up: cosine, linear or constant."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    seed: int = 0
    """Seeds parameter init and dropout, and the batch order unless data_seed is set."""
    data_seed: int | None = None
    """Seeds the batch order (shuffling); None = seed. Runs sharing it (and batch_size, splits, device) train
    from one pass over the store, so a seed sweep with a fixed data_seed shares its passes and varies init
    and dropout only."""
    train_split: str = "train"
    """Split the model is fitted on."""
    eval_split: str = "validation"
    """Split evaluated after every epoch to pick the best checkpoint ("" = keep the last epoch)."""
    test_split: str = "test"
    """Split the best checkpoint is finally scored on ("" = none)."""
    select_metric: str = ""
    """Metric on eval_split that decides the best epoch; "" = the task's own (classification: accuracy,
    multilabel: map, regression: pearson, tagging: entity_f1 for BIO tags, else token_accuracy). Any metric
    the task reports, or "loss" (lower is better, as for rmse)."""
    task: dict[str, Any] = field(default_factory=dict)
    """The task's options: regression {loss = "mse" | "huber", huber_delta}, multilabel {threshold} (a fixed
    decision threshold instead of one tuned on eval_split). The task itself is the store's."""
    device: str = "auto"
    """"auto" (cuda when available), "cpu", "cuda", "cuda:1", ..."""
    max_steps: int = 0
    """Stop after this many optimiser steps in total (0 = no limit); for smoke runs."""
    stack: str = "auto"
    """Train this run stacked with the other runs of its pass whose parameter shapes agree (one batched forward
    and backward for all of them, each keeping its own optimiser, schedule and random stream): "on", "off", or
    "auto" = stack where the first batches of the pass measure it faster than stepping the runs in turn."""

    views: int = 0
    """Stochastic views of the train split to serve (a store extracted with extract.views = K): the first
    `views` of the K stored (0 = all; 1 = the eval-mode view 0 only). More than the store has is refused."""
    view_schedule: str = "rotate"
    """Which view each example is served per epoch: "rotate" (epoch e: view e mod n for every example; each
    part decodes one view), "random" (per example and epoch, drawn from a hash of data seed, epoch and id;
    stream mode decodes all n views of every part, n times the decoding) or "eval" (always view 0). Memory
    mode holds the n views: n times the memory. Evaluation and test splits always read view 0. A store
    without views serves view 0 whatever these say."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a fraction of steps in [0, 1), got {self.warmup}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.stack not in STACK_MODES:
            raise ValueError(f"stack must be one of {STACK_MODES}, got {self.stack!r}")
        if not isinstance(self.select_metric, str):
            raise ValueError(f"select_metric must be a metric's name, got {self.select_metric!r}")
        if self.views < 0:
            raise ValueError(f"views must be >= 0 (0 = every stored view), got {self.views}")
        if self.view_schedule not in VIEW_SCHEDULES:
            raise ValueError(f"view_schedule must be one of {VIEW_SCHEDULES}, got {self.view_schedule!r}")

    @property
    def shuffle_seed(self) -> int:
        """The seed of the batch order: data_seed, or seed when data_seed is None."""
        return self.seed if self.data_seed is None else self.data_seed


@dataclass
class LoaderConfig:
    mode: str = "auto"
    """"memory": decode the split once and fully shuffle each epoch; "stream": shuffled part order plus a
    shuffle buffer; "auto": memory when the selected layers fit memory_budget_gb."""
    memory_budget_gb: float = 4.0
    """Decoded bytes of the selected layers that "auto" is willing to keep resident."""
    shuffle_buffer: int = 8192
    """Examples mixed across parts in stream mode (larger = closer to a full shuffle). Measured with 16 parts
    of 32 and batches of 16: a buffer of one part puts ~3 parts into each batch, four parts ~7, the whole split
    ~10 (a uniform shuffle: ~10.3). Part order is reshuffled every epoch either way. Decoded memory is bounded
    by the buffer: at most about twice the buffer's examples plus the part being read and those decoding
    ahead (examples left over from mostly consumed parts are copied out, so those parts are freed)."""
    bucket_batches: int = 50
    """Batches per window that is sorted by length before batching (less padding, still shuffled)."""
    prefetch_parts: int = 2
    """Parts decoded ahead of the one being consumed (stream mode)."""
    decode_threads: int = 2
    """Threads decoding parts in the background."""
    prefetch_batches: int = 8
    """Padded batches assembled ahead of the training loop (when batches are built in the background)."""
    background: str = "auto"
    """Build padded batches on a background thread: "on", "off", or "auto" = on when it has a core to
    itself (more cores than torch's threads) or the model trains on a GPU. Measured on 2 cores with torch
    on both: a background thread slows every torch op it preempts, costing more than padding inline."""

    def __post_init__(self) -> None:
        if self.background not in ("auto", "on", "off"):
            raise ValueError(f"background must be 'auto', 'on' or 'off', got {self.background!r}")
        if self.mode not in LOADER_MODES:
            raise ValueError(f"mode must be one of {LOADER_MODES}, got {self.mode!r}")
        for name in ("shuffle_buffer", "bucket_batches", "prefetch_parts", "decode_threads", "prefetch_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
