"""Head2Toe's steps around the trainer's epochs (``Method.prepare`` / ``Method.finish`` in ``_methods``).

- :func:`prepare` (a fresh run, before its first epoch): per_feature normalisation's train-split statistics.
- The epochs (the trainer): the selection phase, task loss + the model's ``regularization()`` (group lasso).
- :func:`select_and_retrain` (after the last epoch, before the test pass): score the features by the last
  epoch's head, pool the train and eval splits once into memory ((n, F) floats: features are pooled vectors),
  retrain a head on the top features for every candidate keep fraction, and save the candidate that scores
  best on the eval split as the run's checkpoint, with what was chosen in its config.json ("head2toe") and in
  the run's result (``post_train``).

Resume: the epochs resume as any run's; the selection is a function of the last epoch's saved state (weights
and random stream), so a run killed during it repeats it on restart and ends the same.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from .model import STD_EPS, Head2Toe

if TYPE_CHECKING:
    from .._loader import ActivationLoader


def _check_eval_split(run, eval_loader: ActivationLoader | None) -> None:
    fractions = run.model.config.keep_fractions
    if eval_loader is None and len(fractions) > 1:
        raise ValueError(f"run {run.name!r}: head2toe chooses among keep_fractions {list(fractions)} on the eval "
                         f"split, and the run has none ({run.config.eval_split!r} is empty or not in the store); "
                         "set eval_split, or give a single keep fraction")


@torch.no_grad()
def pooled_split(model: Head2Toe, loader: ActivationLoader, pick: list[int],
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every example of ``loader``'s split as pooled features (n, F) float32 and targets, on ``device``."""
    features, targets = [], []
    for batch in loader:
        batch = batch.to(device)
        features.append(model.features([batch.hidden_states[i].float() for i in pick], batch.mask))
        targets.append(batch.labels)
    return torch.cat(features), torch.cat(targets)


def prepare(run, train_loader: ActivationLoader, eval_loader: ActivationLoader | None) -> None:
    """Before a fresh run's first epoch: refuse a run that cannot choose its keep fraction, and fill the
    per-feature statistics μ, sqrt(σ² + eps) from the train split (per_feature normalisation only)."""
    _check_eval_split(run, eval_loader)
    model: Head2Toe = run.model
    if model.config.normalization != "per_feature":
        return
    train_loader.set_epoch(0)
    features, _ = pooled_split(model, train_loader, run.pick, run.device)
    features = features.double()
    mean = features.mean(dim=0)
    var = features.var(dim=0, unbiased=False)  # biased, as tf.nn.moments
    model.feature_mean.copy_(mean)
    model.feature_std.copy_(torch.sqrt(var + STD_EPS))


def kept_count(fraction: float, num_features: int) -> int:
    """⌊fraction · F⌋ features (the official ``int(size * keep_fraction)``), at least 1."""
    return max(1, int(num_features * fraction))


def top_features(scores: torch.Tensor, count: int) -> torch.Tensor:
    """keep (F,) of 0/1: the ``count`` highest scores (ties: the earlier feature)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = torch.zeros_like(scores)
    keep[order[:count]] = 1.0
    return keep


def select_and_retrain(run, train_loader: ActivationLoader, eval_loader: ActivationLoader | None, log) -> None:
    """After the selection phase's last epoch: choose the keep fraction on the eval split and save the final
    model as the run's checkpoint (see the module docstring)."""
    from .._checkpoint import save_checkpoint  # (the trainer imports the method registry, which imports this)

    _check_eval_split(run, eval_loader)
    selector: Head2Toe = run.model
    config = selector.config
    scores = selector.feature_scores()
    train_loader.set_epoch(0)  # a fixed order: the same features on a rerun
    train_x, train_y = pooled_split(selector, train_loader, run.pick, run.device)
    evaluation = None if eval_loader is None else pooled_split(selector, eval_loader, run.pick, run.device)
    epochs = config.retrain_epochs or run.config.epochs
    candidates, best = [], None
    with run.rng:  # heads' init, shuffling and dropout from the run's own stream, as it stands after its epochs
        for fraction in config.keep_fractions:
            count = kept_count(fraction, selector.num_features)
            model = _retrained(run, selector, top_features(scores, count), train_x, train_y, epochs)
            metrics = {} if evaluation is None else _metrics(model, run.task, *evaluation, tune=True)
            score = metrics.get(run.select_metric, 0.0)
            candidates.append({"keep_fraction": fraction, "kept_features": count, "eval": metrics})
            if best is None or run.task.better(run.select_metric, score, best[0]):  # a tie keeps the smaller
                best = (score, fraction, count, model, metrics)
    score, fraction, count, model, metrics = best
    if evaluation is not None:  # the task's tuned state (multilabel's threshold) as the chosen head left it
        metrics = _metrics(model, run.task, *evaluation, tune=True)
    layers = run.checkpoint_fields["layers"]
    kept_per_layer: dict[str, int] = {}
    for (position, _), group in zip(model.feature_groups(), model.keep.split(model.group_sizes)):
        key = str(layers[position])
        kept_per_layer[key] = kept_per_layer.get(key, 0) + int(group.sum().item())
    record: dict[str, Any] = {
        "keep_fraction": fraction, "kept_features": count, "features": selector.num_features,
        "kept_per_layer": kept_per_layer, "select_metric": run.select_metric, "retrain_epochs": epochs,
        "scored_epoch": run.epochs_done, "candidates": candidates}
    save_checkpoint(run.checkpoint, model, **run.checkpoint_fields,
                    extra={**run.checkpoint_extra, "epoch": run.epochs_done, "eval": metrics, "head2toe": record})
    run.best_score, run.best_epoch, run.best_metrics = score, run.epochs_done, metrics
    run.post_train = record
    log.write(run=run.name, head2toe=record)


def _retrained(run, selector: Head2Toe, keep: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               epochs: int) -> Head2Toe:
    """A fresh head on the kept features, trained on the pooled train split (x, y) as the run trains: AdamW
    with its lr, weight decay, warm-up, schedule, gradient clipping and batch size; no penalty."""
    from .._trainer import _schedule  # (the trainer imports the method registry, which imports this)

    model = Head2Toe(selector.config, selector.layer_widths, selector.classifier.out_features).to(x.device)
    model.load_state_dict(selector.state_dict())  # μ, σ (per_feature) as the selection phase used them
    model.classifier.reset_parameters()  # a fresh head, as the official code builds one
    model.set_keep(keep)  # dropped columns 0; their gradient is 0 too (the features are), so they stay 0
    params = list(model.classifier.parameters())
    optimizer = torch.optim.AdamW(params, lr=run.config.lr, weight_decay=run.config.weight_decay)
    batch_size = run.config.batch_size
    per_epoch = math.ceil(len(x) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(run.config, per_epoch * epochs))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x)).to(x.device)
        for start in range(0, len(x), batch_size):
            rows = order[start:start + batch_size]
            loss = run.task.loss(model.head(x[rows]).float(), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if run.config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, run.config.grad_clip)
            optimizer.step()
            scheduler.step()
    with torch.no_grad():
        model.classifier.weight.mul_(model.keep)  # exactly 0 off the selection, whatever rounding did
    return model.eval()


@torch.no_grad()
def _metrics(model: Head2Toe, task, x: torch.Tensor, y: torch.Tensor, *, tune: bool) -> dict[str, float]:
    """The task's metrics of ``model`` on pooled features ``x`` with targets ``y`` (a whole split)."""
    model.eval()
    outputs, targets = [], []
    for rows in torch.arange(len(x), device=x.device).split(4096):
        out, tgt = task.scored(model.head(x[rows]).float(), y[rows])
        outputs.append(out)
        targets.append(tgt)
    return task.metrics(torch.cat(outputs), torch.cat(targets), tune=tune)


