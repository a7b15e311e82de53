"""Parts as dask tasks: the same extraction spread over a local cluster or any dask cluster.

Each task carries builders, not live objects: the backbone's config, the store's URL and the part's
examples. A worker loads the backbone on its first task and keeps it for every later one (a process-wide
cache keyed by the backbone config). Tasks are idempotent: a part already committed (by an earlier run, a
retried task or a concurrent run) is skipped, and an uncommitted one is rewritten from scratch, so dask's
retries never write a part twice. Every task claims its part under the run's id: a retry of the same run
takes its own claim over at once, while a part claimed by another run is handed back as deferred and
submitted again once that run has committed it or died.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, fields
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from tqdm.auto import tqdm

from unipt.store import FeatureStore
from unipt.store._claims import new_run_id

from ._runner import (BackgroundWriter, Encoder, ExtractSummary, PartTask, build_encoder, extract_claimed_part,
                      wait_for_other_runs)
from .config import BackboneConfig

if TYPE_CHECKING:
    from dask.distributed import Client

_ENCODERS: dict[str, Encoder] = {}
_LOADS: dict[str, int] = {}  # how often this process loaded each backbone (tests check: once per worker)


def worker_encoder(config: BackboneConfig, vision: dict | None = None) -> Encoder:
    """This process's encoder for ``config``: loaded on first use, then reused by every task.

    ``vision``: None for a text backbone; for an image backbone, the VisionEncoder options (bad_input, max_grid).
    """
    key = json.dumps([asdict(config), vision], sort_keys=True)
    if key not in _ENCODERS:
        _ENCODERS[key] = build_encoder(config, vision)
        _LOADS[key] = _LOADS.get(key, 0) + 1
    return _ENCODERS[key]


def extract_part_task(backbone: BackboneConfig, store_url: str, task: PartTask, batch_size: int,
                      writer_queue: int, run_id: str, claim_ttl: float,
                      storage_options: dict | None = None, vision: dict | None = None) -> dict[str, Any]:
    """One part on whichever worker runs it; returns that part's counts and timings (``deferred``: another
    run holds the part's claim, nothing was done)."""
    store = FeatureStore.open(store_url, mode="r+", storage_options=storage_options)
    summary = ExtractSummary(store=store_url)
    started = time.perf_counter()
    deferred = False
    if store.is_committed(task.split, task.name):
        summary.parts_skipped = 1  # a retry or a concurrent run finished it first
    else:
        encoder = worker_encoder(backbone, vision)
        with store.claims(run_id, claim_ttl) as claims:
            writer = BackgroundWriter(writer_queue)
            try:
                deferred = not extract_claimed_part(encoder, store, claims, task, batch_size, writer, summary)
            finally:
                writer.close()
        summary.write_seconds = writer.busy_seconds
    summary.seconds = time.perf_counter() - started
    return {**asdict(summary), "deferred": deferred, "pid": os.getpid(), "loads": dict(_LOADS)}


def run_on_dask(tasks: Iterable[PartTask], backbone: BackboneConfig, store_url: str, *, batch_size: int,
                writer_queue: int, vision: dict | None = None, workers: int = 0, scheduler: str | None = None,
                retries: int = 2, run_id: str | None = None, claim_ttl: float = 120.0,
                storage_options: dict | None = None, progress: bool = True,
                total: int | None = None) -> tuple[ExtractSummary, list[dict]]:
    """Run ``tasks`` on ``scheduler`` (an existing cluster) or a new local cluster of ``workers`` processes.

    ``tasks`` may be a lazy stream (a streamed source's parts, piece by piece): at most a few tasks per
    worker are in flight, so the parts' examples never all sit in this process's memory. ``total``: the
    forward passes to run, for the progress bar (default: counted from ``tasks``, which are then listed).
    """
    from dask.distributed import as_completed

    run_id = run_id or new_run_id()
    store = FeatureStore.open(store_url, mode="r+", storage_options=storage_options)
    summary = ExtractSummary(store=store_url)
    results: list[dict] = []
    if total is None:
        tasks = list(tasks)
        total = sum(t.n_examples * store.views(t.split) for t in tasks)
    with dask_client(workers, scheduler) as client:
        n_workers = len(client.scheduler_info()["workers"])
        window = max(2, 2 * n_workers)  # enough queued to keep every worker busy, few enough to stay small

        def submit(task: PartTask):
            return client.submit(extract_part_task, backbone, store_url, task, batch_size, writer_queue, run_id,
                                 claim_ttl, storage_options, vision, retries=retries, pure=False,
                                 key=f"unipt-extract-{task.split}-{task.index}-{time.time_ns()}")

        # Forward passes, as in a sequential run: a part of a split with K stochastic views counts K times.
        with tqdm(total=total, unit="ex", disable=not progress, dynamic_ncols=True,
                  desc=f"extract ({n_workers} workers)") as bar, store.claims(run_id, claim_ttl) as claims:
            pending: Iterator[PartTask] = iter(tasks)
            while True:
                futures = {submit(task): task for task in itertools.islice(pending, window)}
                running = as_completed(list(futures))
                deferred = []
                for future in running:
                    task = futures.pop(future)
                    for more in itertools.islice(pending, 1):  # keep the window full
                        new = submit(more)
                        futures[new] = more
                        running.add(new)
                    result = future.result()  # re-raises a task's error once its retries are spent
                    if result["deferred"]:
                        deferred.append(task)
                        continue
                    results.append(result)
                    _merge(summary, result)
                    bar.update(task.n_examples * store.views(task.split))
                # Parts another run holds: wait for it to commit them (counted there) or to die (redo them).
                pending = iter(wait_for_other_runs(store, claims, deferred, summary, bar))
                if not deferred:
                    break
    return summary, results


@contextmanager
def dask_client(workers: int = 0, scheduler: str | None = None) -> Iterator[Client]:
    """A dask client of ``scheduler`` (an existing cluster's address, tcp://host:8786), or of a new local cluster
    of ``workers`` processes that is shut down on exit.

    The local cluster runs one thread per worker process and tells torch to use its share of the cores
    (``OMP_NUM_THREADS`` = cores // workers), so N workers do not oversubscribe the machine N times over; no
    dashboard. Its workers share this machine's devices: for one worker per GPU, start dask-cuda's cluster
    (``LocalCUDACluster``, or ``dask cuda worker``) and pass its scheduler's address.
    """
    from dask.distributed import Client, LocalCluster

    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    if workers < 1:
        raise ValueError(f"workers must be >= 1 for a local cluster, got {workers}; or give scheduler, the "
                         f"address of a running one")
    threads = max(1, (os.cpu_count() or 1) // workers)
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)},
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def _merge(total: ExtractSummary, part: dict[str, Any]) -> None:
    for f in fields(ExtractSummary):
        value = part[f.name]
        if isinstance(value, list):
            getattr(total, f.name).extend(value)
        elif isinstance(value, dict):
            target = getattr(total, f.name)
            for k, v in value.items():
                target[k] = target.get(k, 0) + v
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and f.name != "seconds":
            setattr(total, f.name, getattr(total, f.name) + value)
