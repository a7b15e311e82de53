"""Resumable runs: each run's training state saved after every epoch, and a record once it is finished.

In a run's folder (beside its best checkpoint, ``model.safetensors`` + ``config.json``):

    train-state-e0003.safetensors   current weights, AdamW moments and step counts, the run's torch random
                                    state (CPU, and the GPU's) -- tensors only, never pickle
    train-state.json                everything else: epochs done, optimiser steps, schedule state, the
                                    optimiser's hyper-parameters, best epoch and score, the history, and
                                    which tensors file goes with it (written last)
    result.json                     the finished run's RunResult (test score included)

Every file is written whole (temp + rename, or one PUT; see ``_files``), and the tensors file carries its
epoch in its name, so a kill at any moment leaves a ``train-state.json`` that names a complete tensors file
of the same epoch. A resumed run starts the epoch after the last one saved, with the weights, optimiser
and schedule state and random stream it had then: given the same batches (the loader's order is a function
of its seed and the epoch), it ends exactly as an uninterrupted run. A run is resumed only under the same
training config and store; anything else is refused, naming the field, rather than mixing two runs.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Mapping

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ._files import TEMPORARY_PREFIX, join, listdir, read_bytes, remove, write_atomic

if TYPE_CHECKING:  # the trainer imports this module
    from ._trainer import RunResult, _Run

STATE_FORMAT = "unipt-train-state"
STATE_VERSION = 1
STATE = "train-state.json"
RESULT = "result.json"
_TENSORS_PREFIX = "train-state-e"

NOT_RESUME_FIELDS = ("device", "stack")
"""Training-config fields a run may change between sessions: where it trains, and whether it is stacked with
other runs (same training to float tolerance)."""


def resume_key(train_config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a run's training config that must be unchanged for its saved state to be resumed."""
    return {k: v for k, v in train_config.items() if k not in NOT_RESUME_FIELDS}


def check_same_run(folder: str, name: str, saved: Mapping[str, Any], train_config: Mapping[str, Any],
                   store_identity: Mapping[str, Any]) -> None:
    """Refuse to resume (or reuse the result of) run ``name`` from a record made by another config or store."""
    old, new = resume_key(saved.get("train", {})), resume_key(json.loads(json.dumps(train_config)))
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise ValueError(
                f"{folder} holds run {name!r} trained with {key} = {old.get(key)!r}, but the run now has {key} = "
                f"{new.get(key)!r}; train it again from scratch (CLI: --restart; API: resume=False) or give the "
                "changed run another name")
    if saved.get("store") != json.loads(json.dumps(store_identity)):
        raise ValueError(f"{folder} holds run {name!r} trained from another store (backbone, labels or format "
                         "differ); train it again from scratch (CLI: --restart; API: resume=False)")


def save_state(run: _Run, store_identity: Mapping[str, Any]) -> None:
    """Save ``run``'s training state after its ``run.epochs_done``-th epoch."""
    tensors: dict[str, torch.Tensor] = {f"model/{k}": v for k, v in run.model.state_dict().items()}
    optimizer = run.optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in optimizer["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    cpu, gpu = run.rng.state
    tensors["rng/cpu"] = cpu
    if gpu is not None:
        tensors["rng/cuda"] = gpu
    name = f"{_TENSORS_PREFIX}{run.epochs_done:04d}.safetensors"
    write_atomic(join(run.checkpoint, name),
                 save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))
    record = {
        "format": STATE_FORMAT, "version": STATE_VERSION, "run": run.name, "tensors": name,
        "train": run.train_record, "store": dict(store_identity),
        "epochs_done": run.epochs_done, "step": run.step, "seen": run.seen, "train_seconds": run.train_seconds,
        "best_score": run.best_score, "best_epoch": run.best_epoch, "best_metrics": run.best_metrics,
        "pruned_at": run.pruned_at, "history": run.history,
        "scheduler": run.scheduler.state_dict(),
        "optimizer_groups": optimizer["param_groups"], "optimizer_scalars": scalars,
    }
    write_atomic(join(run.checkpoint, STATE), (json.dumps(record, indent=1) + "\n").encode())
    for old in listdir(run.checkpoint):  # earlier epochs' tensors, now that the record names the new ones
        if old.startswith(_TENSORS_PREFIX) and old != name:
            remove(join(run.checkpoint, old))


def restore_state(run: _Run, store_identity: Mapping[str, Any]) -> bool:
    """Load ``run``'s saved state into it (True), or leave it as built when there is none (False)."""
    for name in listdir(run.checkpoint):  # a write a kill cut short: the file it was replacing is intact
        if name.startswith(TEMPORARY_PREFIX):
            remove(join(run.checkpoint, name))
    record = read_record(run.checkpoint, STATE)
    if record is None:
        return False
    check_same_run(str(run.checkpoint), run.name, record, run.train_record, store_identity)
    tensors_file = join(run.checkpoint, record["tensors"])
    try:
        tensors = load_safetensors(read_bytes(tensors_file))
    except FileNotFoundError:
        raise ValueError(f"{join(run.checkpoint, STATE)} names {record['tensors']}, which is missing: the run folder "
                         "was changed by hand; train the run again from scratch (CLI: --restart)") from None
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    run.model.load_state_dict(model_state)
    optimizer_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, entry = key.split("/", 2)
            optimizer_state.setdefault(int(index), {})[entry] = value
    for index, entries in record["optimizer_scalars"].items():
        optimizer_state.setdefault(int(index), {}).update(entries)
    run.optimizer.load_state_dict({"state": optimizer_state, "param_groups": record["optimizer_groups"]})
    run.scheduler.load_state_dict(record["scheduler"])
    run.rng.state = (tensors["rng/cpu"], tensors["rng/cuda"] if "rng/cuda" in tensors and run.rng.cuda else None)
    run.epochs_done, run.step, run.seen = record["epochs_done"], record["step"], record["seen"]
    run.train_seconds = record["train_seconds"]
    run.best_score, run.best_epoch, run.best_metrics = record["best_score"], record["best_epoch"], record["best_metrics"]
    run.pruned_at, run.history = record["pruned_at"], record["history"]
    run.done = run.pruned_at is not None or run.epochs_done >= run.config.epochs or bool(
        run.config.max_steps and run.step >= run.config.max_steps)
    return True


def save_result(folder: str, result: RunResult, store_identity: Mapping[str, Any]) -> None:
    record = {"format": STATE_FORMAT, "version": STATE_VERSION, "train": result.config,
              "store": dict(store_identity), "result": result.__dict__}
    write_atomic(join(folder, RESULT), (json.dumps(record, indent=1) + "\n").encode())


def load_result(folder: str, name: str, train_config: Mapping[str, Any],
                store_identity: Mapping[str, Any]) -> dict[str, Any] | None:
    """A finished run's saved RunResult fields, or None when it has not finished."""
    record = read_record(folder, RESULT)
    if record is None:
        return None
    check_same_run(folder, name, record, train_config, store_identity)
    return record["result"]


def forget(folder: str) -> None:
    """Delete a run's saved state and result (a restart); its checkpoint is overwritten by the new training."""
    for name in listdir(folder):
        if name in (STATE, RESULT) or name.startswith(_TENSORS_PREFIX):
            remove(join(folder, name))


def read_record(folder: str, name: str) -> dict[str, Any] | None:
    try:
        text = read_bytes(join(folder, name))
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{join(folder, name)} is not JSON ({exc}); it was not written by unipt (its writes are "
                         "whole): delete the run folder to train it again") from exc
    if not isinstance(record, dict) or record.get("format") != STATE_FORMAT or record.get("version") != STATE_VERSION:
        raise ValueError(f"{join(folder, name)} is not a {STATE_FORMAT} v{STATE_VERSION} record; delete it to train "
                         "the run again")
    return record
