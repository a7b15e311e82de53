"""The stages of a retrieval recipe: extract each tower into its own store, join them by the pair table into a
pair index, train every two-tower run from the two stores (no backbone), report."""

from __future__ import annotations

import logging
from typing import Sequence

from unipt.extract import ExtractSummary, SourceConfig, read_rows, run_extraction
from unipt.store import FeatureStore, PairIndex
from unipt.train import MetricsLog, RunResult, pass_groups
from unipt.train.retrieval import fit_retrieval

from ._recipe import TOWER_NAMES, RetrievalRecipe, select_runs
from ._stages import _fmt_metrics, _save_resolved, check_store_fits_backbone

log = logging.getLogger("unipt")


def extract_towers(recipe: RetrievalRecipe, *, progress: bool = True) -> dict[str, ExtractSummary]:
    """Each tower's backbone once over its source, into its own store (resuming a partial one)."""
    summaries = {}
    for name in TOWER_NAMES:
        tower = recipe.towers[name]
        log.info("extracting the %s tower: %s into %s", name, tower.backbone.model, tower.store)
        summaries[name] = run_extraction(tower.source, tower.backbone, tower.extract, tower.store, progress=progress)
        log.info("%s tower: %s", name, summaries[name].describe())
    _save_resolved(recipe)
    return summaries


def open_towers(recipe: RetrievalRecipe) -> tuple[FeatureStore, FeatureStore]:
    """Both towers' stores, each checked against the backbone its tower names."""
    stores = []
    for name in TOWER_NAMES:
        tower = recipe.towers[name]
        store = FeatureStore.open(tower.store)
        check_store_fits_backbone(tower.backbone, store)
        stores.append(store)
    return stores[0], stores[1]


def read_pairs(recipe: RetrievalRecipe) -> tuple[list[tuple[str, str]], str]:
    """The pair table's (query id, document id) rows and its content fingerprint."""
    pairs = recipe.pairs
    rows, fingerprint = read_rows(SourceConfig(path=pairs.path, text_column=pairs.query_column, label_column=None))
    out = []
    for number, row in enumerate(rows, start=1):
        missing = [c for c in (pairs.query_column, pairs.document_column) if row.get(c) in (None, "")]
        if missing:
            raise ValueError(f"{pairs.path} row {number} has no {' or '.join(missing)} (columns: {sorted(row)}); "
                             "set [pairs] query_column / document_column")
        out.append((str(row[pairs.query_column]), str(row[pairs.document_column])))
    return out, fingerprint


def pair_index(recipe: RetrievalRecipe, query_store: FeatureStore, document_store: FeatureStore) -> PairIndex:
    """The recipe's pair index: the saved one while it still matches the pair table and both stores, else built
    again (and saved) from them."""
    pairs, fingerprint = read_pairs(recipe)
    source = {"path": recipe.pairs.path, "fingerprint": fingerprint}
    try:
        index = PairIndex.load(recipe.pair_index)
        index.check_stores(query_store, document_store)
        if index.pairs_source.get("fingerprint") == fingerprint:
            return index
        log.info("the pair table changed since %s was built: building it again", recipe.pair_index)
    except FileNotFoundError:
        pass
    except ValueError as exc:  # another store, or a damaged file (a provenance mismatch is a ValueError too)
        log.info("rebuilding the pair index: %s", str(exc).splitlines()[0])
    index = PairIndex.build(pairs, query_store, document_store, pairs_source=source)
    index.save(recipe.pair_index)
    log.info("pair index %s: %s", recipe.pair_index, index.describe())
    return index


def train_retrieval_stage(recipe: RetrievalRecipe, runs: Sequence[str] = (), *, separate: bool = False,
                          progress: bool = True, allow_incomplete: bool = False, restart: bool = False,
                          stack: str | None = None, workers: int | None = None,
                          scheduler: str | None = None) -> list[RunResult]:
    """Train ``runs`` (default: all) from the two stores; runs that can share batches train in one pass.

    Two-tower runs train in this process, from scratch every time (``restart`` is what they always do);
    neither stacking nor dask workers apply to them yet."""
    if workers or scheduler:
        log.warning("recipe %s is a retrieval recipe: its two-tower runs train in this process (a dask cluster "
                    "extracts its towers only)", recipe.name)
    selected = select_runs(recipe, runs)
    query_store, document_store = open_towers(recipe)
    index = pair_index(recipe, query_store, document_store)
    metrics = MetricsLog(recipe.metrics_log)
    configs = {name: recipe.train[name] for name in selected}
    groups = [{name: config} for name, config in configs.items()] if separate else pass_groups(configs)
    results = {}
    for group in groups:
        log.info("training %s from %s + %s", ", ".join(f"{name} ({c.method})" for name, c in group.items()),
                 query_store.url, document_store.url)
        for result in fit_retrieval(group, query_store, document_store, index, recipe.checkpoints,
                                    loader_config=recipe.loader, log=metrics, progress=progress,
                                    allow_incomplete=allow_incomplete):
            log.info("%s: best epoch %d, %s", result.name, result.best_epoch, _fmt_metrics(result.eval_metrics))
            results[result.name] = result
    _save_resolved(recipe)
    return [results[name] for name in selected]
