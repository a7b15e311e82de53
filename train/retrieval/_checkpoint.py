"""Two-tower checkpoints: ``model.safetensors`` + ``config.json``, as every unipt checkpoint (never pickle).

config.json has ``kind = "two-tower"`` and, per tower, what rebuilding and checking it needs: its method and
options, layers and widths, the identity of the store it was trained from, and where its backbone was found
(``unipt search`` assembles a query tower from backbone + side network as ``unipt predict`` does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from safetensors.torch import save_file

from unipt.store import FeatureStore

from .._checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CONFIG, WEIGHTS, inference_record, store_identity
from .._checkpoint import load_weights, read_checkpoint_config
from .config import TOWERS, RetrievalOptions
from .model import TwoTower, build_tower

KIND = "two-tower"


def tower_record(method: str, model_config: Mapping[str, Any], layers: list[int], store: FeatureStore) -> dict[str, Any]:
    return {"method": method, "model": dict(model_config), "layers": layers,
            "layer_widths": [store.layer_widths[l] for l in layers], "layout": store.layout,
            "store": store_identity(store), "inference": inference_record(store), "store_url": store.url}


def save_two_tower(directory: str | Path, model: TwoTower, *, towers: Mapping[str, Mapping[str, Any]],
                   options: RetrievalOptions, extra: Mapping[str, Any] | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(directory / WEIGHTS))
    config = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": KIND,
              "towers": {t: dict(towers[t]) for t in TOWERS}, "retrieval": _options_record(options), **(extra or {})}
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_two_tower(directory: str | Path, *, map_location: str = "cpu") -> tuple[TwoTower, dict[str, Any]]:
    """Rebuild a two-tower model from its ``config.json`` and load its safetensors weights."""
    config = read_checkpoint_config(directory)
    if config.get("kind") != KIND:
        raise ValueError(f"{directory} is a single-network checkpoint, not a two-tower retrieval one: score it with "
                         "`unipt eval`, predict with `unipt predict`")
    options = RetrievalOptions(**config["retrieval"])
    towers = {}
    for name in TOWERS:
        record = config["towers"][name]
        widths = dict(zip(record["layers"], record["layer_widths"]))
        towers[name], _, _ = build_tower(record["method"], record["model"], widths, record["layers"],
                                         options.embed_dim, record.get("layout", "tokens"),
                                         residual=options.residual)
    model = TwoTower(towers["query"], towers["document"], temperature=options.temperature,
                     max_scale=options.max_scale, learn_temperature=options.learn_temperature)
    load_weights(directory, model, map_location)
    return model.to(map_location), config


def _options_record(options: RetrievalOptions) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(options)
