"""The search stage: a [train.<section>] with a ``search`` table, trained wave by wave from the store.

Each wave is up to ``parallel`` trials drawn by the section's sampler, trained from one pass over the store per
epoch (split by :func:`unipt.train.pass_groups` where the sweep varies the batches); after every epoch each
trial's eval value goes to the pruner, which may stop it there. The study is kept in
``<workdir>/search-<section>.journal``, so a search run again after it was killed goes on from where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from unipt.store import FeatureStore
from unipt.train import MetricsLog, RunResult, SweepSearch, fit_many, make_task, pass_groups
from unipt.train._search import apply_params

from ._recipe import Recipe
from ._stages import with_recipe_backbone


def search_stage(recipe: Recipe, section: str, store: FeatureStore, *, progress: bool = True,
                 allow_incomplete: bool = False, restart: bool = False, stack: str | None = None,
                 log: logging.Logger | None = None) -> list[RunResult]:
    """Run [train.<section>]'s search until its budget is spent: every trial's run, in trial order (pruned ones
    too, with ``pruned_at`` set and no test score), those of earlier sessions read back from their run folders.
    ``restart``: forget the study and every trial's state, and search from scratch. ``stack`` overrides the
    trials' ``stack``. ``log``: where progress is logged (default: the ``unipt`` logger)."""
    log = log or logging.getLogger("unipt")
    if section not in recipe.searches:
        raise ValueError(f"[train.{section}] is not a search in recipe {recipe.name!r}; its searches: "
                         f"{sorted(recipe.searches)}")
    spec = recipe.searches[section]
    base, config = with_recipe_backbone(spec.base, recipe), spec.config  # (SHERL's backbone folder)
    split = base.eval_split
    if split not in store.splits() or not store.parts(split):
        raise ValueError(f"[train.{section}] searches on the eval split {split!r}, which store {store.url} does not "
                         f"have (it has {store.splits()}); set eval_split")
    task = make_task(base, store)
    metric = task.check_metric(base.select_metric)
    direction = "minimize" if metric in task.lower_is_better else "maximize"
    journal = Path(recipe.workdir) / f"search-{section}.journal"
    if restart and journal.exists():
        journal.unlink()
    search = SweepSearch(section, base, spec.space, config, direction, journal)
    metrics = MetricsLog(recipe.metrics_log)

    def report(name: str, epoch: int, scores: dict[str, float] | None) -> bool:
        if scores is None:  # checked above; a store losing its eval split mid-way would land here
            raise ValueError(f"search run {name} has no {split!r} scores after epoch {epoch} to compare it on")
        return search.report(name, epoch, scores[metric])

    results: dict[str, RunResult] = {}
    log.info("searching [train.%s]: %d trials left of %d (%s sampler, %s pruning), %s %s %s", section,
             search.remaining, config.trials, config.sampler, config.prune, direction, split, metric)
    while search.remaining:
        wave = search.ask(config.parallel)
        if stack is not None:
            wave = {name: dataclasses.replace(c, stack=stack) for name, c in wave.items()}
        for group in pass_groups(wave):
            log.info("training %s%s", ", ".join(group), f" in one pass ({len(group)} runs)" if len(group) > 1 else "")
            for result in fit_many(group, store, recipe.checkpoints, loader_config=recipe.loader, log=metrics,
                                   progress=progress, allow_incomplete=allow_incomplete, on_epoch=report,
                                   resume=not restart):
                value = result.eval_metrics.get(result.select_metric)
                search.tell(result.name, value, pruned=result.pruned_at is not None)
                how = (f"pruned after epoch {result.pruned_at}" if result.pruned_at is not None
                       else f"best epoch {result.best_epoch}")
                log.info("%s: %s, %s %s", result.name, how, metric, "-" if value is None else f"{value:.4f}")
                results[result.name] = result
    scored = [r for r in search.records() if r.state == "complete"]
    if scored:
        best = (min if direction == "minimize" else max)(scored, key=lambda r: r.value)
        log.info("[train.%s] best: %s, %s %.4f (%s)", section, best.name, metric, best.value,
                 ", ".join(f"{k}={v}" for k, v in best.params.items()))
    # Trials finished in earlier sessions: their results are read back from their run folders (not trained again).
    for record in search.records():
        if record.name not in results and record.state in ("complete", "pruned"):
            config = apply_params(base, record.params)
            (results[record.name],) = fit_many({record.name: config}, store, recipe.checkpoints,
                                              loader_config=recipe.loader, progress=False,
                                              allow_incomplete=allow_incomplete)
    return sorted(results.values(), key=lambda r: r.name)
