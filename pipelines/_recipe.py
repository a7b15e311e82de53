"""Recipes: a TOML file with one section per component, typed into the components' config dataclasses.

    name, workdir, store         where everything this recipe makes goes
    [source]                     unipt.extract.SourceConfig; with ``modality = "image"``,
                                 unipt.extract.ImageSourceConfig (image folders, tables, IDX, webdataset)
    [backbone]                   unipt.extract.BackboneConfig
    [extract]                    unipt.extract.ExtractConfig
    [loader]                     unipt.train.LoaderConfig
    [train.<run name>]           unipt.train.TrainConfig (method + its [train.<run>.model] options), and an
                                 optional ``sweep = {lr = [1e-4, 5e-4], "model.reduction" = [2, 4]}``: the
                                 section then stands for the cartesian product of runs, named like
                                 ``<run name>@lr=0.0001,model.reduction=2`` (unipt.train.expand_sweep);
                                 with a ``search = {sampler = "tpe", trials = 32, ...}`` table
                                 (unipt.train.SearchConfig) the sweep may also hold ranges
                                 (``lr = {low = 1e-5, high = 1e-2, log = true}``), and the section is a
                                 search: its runs (``<run name>@trial=07``) are drawn as it goes, within
                                 the budget, so it makes none up front (``Recipe.searches``)

A *retrieval* recipe has two towers instead of one source, each extracted into its own store, and a pair table
that joins them (see :class:`RetrievalRecipe`)::

    [towers.query] / [towers.document]   each: store (default <workdir>/<tower>.zarr) and its own [source],
                                         [backbone] and [extract] tables, as above
    [pairs]                              PairsConfig: the table of (query id, document id) pairs
    [train.<run name>]                   as above; ``task`` holds unipt.train.retrieval.RetrievalOptions
                                         (embed_dim, loss, ...), and ``method = "frozen"`` is the zero-shot line

``key=value`` overrides address any field by its dotted path (``train.unipt.lr=1e-3``,
``source.max_examples={train=20000}``); values are TOML literals, and bare words are strings. Unknown keys
are refused with the list of valid ones, and a value of the wrong type is refused naming its field and the type
it takes (``[train.unipt] epochs = 'five': expected an integer``).
"""

from __future__ import annotations

import copy
import dataclasses
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

from unipt.extract import BackboneConfig, ExtractConfig, ImageSourceConfig, SourceConfig
from unipt.train import (MODEL_PREFIX, METHODS, LoaderConfig, SearchConfig, SectionSearch, TrainConfig, expand_sweep,
                         get_method, parse_space)
from unipt.train.retrieval import TOWER_METHODS, retrieval_options

from ._field_types import check_fields

RECIPE_SUFFIX = ".toml"
MODALITIES = {"text": SourceConfig, "image": ImageSourceConfig}  # [source] modality -> its config
_TOP_LEVEL = {"name", "description", "workdir", "store", "source", "backbone", "extract", "loader", "train"}
_RETRIEVAL_TOP_LEVEL = {"name", "description", "workdir", "towers", "pairs", "loader", "train"}
TOWER_NAMES = ("query", "document")


class _Outputs:
    """Where a recipe's outputs go, under its ``workdir``."""

    workdir: str

    @property
    def checkpoints(self) -> Path:
        return Path(self.workdir) / "checkpoints"

    @property
    def metrics_log(self) -> Path:
        return Path(self.workdir) / "metrics.jsonl"


@dataclass
class Recipe(_Outputs):
    name: str
    workdir: str
    store: str
    source: SourceConfig | ImageSourceConfig
    backbone: BackboneConfig
    extract: ExtractConfig
    loader: LoaderConfig
    train: dict[str, TrainConfig]
    """Every run by name, sweeps expanded."""
    description: str = ""
    sections: dict[str, list[str]] = field(default_factory=dict)
    """Each [train.<section>]'s runs: [section] itself, or the runs its sweep expands into (a search: none)."""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the resolved document, saved with outputs
    searches: dict[str, SectionSearch] = field(default_factory=dict)
    """Each [train.<section>] with a ``search`` table: its base config, parsed space and SearchConfig."""


@dataclass
class PairsConfig:
    path: str = ""
    """The pair table (CSV, TSV, JSONL, Parquet; data:// and pkg:// paths too): one row per (query, document) pair;
    a query relevant to several documents (or a document with several captions) has several rows."""
    query_column: str = "query_id"
    """Column holding the query's example id (the id the query store keeps: its source's id_column)."""
    document_column: str = "document_id"
    """Column holding the document's example id."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("[pairs] path is required: the table of (query id, document id) pairs")


@dataclass
class Tower:
    """One side of a retrieval recipe: its own source, backbone, extraction settings and store."""

    name: str
    store: str
    source: SourceConfig | ImageSourceConfig
    backbone: BackboneConfig
    extract: ExtractConfig


@dataclass
class RetrievalRecipe(_Outputs):
    name: str
    workdir: str
    towers: dict[str, Tower]
    """``query`` and ``document``."""
    pairs: PairsConfig
    loader: LoaderConfig
    train: dict[str, TrainConfig]
    description: str = ""
    sections: dict[str, list[str]] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def pair_index(self) -> str:
        """Where the pair index (unipt.store.PairIndex) built from the pair table and both stores is kept."""
        return f"{self.workdir}/pairs.json"


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


def recipe_has_towers(spec: str) -> bool:
    """Whether a recipe is a retrieval recipe (two [towers], no single [source]); False for one that does not parse
    (loading it reports why)."""
    try:
        return "towers" in tomllib.loads(find_recipe(spec).read_text())
    except (tomllib.TOMLDecodeError, OSError):
        return False


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


def build_recipe(document: Mapping[str, Any], *, default_name: str = "recipe") -> Recipe | RetrievalRecipe:
    document = copy.deepcopy(dict(document))
    if "towers" in document:
        return _retrieval_recipe(document, default_name)
    _reject_unknown(document, _TOP_LEVEL, "the recipe's top level")
    name = str(document.get("name", default_name))
    workdir = str(document.get("workdir", f"runs/{name}"))
    store = str(document.get("store") or f"{workdir}/features.zarr")
    runs, sections, searches = _train_sections(document.get("train", {}))
    return Recipe(
        name=name,
        workdir=workdir,
        store=store,
        source=_source_config(document.get("source", {})),
        backbone=make_config(BackboneConfig, document.get("backbone", {}), "[backbone]"),
        extract=make_config(ExtractConfig, document.get("extract", {}), "[extract]"),
        loader=make_config(LoaderConfig, document.get("loader", {}), "[loader]"),
        train=runs,
        description=str(document.get("description", "")),
        sections=sections,
        raw={**document, "name": name, "workdir": workdir, "store": store},
        searches=searches,
    )


def _train_sections(train_section: Any, methods: Mapping[str, Any] = METHODS,
                    retrieval: bool = False,
                    ) -> tuple[dict[str, TrainConfig], dict[str, list[str]], dict[str, SectionSearch]]:
    """Every [train.<section>]'s runs (sweeps expanded), which runs each section makes (a search: none, its
    runs are drawn as it goes), and each search section's search (Recipe.searches). Retrieval recipes take
    grid sweeps only."""
    if not isinstance(train_section, dict) or not train_section:
        raise ValueError("a recipe needs at least one [train.<run name>] section")
    runs: dict[str, TrainConfig] = {}
    sections: dict[str, list[str]] = {}
    searches: dict[str, SectionSearch] = {}
    for section, values in train_section.items():
        if retrieval and isinstance(values, Mapping) and "search" in values:
            raise ValueError(f"[train.{section}]: a retrieval recipe cannot search (search = {{...}}) yet, as its "
                             f"two-tower trainer has no per-epoch hook to prune on; give the sweep lists of values "
                             f"(a grid)")
        expanded, search = _train_section(section, values, methods)
        if search is not None:
            searches[section] = search
        clash = sorted(set(expanded) & set(runs))
        if clash:
            raise ValueError(f"[train.{section}] makes run(s) {clash} that another [train.*] section already makes")
        if retrieval:
            for run, config in expanded.items():
                try:
                    retrieval_options(config)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"[train.{section}] task: {exc}") from exc
        runs.update(expanded)
        sections[section] = list(expanded)
    return runs, sections, searches


def _retrieval_recipe(document: dict[str, Any], default_name: str) -> RetrievalRecipe:
    _reject_unknown(document, _RETRIEVAL_TOP_LEVEL, "the retrieval recipe's top level")
    name = str(document.get("name", default_name))
    workdir = str(document.get("workdir", f"runs/{name}"))
    towers_section = document.get("towers")
    if not isinstance(towers_section, Mapping) or sorted(towers_section) != sorted(TOWER_NAMES):
        found = sorted(towers_section) if isinstance(towers_section, Mapping) else towers_section
        raise ValueError(f"a retrieval recipe needs exactly the towers {list(TOWER_NAMES)} ([towers.query], "
                         f"[towers.document]), got {found}")
    towers = {}
    for tower in TOWER_NAMES:
        values = towers_section[tower]
        where = f"[towers.{tower}]"
        if not isinstance(values, Mapping):
            raise ValueError(f"{where} must be a table, got {values!r}")
        _reject_unknown(values, {"store", "source", "backbone", "extract"}, where)
        store = str(values.get("store") or f"{workdir}/{tower}.zarr")
        values.setdefault("store", store)
        towers[tower] = Tower(tower, store, _source_config(values.get("source", {}), f"{where} source"),
                              make_config(BackboneConfig, values.get("backbone", {}), f"{where} backbone"),
                              make_config(ExtractConfig, values.get("extract", {}), f"{where} extract"))
    if towers["query"].store == towers["document"].store:
        raise ValueError(f"the two towers write one store ({towers['query'].store}): give each its own `store`")
    runs, sections, _ = _train_sections(document.get("train", {}), TOWER_METHODS, retrieval=True)
    return RetrievalRecipe(
        name=name, workdir=workdir, towers=towers,
        pairs=make_config(PairsConfig, document.get("pairs", {}), "[pairs]"),
        loader=make_config(LoaderConfig, document.get("loader", {}), "[loader]"),
        train=runs, description=str(document.get("description", "")), sections=sections,
        raw={**document, "name": name, "workdir": workdir})


def _source_config(values: Any, where: str = "[source]") -> SourceConfig | ImageSourceConfig:
    """[source]: a text source, or with ``modality = "image"`` an image source."""
    values = dict(values) if isinstance(values, Mapping) else values
    modality = values.pop("modality", "text") if isinstance(values, dict) else "text"
    if not isinstance(modality, str) or modality not in MODALITIES:  # an array or table cannot be looked up
        raise ValueError(f"{where} modality must be one of {sorted(MODALITIES)}, got {modality!r}")
    return make_config(MODALITIES[modality], values, where)


def _train_section(section: str, values: Any,
                   methods: Mapping[str, Any] = METHODS) -> tuple[dict[str, TrainConfig], SectionSearch | None]:
    """One [train.<section>]: its run, or the runs its ``sweep`` table expands into; or, with a ``search`` table,
    no runs and the search that will draw them."""
    where = f"[train.{section}]"
    if not isinstance(values, Mapping):
        raise ValueError(f"{where} must be a table of options, got {values!r}")
    values = dict(values)
    _reject_unknown(values, {f.name for f in dataclasses.fields(TrainConfig)} | {"sweep", "search"}, where)
    sweep = values.pop("sweep", {})
    search = values.pop("search", None)
    if not isinstance(sweep, Mapping):
        raise ValueError(f"{where}: sweep must be a table of lists (sweep = {{ lr = [1e-4, 5e-4] }}), got {sweep!r}")
    ranges = {key: spec for key, spec in sweep.items() if isinstance(spec, Mapping)}
    if ranges and search is None:
        raise ValueError(f"{where} sweep: {sorted(ranges)} {'is a range' if len(ranges) == 1 else 'are ranges'}, "
                         f"which only a search draws from: add search = {{ sampler = \"tpe\", trials = 32 }} to the "
                         f"section, or give lists of values (a grid)")
    base = make_config(TrainConfig, values, where)
    search_config = make_config(SearchConfig, search, f"{where} search") if search is not None else None
    # Swept values are checked here, before expand_sweep or parse_space builds configs from them: each against the
    # field it sets, a model option against each method it may run with; a range's ends as values of the field.
    # Anything else is left to expand_sweep / parse_space.
    lists = {key: options for key, options in sweep.items() if isinstance(options, list)}
    ends = [{key: spec[end] for key, spec in ranges.items() if end in spec} for end in ("low", "high")]
    check_fields(TrainConfig, lists, where, "sweep.", swept=True)
    for values_at_end in ends:
        check_fields(TrainConfig, values_at_end, where, "sweep.")
    swept_model = {key[len(MODEL_PREFIX):]: options for key, options in lists.items() if key.startswith(MODEL_PREFIX)}
    model_ends = [{key[len(MODEL_PREFIX):]: v for key, v in values_at_end.items() if key.startswith(MODEL_PREFIX)}
                  for values_at_end in ends]
    for method in lists.get("method", [base.method]):
        config_cls = get_method(method, methods).config_cls  # an unknown method is refused, listing the methods
        check_fields(config_cls, base.model, where, "model.")
        check_fields(config_cls, swept_model, where, "sweep.model.", swept=True)
        for values_at_end in model_ends:
            check_fields(config_cls, values_at_end, where, "sweep.model.")
    if "method" not in sweep:
        get_method(base.method, methods).make_config(base.model)  # validate the model options now
    try:
        if search_config is not None:
            return {}, SectionSearch(base, parse_space(sweep, base, methods), search_config)
        return expand_sweep(section, base, sweep, methods), None
    except ValueError as exc:
        raise ValueError(f"{where} sweep: {exc}") from exc


def select_runs(recipe: Recipe | RetrievalRecipe, names: Sequence[str] = ()) -> list[str]:
    """The runs ``names`` pick (run names, or section names standing for all their runs); all when empty."""
    if not names:
        return list(recipe.train)
    unknown = sorted(set(names) - set(recipe.train) - set(recipe.sections))
    if unknown:
        sweeps = sorted(set(recipe.sections) - set(recipe.train))
        also = f"; or a sweep's section, for all its runs: {sweeps}" if sweeps else ""
        raise ValueError(f"no run(s) {unknown} in recipe {recipe.name!r}; its runs are {sorted(recipe.train)}{also}")
    picked = [run for name in names for run in ([name] if name in recipe.train else recipe.sections[name])]
    return list(dict.fromkeys(picked))


def make_config(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """``cls(**values)``, refusing unknown keys with the list of valid ones and values of the wrong type, naming
    the section."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{where} must be a table of options, got {values!r}")
    _reject_unknown(values, {f.name for f in dataclasses.fields(cls)}, where)
    check_fields(cls, values, where)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _reject_unknown(values: Mapping[str, Any], valid: set[str], where: str) -> None:
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(valid)}")
