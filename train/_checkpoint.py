"""Checkpoints: ``model.safetensors`` (weights) + ``config.json`` (everything to rebuild and check them).

Never pickle: loading a teammate's checkpoint must not be able to run code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from unipt.store import FeatureStore, check_provenance

from ._files import is_url, join, read_bytes, write_atomic
from ._methods import get_method
from .tasks import HeadSpec, Task, task_from_record

CHECKPOINT_FORMAT = "unipt-checkpoint"
CHECKPOINT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def store_identity(store: FeatureStore) -> dict[str, Any]:
    """The parts of a store's provenance a trained side network depends on.

    Storage dtype is left out on purpose: a float32 and a float16 store of the same backbone feed the
    same network.
    """
    backbone = store.provenance.get("backbone")
    backbone = backbone if isinstance(backbone, dict) else {}
    return {
        "format_version": store.meta["format_version"],
        "weights_sha256": backbone.get("weights_sha256"),
        "tokenizer_sha256": backbone.get("tokenizer_sha256"),
        "label_names": store.label_names,
        # Only where it is not classification, so checkpoints from before tasks existed still match.
        **({} if store.task == "classification" else {"task": store.task}),
    }


def inference_record(store: FeatureStore) -> dict[str, Any]:
    """What rebuilding the side network's inputs from raw text needs: where the backbone was found, its
    truncation length, and the dtype the activations were rounded through. Kept out of
    :func:`store_identity`, which leaves the dtype out on purpose."""
    backbone = store.provenance.get("backbone")
    backbone = backbone if isinstance(backbone, dict) else {}
    source = store.provenance.get("source")
    pair = source.get("text_pair_column") if isinstance(source, dict) else None
    return {"backbone": backbone.get("location"), "max_length": backbone.get("max_length"),
            "storage_dtype": store.dtype, "modality": backbone.get("modality", "text"),
            **({} if pair is None else {"text_pair_column": pair})}


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    *,
    method: str,
    model_config: Mapping[str, Any],
    layers: list[int],
    layer_widths: list[int],
    store: FeatureStore,
    task: Task | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path | str:
    """``task``: the run's task (default: classification over the store's labels), saved with its learned
    state (regression statistics, a tuned threshold) so evaluation and prediction use it as trained."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # Weights first, config.json last: each file is written whole (temp + rename, or one PUT), and a config.json
    # always describes weights that are already in place.
    write_atomic(join(directory, WEIGHTS), save_safetensors(state))
    config = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "method": method,
        "model": dict(model_config),
        "layers": layers,
        "layer_widths": layer_widths,
        "num_labels": len(store.label_names),
        **({} if task is None else {"task": task.record(),
                                    "head": {"outputs": task.head.outputs, "per_token": task.head.per_token}}),
        "store": store_identity(store),
        "inference": inference_record(store),
        **(extra or {}),
    }
    write_config(directory, config)
    return directory if is_url(directory) else Path(directory)


def write_config(directory: str | Path, config: Mapping[str, Any]) -> None:
    """Replace a checkpoint's config.json (written whole: temp + rename, or one PUT)."""
    write_atomic(join(directory, CONFIG), (json.dumps(config, indent=2) + "\n").encode())


def read_checkpoint_config(directory: str | Path) -> dict[str, Any]:
    """A checkpoint's ``config.json``, checked to be a unipt checkpoint of a version this code reads."""
    config_path = join(directory, CONFIG)
    try:
        text = read_bytes(config_path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory} is not a unipt checkpoint (no {CONFIG})") from None
    try:
        config = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_path} is not JSON ({exc}): the checkpoint is damaged; restore it or train again") from exc
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT or config.get("version") != CHECKPOINT_VERSION:
        found = (config.get("format"), config.get("version")) if isinstance(config, dict) else (type(config).__name__, "?")
        raise ValueError(f"{config_path}: format {found[0]!r} v{found[1]} is not {CHECKPOINT_FORMAT!r} v{CHECKPOINT_VERSION}")
    return config


def load_checkpoint(directory: str | Path, *, map_location: str | torch.device = "cpu",
                    model_options: Mapping[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from ``config.json`` and load its safetensors weights (a folder or an fsspec URL).

    ``model_options`` replace saved model options, e.g. SHERL's ``backbone`` folder on a machine that keeps the
    backbone elsewhere (its saved weights hash is still checked against the folder)."""
    config = read_checkpoint_config(directory)
    if config.get("kind") == "two-tower":
        raise ValueError(f"{directory} is a two-tower retrieval checkpoint: load it with "
                         "unipt.train.retrieval.load_two_tower; serve it with `unipt index` and `unipt search`")
    method = get_method(config["method"])
    head = HeadSpec(**config["head"]) if "head" in config else config["num_labels"]
    model = method.build(method.make_config({**config["model"], **(model_options or {})}), config["layer_widths"], head)
    load_weights(directory, model, map_location)
    return model, config


def load_weights(directory: str | Path, model: nn.Module, map_location: str | torch.device = "cpu") -> None:
    """Load a checkpoint's safetensors weights into ``model`` (built from its config.json), with errors that say
    whether the file is missing, damaged or holds other weights."""
    weights = join(directory, WEIGHTS)
    try:
        data = read_bytes(weights)
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory} has {CONFIG} but no {WEIGHTS}: the checkpoint is incomplete; restore "
                                "it or train again") from None
    try:
        state = {k: v.to(map_location) for k, v in load_safetensors(data).items()}
    except Exception as exc:  # safetensors reports a damaged header or a truncated file with its own error types
        raise ValueError(f"{weights} cannot be read as safetensors ({type(exc).__name__}: {exc}): the checkpoint is "
                         "damaged; restore it or train again") from exc
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # missing or misshapen tensors: the weights are not those config.json describes
        raise ValueError(f"{weights} does not hold the weights {join(directory, CONFIG)} describes ({exc}); restore the "
                         "checkpoint or train again") from exc


def checkpoint_task(config: Mapping[str, Any]) -> Task:
    """The task a checkpoint was trained for, with the state it learned (checkpoints from before tasks
    existed: classification over their store's labels)."""
    return task_from_record(config.get("task"), config["store"]["label_names"])


def check_store_matches(config: Mapping[str, Any], store: FeatureStore) -> None:
    """Refuse a store made from another backbone / label set / format, or missing a needed layer."""
    check_provenance(config["store"], store_identity(store), what=f"checkpoint does not fit store {store.url}",
                     hint="Use a store extracted with the checkpoint's backbone and labels.")
    widths = store.layer_widths
    for layer, width in zip(config["layers"], config["layer_widths"]):
        if widths.get(layer) != width:
            raise ValueError(f"checkpoint needs layer {layer} of width {width}; store {store.url} has "
                             f"{'width ' + str(widths[layer]) if layer in widths else 'no such layer'} "
                             f"(layers {store.layers})")
