"""Recipes: a TOML file with one section per component, typed into the components' config dataclasses.

    name, workdir, store         where everything this recipe makes goes
    [source]                     unipt.extract.SourceConfig
    [backbone]                   unipt.extract.BackboneConfig
    [extract]                    unipt.extract.ExtractConfig
    [loader]                     unipt.train.LoaderConfig
    [train.<run name>]           unipt.train.TrainConfig (method + its [train.<run>.model] options)

``key=value`` overrides address any field by its dotted path (``train.unipt.lr=1e-3``,
``source.max_examples={train=20000}``); values are TOML literals, and bare words are strings. Unknown keys
are refused with the list of valid ones.
"""

from __future__ import annotations

import copy
import dataclasses
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

from unipt.extract import BackboneConfig, ExtractConfig, SourceConfig
from unipt.train import LoaderConfig, TrainConfig, get_method

RECIPE_SUFFIX = ".toml"
_TOP_LEVEL = {"name", "description", "workdir", "store", "source", "backbone", "extract", "loader", "train"}


@dataclass
class Recipe:
    name: str
    workdir: str
    store: str
    source: SourceConfig
    backbone: BackboneConfig
    extract: ExtractConfig
    loader: LoaderConfig
    train: dict[str, TrainConfig]
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the resolved document, saved with outputs

    @property
    def checkpoints(self) -> Path:
        return Path(self.workdir) / "checkpoints"

    @property
    def metrics_log(self) -> Path:
        return Path(self.workdir) / "metrics.jsonl"


def shipped_recipes() -> dict[str, Path]:
    """Recipes that ship with unipt, by name (file stem)."""
    folder = resources.files("unipt.pipelines") / "recipes"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(RECIPE_SUFFIX)}


def find_recipe(spec: str) -> Path:
    """A shipped recipe's name, or a path to a recipe file."""
    shipped = shipped_recipes()
    if spec in shipped:
        return shipped[spec]
    path = Path(spec)
    if path.is_file():
        return path
    raise FileNotFoundError(f"no recipe {spec!r}: not a file, and not a shipped recipe ({', '.join(sorted(shipped))})")


def load_recipe(spec: str, overrides: Sequence[str] = ()) -> Recipe:
    path = find_recipe(spec)
    try:
        document = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from exc
    for item in overrides:
        apply_override(document, item)
    return build_recipe(document, default_name=path.stem)


def parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {item!r} is not KEY=VALUE (e.g. train.unipt.lr=1e-3)")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word: a string
    return key.strip().split("."), value


def apply_override(document: dict[str, Any], item: str) -> None:
    path, value = parse_override(item)
    node = document
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[path[-1]] = value


def build_recipe(document: Mapping[str, Any], *, default_name: str = "recipe") -> Recipe:
    document = copy.deepcopy(dict(document))
    _reject_unknown(document, _TOP_LEVEL, "the recipe's top level")
    name = str(document.get("name", default_name))
    workdir = str(document.get("workdir", f"runs/{name}"))
    store = str(document.get("store") or f"{workdir}/features.zarr")
    train_section = document.get("train", {})
    if not isinstance(train_section, dict) or not train_section:
        raise ValueError("a recipe needs at least one [train.<run name>] section")
    runs = {}
    for run, values in train_section.items():
        values = dict(values)
        get_method(values.get("method", TrainConfig.method))  # fail early, listing the methods
        runs[run] = make_config(TrainConfig, values, f"[train.{run}]")
        get_method(runs[run].method).make_config(runs[run].model)  # validate the model options now
    return Recipe(
        name=name,
        workdir=workdir,
        store=store,
        source=make_config(SourceConfig, document.get("source", {}), "[source]"),
        backbone=make_config(BackboneConfig, document.get("backbone", {}), "[backbone]"),
        extract=make_config(ExtractConfig, document.get("extract", {}), "[extract]"),
        loader=make_config(LoaderConfig, document.get("loader", {}), "[loader]"),
        train=runs,
        description=str(document.get("description", "")),
        raw={**document, "name": name, "workdir": workdir, "store": store},
    )


def make_config(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """``cls(**values)``, refusing unknown keys with the list of valid ones and naming the section."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{where} must be a table of options, got {values!r}")
    _reject_unknown(values, {f.name for f in dataclasses.fields(cls)}, where)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _reject_unknown(values: Mapping[str, Any], valid: set[str], where: str) -> None:
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(valid)}")
