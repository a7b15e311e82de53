"""The stages a recipe wires together: extract into the store, train every run from it, report."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from unipt.extract import ExtractSummary, backbone_hashes, resolve_path, run_extraction
from unipt.store import FeatureStore, check_provenance
from unipt.train import MetricsLog, RunResult, fit

from ._recipe import Recipe

log = logging.getLogger("unipt")


def extract_stage(recipe: Recipe, *, progress: bool = True) -> ExtractSummary:
    log.info("extracting %s into %s", recipe.backbone.model, recipe.store)
    summary = run_extraction(recipe.source, recipe.backbone, recipe.extract, recipe.store, progress=progress)
    log.info(summary.describe())
    _save_resolved(recipe)
    return summary


def train_stage(recipe: Recipe, runs: Sequence[str] = (), *, progress: bool = True) -> list[RunResult]:
    unknown = sorted(set(runs) - set(recipe.train))
    if unknown:
        raise ValueError(f"no run(s) {unknown} in recipe {recipe.name!r}; its runs are {sorted(recipe.train)}")
    store = FeatureStore.open(recipe.store)
    check_store_fits_recipe(recipe, store)
    metrics = MetricsLog(recipe.metrics_log)
    results = []
    for name in runs or list(recipe.train):
        config = recipe.train[name]
        log.info("training %s (%s) from %s", name, config.method, recipe.store)
        result = fit(name, store, config, recipe.checkpoints, loader_config=recipe.loader, log=metrics, progress=progress)
        log.info("%s: best epoch %d, %s", name, result.best_epoch, _fmt_metrics(result.eval_metrics))
        results.append(result)
    _save_resolved(recipe)
    return results


def check_store_fits_recipe(recipe: Recipe, store: FeatureStore) -> None:
    """Refuse to train from a store extracted with another backbone than the recipe names.

    Compares the sha256 of the recipe's model files (hashed, not loaded) with the store's provenance, when
    the model is a local or pkg:// folder; a hub id is not fetched just to check.
    """
    try:
        folder = Path(resolve_path(recipe.backbone.model))
    except FileNotFoundError:  # a pkg:// folder whose package is not installed here
        folder = None
    if folder is None or not folder.is_dir():
        log.info("backbone %s is not a local folder: store provenance not checked against it", recipe.backbone.model)
        return
    recorded = store.provenance.get("backbone", {})
    check_provenance(backbone_hashes(folder), {k: recorded.get(k) for k in ("weights_sha256", "tokenizer_sha256")},
                     what=f"store {store.url} was not extracted with the recipe's backbone {recipe.backbone.model}",
                     hint="Re-extract (`unipt extract`) into a new store, or point the recipe at the backbone the "
                          "store was made with.")


def results_table(results: Sequence[RunResult], test_split: str = "test") -> str:
    """A Markdown table: one row per run."""
    header = ["run", "method", "trainable params", "best epoch", f"{test_split} accuracy", f"{test_split} macro-F1",
              "train time (s)", "train examples/s"]
    rows = []
    for r in results:
        test = r.test_metrics or {}
        rows.append([r.name, r.method, f"{r.trainable_params:,}", str(r.best_epoch),
                     _fmt(test.get("accuracy")), _fmt(test.get("macro_f1")),
                     f"{r.train_seconds:.1f}", f"{r.train_examples_per_s:.0f}"])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def write_report(recipe: Recipe, results: Sequence[RunResult], extraction: ExtractSummary | None) -> Path:
    """summary.md (the table) and summary.json (every number) in the recipe's workdir."""
    workdir = Path(recipe.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    table = results_table(results)
    lines = [f"# {recipe.name}", "", recipe.description, "", table, ""]
    if extraction is not None:
        lines += [f"Extraction: {extraction.describe()}", ""]
    (workdir / "summary.md").write_text("\n".join(lines))
    (workdir / "summary.json").write_text(json.dumps({
        "recipe": recipe.name,
        "store": recipe.store,
        "extraction": None if extraction is None else {**extraction.__dict__, "examples_per_s": extraction.examples_per_s},
        "runs": [{k: v for k, v in r.__dict__.items() if k != "history"} | {"history": r.history} for r in results],
    }, indent=2) + "\n")
    return workdir / "summary.md"


def _save_resolved(recipe: Recipe) -> None:
    """The resolved recipe (overrides applied) beside what it produced, so a run can be repeated."""
    workdir = Path(recipe.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "recipe.resolved.json").write_text(json.dumps(recipe.raw, indent=2, default=str) + "\n")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _fmt_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
