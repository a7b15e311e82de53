"""The stages a recipe wires together: extract into the store, train every run from it, report."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import statistics
from pathlib import Path
from typing import Mapping, Sequence

from unipt.extract import BackboneConfig, ExtractSummary, backbone_hashes, resolve_path, run_extraction
from unipt.store import FeatureStore, check_provenance
from unipt.train import MetricsLog, RunResult, TrainConfig, fit_many, get_method, pass_groups

from ._recipe import Recipe, RetrievalRecipe, select_runs

log = logging.getLogger("unipt")


def extract_stage(recipe: Recipe, *, progress: bool = True) -> ExtractSummary:
    log.info("extracting %s into %s", recipe.backbone.model, recipe.store)
    summary = run_extraction(recipe.source, recipe.backbone, recipe.extract, recipe.store, progress=progress)
    log.info(summary.describe())
    _save_resolved(recipe)
    return summary


def train_stage(recipe: Recipe, runs: Sequence[str] = (), *, separate: bool = False, progress: bool = True,
                allow_incomplete: bool = False, restart: bool = False, stack: str | None = None,
                workers: int | None = None, scheduler: str | None = None) -> list[RunResult]:
    """Train ``runs`` (run or section names; default: all), results in recipe order.

    Runs that can share batches (unipt.train.PASS_FIELDS) train together from one pass over the store per
    epoch; ``separate`` gives every run its own passes instead (same results, for timing comparisons).
    Finished runs are read back and unfinished ones resume from their last saved epoch; ``restart`` trains
    them all from scratch. ``stack`` ("auto", "on", "off") overrides every run's ``stack``. ``workers`` (a local
    dask cluster of that many processes) or ``scheduler`` (an existing cluster's address) train the pass
    groups on dask workers, each streaming the store itself. A search section (``search = {...}``) runs its
    trials after the other runs. A store whose extraction has not finished is refused unless
    ``allow_incomplete``.
    """
    selected = select_runs(recipe, runs)
    store = FeatureStore.open(recipe.store)
    check_store_fits_recipe(recipe, store)
    metrics = MetricsLog(recipe.metrics_log)
    configs = {name: with_recipe_backbone(_stacking(recipe.train[name], stack), recipe) for name in selected
               if name in recipe.train}
    groups = [{name: config} for name, config in configs.items()] if separate else pass_groups(configs)
    results: dict[str, RunResult] = {}
    if groups and (workers or scheduler):
        from ._distributed_train import train_on_dask

        log.info("training %d runs in %d pass groups on dask (%s)", len(configs), len(groups),
                 scheduler or f"{workers} local workers")
        results = {r.name: r for r in train_on_dask(recipe, [list(group) for group in groups], workers=workers or 0,
                                                    scheduler=scheduler, progress=progress, resume=not restart,
                                                    allow_incomplete=allow_incomplete, stack=stack)}
        groups = []  # trained there
    for group in groups:
        together = f" in one pass ({len(group)} runs)" if len(group) > 1 else ""
        log.info("training %s from %s%s", ", ".join(f"{name} ({c.method})" for name, c in group.items()),
                 recipe.store, together)
        for result in fit_many(group, store, recipe.checkpoints, loader_config=recipe.loader, log=metrics,
                               progress=progress, allow_incomplete=allow_incomplete, resume=not restart):
            log.info("%s: best epoch %d, %s", result.name, result.best_epoch, _fmt_metrics(result.eval_metrics))
            results[result.name] = result
    ordered = [results[name] for name in selected if name in results]
    for section in _selected_searches(recipe, runs):
        from ._tune import search_stage

        ordered += search_stage(recipe, section, store, progress=progress, allow_incomplete=allow_incomplete,
                                restart=restart, stack=stack)
    _save_resolved(recipe)
    return ordered


def _stacking(config: TrainConfig, stack: str | None) -> TrainConfig:
    return config if stack is None else dataclasses.replace(config, stack=stack)


def with_recipe_backbone(config: TrainConfig, recipe: Recipe) -> TrainConfig:
    """A run whose method runs part of the backbone itself (SHERL's frozen last block: a ``backbone`` model
    option) and names no folder gets the recipe's backbone folder, which may be a pkg:// or convert:// spec that
    train/ cannot resolve (check_store_fits_recipe has checked it against the store)."""
    option_names = {f.name for f in dataclasses.fields(get_method(config.method).config_cls)}
    if "backbone" not in option_names or config.model.get("backbone"):
        return config
    try:
        folder = Path(resolve_path(recipe.backbone.model))
    except FileNotFoundError:
        return config  # (not installed here: the store's recorded folder, if any, is used)
    if not folder.is_dir():
        return config
    return dataclasses.replace(config, model={**config.model, "backbone": str(folder.resolve())})


def _selected_searches(recipe: Recipe, names: Sequence[str]) -> list[str]:
    """The search sections ``names`` picks (all when empty)."""
    searches = getattr(recipe, "searches", {})
    return [section for section in searches if not names or section in names]


def check_store_fits_recipe(recipe: Recipe, store: FeatureStore) -> None:
    """Refuse to train from a store extracted with another backbone than the recipe names."""
    check_store_fits_backbone(recipe.backbone, store)


def check_store_fits_backbone(backbone: BackboneConfig, store: FeatureStore) -> None:
    """Refuse a store extracted with another backbone than ``backbone`` names.

    Compares the sha256 of the model files (hashed, not loaded) with the store's provenance, when the model is
    a local or pkg:// folder; a hub id is not fetched just to check.
    """
    try:
        folder = Path(resolve_path(backbone.model))
    except FileNotFoundError:  # a pkg:// folder whose package is not installed here
        folder = None
    if folder is None or not folder.is_dir():
        log.info("backbone %s is not a local folder: store provenance not checked against it", backbone.model)
        return
    recorded = store.provenance.get("backbone", {})
    check_provenance(backbone_hashes(folder), {k: recorded.get(k) for k in ("weights_sha256", "tokenizer_sha256")},
                     what=f"store {store.url} was not extracted with the recipe's backbone {backbone.model}",
                     hint="Re-extract (`unipt extract`) into a new store, or point the recipe at the backbone the "
                          "store was made with.")


def results_table(results: Sequence[RunResult], test_split: str = "test", *, rank_by: str | None = None) -> str:
    """Markdown: one row per run, best eval ``rank_by`` first (default: the metric that picked the runs' best
    epochs; runs without an eval score last), with the test metrics of the runs' task.

    Where runs differ in their seed only, a second table gives each such group's mean ± sample standard
    deviation over its seeds, ranked the same way.
    """
    rank_by = rank_by or (results[0].select_metric if results else "accuracy")
    shown = _reported_metrics(results)
    ranked = sorted(results, key=lambda r: _rank(r, rank_by))
    pruned = any(r.pruned_at is not None for r in results)
    header = ["#", "run", "method", "trainable params", "best epoch", *(["status"] if pruned else []),
              f"eval {rank_by}", *(f"{test_split} {_label(m)}" for m in shown), "train time (s)", "train examples/s"]
    rows = []
    for rank, r in enumerate(ranked, 1):
        test = r.test_metrics or {}
        status = [f"pruned after epoch {r.pruned_at}" if r.pruned_at is not None else "done"] if pruned else []
        rows.append([str(rank), r.name + (" ⧉" if r.stacked else ""), r.method, f"{r.trainable_params:,}",
                     str(r.best_epoch), *status, _fmt(r.eval_metrics.get(rank_by)),
                     *(_fmt(test.get(m)) for m in shown), f"{r.train_seconds:.1f}", f"{r.train_examples_per_s:.0f}"])
    out = [_markdown(header, rows)]
    if any(r.runs_in_pass > 1 for r in results):
        out += ["", "Runs trained in one pass over the store share its time: their train time and examples/s are "
                    "the pass's."]
    if any(r.stacked for r in results):
        out += ["", "⧉ trained stacked with the other runs of its pass whose parameter shapes agree (one batched "
                    "forward and backward per batch)."]
    if pruned:
        out += ["", "Pruned runs left the pass early (successive halving on the eval metric): they are ranked by "
                    "their best eval score so far and have no test score."]
    groups = _seed_groups(results)
    if groups:
        header = ["#", "runs", "method", "seeds", f"eval {rank_by}", *(f"{test_split} {_label(m)}" for m in shown)]
        groups.sort(key=lambda g: statistics.fmean(_rank(r, rank_by) for r in g))
        rows = [[str(rank), f"{_without_seed(g[0].name)} ({len(g)} seeds)", g[0].method,
                 ", ".join(str(r.config["seed"]) for r in g),
                 _mean_std([r.eval_metrics.get(rank_by) for r in g]),
                 *(_mean_std([(r.test_metrics or {}).get(m) for r in g]) for m in shown)]
                for rank, g in enumerate(groups, 1)]
        out += ["", "Mean ± std over seeds (runs that differ in their seed only):", "", _markdown(header, rows)]
    return "\n".join(out)


_LOWER_IS_BETTER = ("loss", "rmse")
_NOT_SHOWN = ("loss", "n", "threshold")


def _reported_metrics(results: Sequence[RunResult]) -> list[str]:
    """The task's metrics, as the first run that has any reports them (classification: accuracy, macro-F1)."""
    for r in results:
        metrics = r.test_metrics or r.eval_metrics
        if metrics:
            return [m for m in metrics if m not in _NOT_SHOWN]
    return ["accuracy", "macro_f1"]


def _label(metric: str) -> str:
    recall = re.fullmatch(r"(q2d|d2q)_r(\d+)", metric)  # retrieval: R@K query -> document, document -> query
    if recall:
        return f"{'q→d' if recall[1] == 'q2d' else 'd→q'} R@{recall[2]}"
    return {"macro_f1": "macro-F1", "micro_f1": "micro-F1", "map": "mAP", "entity_f1": "entity F1",
            "token_accuracy": "token accuracy", "rmse": "RMSE"}.get(metric, metric.replace("_", " "))


def _rank(result: RunResult, metric: str) -> float:
    """Sort key: best first (lower-is-better metrics ascending), runs without the metric last."""
    value = result.eval_metrics.get(metric)
    if value is None or math.isnan(value):
        return math.inf
    return value if metric in _LOWER_IS_BETTER else -value


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _seed_groups(results: Sequence[RunResult]) -> list[list[RunResult]]:
    """Groups of two or more runs whose configs are equal but for ``seed``, in order of first appearance."""
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        if r.config:
            key = json.dumps({k: v for k, v in r.config.items() if k != "seed"}, sort_keys=True, default=str)
            groups.setdefault(key, []).append(r)
    return [g for g in groups.values() if len({r.config["seed"] for r in g}) > 1]


def _without_seed(name: str) -> str:
    """``unipt@lr=0.001,seed=2`` -> ``unipt@lr=0.001``; ``unipt@seed=2`` -> ``unipt`` (sweep names)."""
    return re.sub(r"@$", "", re.sub(r"(?<=[@,])seed=[^,]*(,|$)", "", name)).rstrip(",")


def _mean_std(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {std:.4f}"


def write_report(recipe: Recipe | RetrievalRecipe, results: Sequence[RunResult],
                 extraction: ExtractSummary | Mapping[str, ExtractSummary] | None) -> Path:
    """summary.md (the table) and summary.json (every number) in the recipe's workdir. ``extraction``: the
    store's extraction, or each tower's (a retrieval recipe)."""
    workdir = Path(recipe.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    table = results_table(results)
    lines = [f"# {recipe.name}", "", recipe.description, "", table, ""]
    for section, plot in _sweep_plots(recipe, results, workdir).items():
        lines += [f"Validation score against the swept values of [train.{section}]: ![{section}]({plot.name})", ""]
    extractions = extraction if isinstance(extraction, Mapping) else {} if extraction is None else {"": extraction}
    for tower, summary in extractions.items():
        lines += [f"Extraction{f' ({tower} tower)' if tower else ''}: {summary.describe()}", ""]
    record = {name: {**summary.__dict__, "examples_per_s": summary.examples_per_s} for name, summary in extractions.items()}
    (workdir / "summary.md").write_text("\n".join(lines))
    (workdir / "summary.json").write_text(json.dumps({
        "recipe": recipe.name,
        "store": getattr(recipe, "store", None) or {t: tower.store for t, tower in recipe.towers.items()},
        "extraction": record.get("", record or None),
        "runs": [{k: v for k, v in r.__dict__.items() if k != "history"} | {"history": r.history} for r in results],
    }, indent=2) + "\n")
    return workdir / "summary.md"


def _sweep_plots(recipe, results: Sequence[RunResult], workdir: Path) -> dict[str, Path]:
    """An SVG per sweep or search section with two or more runs among ``results``: <workdir>/sweep-<section>.svg."""
    from ._sweep_plot import sweep_plot

    plots = {}
    for section, names in recipe.sections.items():  # a search section lists no runs: its trials are <section>@...
        mine = [r for r in results if r.name in names or r.name.startswith(f"{section}@")]
        if len(mine) >= 2:
            plot = sweep_plot(mine, workdir / f"sweep-{section}.svg")
            if plot is not None:
                plots[section] = plot
    return plots


def _save_resolved(recipe: Recipe) -> None:
    """The resolved recipe (overrides applied) beside what it produced, so a run can be repeated."""
    workdir = Path(recipe.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "recipe.resolved.json").write_text(json.dumps(recipe.raw, indent=2, default=str) + "\n")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _fmt_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
