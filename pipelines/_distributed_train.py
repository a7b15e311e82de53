"""Pass groups as dask tasks: a recipe's runs trained on a local cluster of processes or any dask cluster.

A pass group (runs that share their batches; unipt.train.pass_groups) is the unit of work: one task trains it
with :func:`unipt.train.fit_many` on one worker, exactly as train_stage trains it in-process, so every run ends
with the same numbers and, on CPU, the same weights bit for bit. A task carries builders, not live objects:
the recipe's resolved document (``recipe.raw``), the group's run names, the store's URL and where outputs go.
The worker rebuilds the runs from the document and opens the store itself.

Checkpoints and the metrics log go where train_stage puts them (``recipe.checkpoints``, ``recipe.metrics_log``,
made absolute here), so a local run folder must be the same path on every worker (one machine, or a shared
filesystem); the store may be any URL every worker reads (``s3://...``: credentials from each worker's AWS
environment, or ``storage_options``, which are sent to the workers and written nowhere). Workers append to the
one metrics log, a line per record.

A task that raises is retried (``retries``) and one whose worker dies is re-run on another worker (dask's
``distributed.scheduler.allowed-failures``): fit_many is simply called again, and resumes the group's runs
from what they saved. Records the lost attempt logged stay in the metrics log.

One run per GPU: a local cluster's workers share this machine's devices. For one worker per GPU, start
dask-cuda's cluster (``LocalCUDACluster()`` in Python, or ``dask cuda worker <scheduler> --nthreads 1``): it
gives each worker one GPU of its own (``CUDA_VISIBLE_DEVICES``), and pass its scheduler's address; runs with
``device = "auto"`` (or ``"cuda"``) then train on their worker's GPU, one pass group per GPU at a time.
"""

from __future__ import annotations

import dataclasses

import logging
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from tqdm.auto import tqdm

from unipt.extract._distributed import dask_client
from unipt.store import FeatureStore
from unipt.train import MetricsLog, RunResult, TrainConfig, fit_many, pass_groups

from ._recipe import Recipe, build_recipe
from ._stages import with_recipe_backbone

log = logging.getLogger("unipt")


def train_on_dask(recipe: Recipe, groups: Sequence[Mapping[str, TrainConfig]] | Sequence[Sequence[str]], *,
                  workers: int = 0, scheduler: str | None = None, retries: int = 2, progress: bool = True,
                  allow_incomplete: bool = False, storage_options: dict | None = None, resume: bool = True,
                  stack: str | None = None) -> list[RunResult]:
    """Train ``groups`` (pass groups: each a list of run names of ``recipe``, or name -> config as
    :func:`unipt.train.pass_groups` gives them) on ``scheduler`` (an existing cluster's address) or a new local
    cluster of ``workers`` processes, one task per group; results in recipe order.

    ``resume`` and ``stack`` are :func:`unipt.train.fit_many`'s and the runs' ``stack`` override. The caller
    checks the store against the recipe's backbone (train_stage does) and saves the resolved recipe.
    """
    from dask.distributed import as_completed

    names = _check_groups(recipe, groups)
    job = {"document": recipe.raw, "store_url": _absolute(recipe.store),
           "checkpoints": _absolute(str(recipe.checkpoints)), "metrics_log": _absolute(str(recipe.metrics_log)),
           "storage_options": storage_options, "allow_incomplete": allow_incomplete, "resume": resume,
           "stack": stack}
    results: dict[str, RunResult] = {}
    with dask_client(workers, scheduler) as client:
        batch = uuid.uuid4().hex[:8]  # unique keys: a second sweep on the same cluster never reuses a result
        futures = {client.submit(train_group_task, group, **job, retries=retries, pure=False,
                                 key=f"unipt-train-{batch}-{index}"): group for index, group in enumerate(names)}
        n_workers = len(client.scheduler_info()["workers"])
        with tqdm(total=sum(map(len, names)), unit="run", disable=not progress, dynamic_ncols=True,
                  desc=f"train {len(names)} passes ({n_workers} workers)") as bar:
            for future in as_completed(futures):
                try:
                    done = future.result()  # re-raises a task's error once its retries are spent
                except Exception as exc:
                    exc.add_note(f"while training {futures[future]} on the dask cluster")
                    raise
                for record in done:
                    result = RunResult(**record)
                    results[result.name] = result
                    log.info("%s: best epoch %d, eval %s %s", result.name, result.best_epoch, result.select_metric,
                             _fmt(result.eval_metrics.get(result.select_metric)))
                bar.update(len(done))
    return [results[name] for name in recipe.train if name in results]


def train_group_task(names: list[str], *, document: dict[str, Any], store_url: str, checkpoints: str,
                     metrics_log: str, storage_options: dict | None, allow_incomplete: bool, resume: bool = True,
                     stack: str | None = None) -> list[dict[str, Any]]:
    """One pass group on whichever worker runs it: the runs rebuilt from the recipe's document, trained with
    fit_many from the store at ``store_url`` (resuming what an earlier attempt saved, e.g. on a worker that
    died); their RunResults as plain dicts."""
    recipe = build_recipe(document)
    # the backbone folder a method may read (SHERL) resolved here, on the worker's own machine
    runs = {name: with_recipe_backbone(recipe.train[name] if stack is None
                                       else dataclasses.replace(recipe.train[name], stack=stack), recipe)
            for name in names}
    store = FeatureStore.open(store_url, storage_options=storage_options)
    results = fit_many(runs, store, checkpoints, loader_config=recipe.loader, log=MetricsLog(metrics_log),
                       progress=False, allow_incomplete=allow_incomplete, resume=resume)
    return [asdict(result) for result in results]


def _check_groups(recipe: Recipe,
                  groups: Sequence[Mapping[str, TrainConfig]] | Sequence[Sequence[str]]) -> list[list[str]]:
    """The groups' run names, once each refused if a worker could not rebuild them from ``recipe.raw`` as the
    client holds them (an unknown run, a config changed after the recipe was built, a run in two groups, a group
    that cannot share one pass)."""
    if not isinstance(recipe, Recipe):
        raise TypeError(f"train_on_dask trains a single-store Recipe, got {type(recipe).__name__}")
    if not recipe.raw:
        raise ValueError(f"recipe {recipe.name!r} has no resolved document (recipe.raw), which workers rebuild its "
                         f"runs from: make it with load_recipe or build_recipe")
    rebuilt = build_recipe(recipe.raw)
    if rebuilt.loader != recipe.loader:
        raise ValueError(f"recipe {recipe.name!r}: its loader config {recipe.loader} is not the one recipe.raw "
                         f"gives ({rebuilt.loader}); workers rebuild it from recipe.raw, so change the document "
                         f"(apply_override) rather than the built recipe")
    names: list[list[str]] = []
    seen: set[str] = set()
    for group in groups:
        group_names = [group] if isinstance(group, str) else list(group)  # a bare name would iterate as letters
        if not group_names:
            raise ValueError("an empty pass group: each group needs at least one run")
        for name in group_names:
            if name not in recipe.train:
                raise ValueError(f"no run {name!r} in recipe {recipe.name!r}; its runs are {sorted(recipe.train)}")
            if name in seen:
                raise ValueError(f"run {name!r} is in two pass groups; give each run once")
            seen.add(name)
            given = group[name] if isinstance(group, Mapping) else recipe.train[name]
            if given != recipe.train[name] or rebuilt.train.get(name) != recipe.train[name]:
                raise ValueError(f"run {name!r}: its config {given} is not the one recipe.raw gives "
                                 f"({rebuilt.train.get(name)}); workers rebuild runs from recipe.raw, so change the "
                                 f"document (apply_override) rather than the configs")
        if len(pass_groups({name: recipe.train[name] for name in group_names})) > 1:
            raise ValueError(f"runs {group_names} cannot train in one pass over the store (they differ in one of "
                             f"unipt.train.PASS_FIELDS); split them with unipt.train.pass_groups")
        names.append(group_names)
    return names


def _absolute(url: str) -> str:
    """A local path made absolute (workers may run in another folder); URLs unchanged."""
    return url if "://" in url else str(Path(url).resolve())


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
