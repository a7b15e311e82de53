"""Fit one side network from a feature store: AdamW, per-epoch evaluation, best checkpoint, test score."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from unipt.store import FeatureStore

from ._checkpoint import check_store_matches, load_checkpoint, save_checkpoint
from ._loader import ActivationLoader
from ._methods import config_dict, get_method, resolve_layers
from ._metrics import classification_metrics
from .config import LoaderConfig, TrainConfig


@dataclass
class RunResult:
    name: str
    method: str
    trainable_params: int
    best_epoch: int
    eval_metrics: dict[str, float]
    test_metrics: dict[str, float] | None
    train_seconds: float
    train_examples_per_s: float
    checkpoint: str
    history: list[dict[str, Any]] = field(default_factory=list)


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


def build_model(config: TrainConfig, store: FeatureStore) -> tuple[nn.Module, Any, list[int]]:
    """The method's model for this store: (model, method config, resolved layers)."""
    method = get_method(config.method)
    model_config = method.make_config(config.model)
    layers = resolve_layers(model_config.layers, store.layers)
    widths = [store.layer_widths[l] for l in layers]
    return method.build(model_config, widths, len(store.label_names)), model_config, layers


def fit(
    name: str,
    store: FeatureStore,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    loader_config: LoaderConfig | None = None,
    log: MetricsLog | None = None,
    progress: bool = True,
) -> RunResult:
    """Train run ``name`` on ``config.train_split``; keep the best epoch on ``eval_split``; score ``test_split``."""
    log = log or MetricsLog(None)
    out_dir = Path(out_dir)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model, model_config, layers = build_model(config, store)
    model.to(device)
    loader_config = loader_config or LoaderConfig()
    pin = device.type == "cuda"
    train_loader = ActivationLoader(store, config.train_split, layers, batch_size=config.batch_size, shuffle=True,
                                    seed=config.seed, config=loader_config, pin_memory=pin, accelerator=pin)
    eval_loader = _optional_loader(store, config.eval_split, layers, config, loader_config, pin)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total_steps = len(train_loader) * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config, total_steps))
    widths = [store.layer_widths[l] for l in layers]
    ckpt_dir = out_dir / name
    ckpt_extra = {"run": name, "train": config_dict(config), "label_names": store.label_names,
                  "store_url": _absolute(store.url)}

    best_score, best_epoch, best_metrics, history = -math.inf, -1, {}, []
    step, train_seconds, seen = 0, 0.0, 0
    for epoch in range(config.epochs):
        model.train()
        train_loader.set_epoch(epoch)
        start, epoch_seen, loss_sum = time.perf_counter(), 0, 0.0
        bar = tqdm(train_loader, desc=f"{name} epoch {epoch + 1}/{config.epochs}", unit="batch",
                   disable=not progress, leave=False, dynamic_ncols=True)
        for batch in bar:
            batch = batch.to(device)
            with _autocast(device):
                logits = model(batch.hidden_states, batch.mask)
            loss = F.cross_entropy(logits.float(), batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            epoch_seen += len(batch)
            loss_sum += loss.item() * len(batch)
            bar.set_postfix(loss=f"{loss.item():.3f}", ex_s=f"{epoch_seen / (time.perf_counter() - start):.0f}",
                            refresh=False)
            if config.max_steps and step >= config.max_steps:
                break
        bar.close()
        elapsed = time.perf_counter() - start
        train_seconds += elapsed
        seen += epoch_seen
        record = {"run": name, "epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(epoch_seen, 1),
                  "train_examples_per_s": epoch_seen / elapsed, "epoch_seconds": elapsed}
        if eval_loader is not None:
            metrics = evaluate(model, eval_loader, device, len(store.label_names))
            record.update({f"{config.eval_split}_{k}": v for k, v in metrics.items()})
            score = metrics[config.select_metric]
        else:
            metrics, score = {}, float(epoch)  # no eval split: keep the last epoch
        history.append(record)
        log.write(**record)
        if score > best_score:
            best_score, best_epoch, best_metrics = score, epoch + 1, metrics
            save_checkpoint(ckpt_dir, model, method=config.method, model_config=config_dict(model_config),
                            layers=layers, layer_widths=widths, store=store,
                            extra={**ckpt_extra, "epoch": epoch + 1, "eval": metrics})
        if config.max_steps and step >= config.max_steps:
            break

    test_metrics = None
    test_loader = _optional_loader(store, config.test_split, layers, config, loader_config, pin)
    if test_loader is not None:
        best, _ = load_checkpoint(ckpt_dir, map_location=device)
        test_metrics = evaluate(best.to(device), test_loader, device, len(store.label_names))
        log.write(run=name, epoch=best_epoch, **{f"{config.test_split}_{k}": v for k, v in test_metrics.items()})
        meta_path = ckpt_dir / "config.json"
        meta = json.loads(meta_path.read_text())
        meta["test"] = test_metrics
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return RunResult(name=name, method=config.method, trainable_params=count_trainable(model), best_epoch=best_epoch,
                     eval_metrics=best_metrics, test_metrics=test_metrics, train_seconds=train_seconds,
                     train_examples_per_s=seen / max(train_seconds, 1e-9), checkpoint=str(ckpt_dir), history=history)


@torch.no_grad()
def evaluate(model: nn.Module, loader: ActivationLoader, device: torch.device, num_labels: int) -> dict[str, float]:
    """Accuracy, macro-F1 and mean cross-entropy of ``model`` over every example of ``loader``."""
    model.eval()
    preds, targets, loss_sum = [], [], 0.0
    for batch in loader:
        if (batch.labels < 0).any():
            raise ValueError(f"split {loader.split!r} has unlabelled examples (label -1); it cannot be scored")
        batch = batch.to(device)
        with _autocast(device):
            logits = model(batch.hidden_states, batch.mask).float()
        loss_sum += F.cross_entropy(logits, batch.labels, reduction="sum").item()
        preds.append(logits.argmax(-1).cpu())
        targets.append(batch.labels.cpu())
    pred, target = torch.cat(preds), torch.cat(targets)
    metrics = classification_metrics(pred, target, num_labels)
    metrics["loss"] = loss_sum / max(len(target), 1)
    return metrics


def evaluate_checkpoint(checkpoint: str | Path, store: FeatureStore, split: str, *, batch_size: int = 64,
                        device: str = "auto", loader_config: LoaderConfig | None = None) -> dict[str, float]:
    """Score a saved checkpoint on ``split`` of ``store`` (refusing a store it was not trained for)."""
    dev = resolve_device(device)
    model, config = load_checkpoint(checkpoint, map_location=dev)
    check_store_matches(config, store)
    loader = ActivationLoader(store, split, config["layers"], batch_size=batch_size, shuffle=False,
                              config=loader_config or LoaderConfig())
    return evaluate(model.to(dev), loader, dev, config["num_labels"])


def _optional_loader(store, split, layers, config, loader_config, pin) -> ActivationLoader | None:
    if not split or split not in store.splits() or not store.parts(split):
        return None
    return ActivationLoader(store, split, layers, batch_size=max(64, config.batch_size), shuffle=False,
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
