"""A sweep's pass groups trained as tasks on a real dask LocalCluster of processes: the same runs, metrics,
metrics log and checkpoint weights (bit for bit, CPU float32) as train_stage in-process; a store at an s3://
URL (moto's endpoint) with a local run folder; a worker killed mid-sweep, whose pass group resumes elsewhere
from its saved epochs to the same results; bad groups refused before any cluster is reached."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_store_recipe, write_tiny_store
from unipt.extract._distributed import dask_client
from unipt.pipelines import load_recipe, train_stage
from unipt.pipelines import _distributed_train
from unipt.pipelines._distributed_train import train_on_dask
from unipt.train import pass_groups

distributed = pytest.importorskip("dask.distributed")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "store"))  # tests/store: the S3 endpoint helper
from s3_server import moto_s3  # noqa: E402

# 4 runs in 2 pass groups (the batch size splits them); stacking off, so each run steps alone wherever it trains
SWEEP = """
[train.unipt]
epochs = 2
device = "cpu"
data_seed = 0
stack = "off"
sweep = { batch_size = [8, 16], lr = [1e-3, 2e-2] }
"""
TIMED = ("train_examples_per_s", "epoch_seconds")
# the same sweep over more rows and epochs: each pass group trains for a few seconds, so a worker can be killed
# after a run has saved an epoch and well before it finishes
LONG_SWEEP = SWEEP.replace("epochs = 2", "epochs = 6")
LONG_SIZES = (("train", 480), ("validation", 15), ("test", 15))
def train_in_process(recipe):
    """train_stage in this process with the workers' one torch thread: bit-for-bit equality across processes
    holds for equal thread counts (a matmul split over two threads sums in another order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_stage(recipe, progress=False)
    finally:
        torch.set_num_threads(threads)


WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NO_PROXY": "127.0.0.1,localhost",
              "no_proxy": "127.0.0.1,localhost", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  env=WORKER_ENV) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed-train")


@pytest.fixture(scope="module")
def recipe_file(folder) -> Path:
    store = write_tiny_store(str(folder / "store.zarr"))
    return write_store_recipe(folder / "tiny-sweep.toml", store.url, folder / "in-process", SWEEP)


@pytest.fixture(scope="module")
def reference(recipe_file):
    """The sweep trained in-process by train_stage."""
    recipe = load_recipe(str(recipe_file))
    return recipe, train_in_process(recipe)


def untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMED}


def assert_same_runs(got, want) -> None:
    assert [r.name for r in got] == [r.name for r in want]
    for a, b in zip(got, want):
        assert a.eval_metrics == b.eval_metrics and a.test_metrics == b.test_metrics
        assert (a.best_epoch, a.config, a.runs_in_pass, a.trainable_params, a.pruned_at, a.select_metric) == (
            b.best_epoch, b.config, b.runs_in_pass, b.trainable_params, b.pruned_at, b.select_metric)
        assert [untimed(h) for h in a.history] == [untimed(h) for h in b.history]
        ours = load_file(Path(a.checkpoint) / "model.safetensors")
        theirs = load_file(Path(b.checkpoint) / "model.safetensors")
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key].dtype == torch.float32
            assert torch.equal(ours[key], theirs[key]), (a.name, key)


def log_records(path: Path) -> list[str]:
    """The metrics log's records without their timings, in a fixed order (workers append concurrently)."""
    return sorted(json.dumps(untimed(json.loads(line)), sort_keys=True) for line in path.read_text().splitlines())


def test_a_sweep_on_a_local_cluster_equals_train_stage(cluster, reference, recipe_file, folder, monkeypatch):
    expected_recipe, expected = reference
    recipe = load_recipe(str(recipe_file), [f"workdir='{folder / 'dask'}'"])
    groups = pass_groups(recipe.train)
    assert [len(g) for g in groups] == [2, 2]
    # every pass must train on a worker: fit_many in this process would fail the test
    monkeypatch.setattr(_distributed_train, "fit_many", lambda *a, **k: pytest.fail("trained in the client"))

    results = train_on_dask(recipe, list(reversed(groups)), scheduler=cluster.scheduler_address, progress=False)
    assert [r.name for r in results] == list(recipe.train)  # recipe order, whatever the groups' order
    assert_same_runs(results, expected)
    for result in results:  # where train_stage puts checkpoints, as an absolute path
        assert Path(result.checkpoint) == (recipe.checkpoints / result.name).resolve()
        assert json.loads((Path(result.checkpoint) / "config.json").read_text())["test"] == result.test_metrics
    assert log_records(recipe.metrics_log) == log_records(expected_recipe.metrics_log)


def test_a_store_on_s3_with_a_local_run_folder(cluster, reference, folder, tmp_path_factory):
    _, expected = reference
    with pytest.MonkeyPatch.context() as monkeypatch, moto_s3(monkeypatch, tmp_path_factory.mktemp("aws")) as s3:
        url = s3.url("distributed-sweep/store.zarr")  # a key of its own: the endpoint may outlive the module
        write_tiny_store(url)  # the local store's contents (same seed)
        workdir = folder / "s3-run"
        recipe = load_recipe(str(write_store_recipe(folder / "tiny-s3.toml", url, workdir, SWEEP)))
        # The workers started before this endpoint existed, so its address and credentials reach them through
        # storage_options alone.
        options = {"key": s3.access_key, "secret": s3.secret_key,
                   "client_kwargs": {"endpoint_url": s3.endpoint_url, "region_name": "us-east-1"}}
        groups = [list(g) for g in pass_groups(recipe.train)]  # run names only
        results = train_on_dask(recipe, groups, scheduler=cluster.scheduler_address, progress=False,
                                storage_options=options)
    assert_same_runs(results, expected)
    assert all(Path(r.checkpoint).is_relative_to(workdir.resolve()) for r in results)
    written = "".join(p.read_text(errors="replace") for p in workdir.rglob("*") if p.is_file())
    assert url in written  # the checkpoints record the store's URL...
    assert s3.access_key not in written and s3.secret_key not in written  # ...and nothing of the credentials


def saved_epochs(recipe, group: list[str]) -> dict[str, int] | None:
    """The epochs each run of ``group`` has saved (runs yet to save one left out); None once one has finished."""
    saved = {}
    for name in group:
        folder = recipe.checkpoints / name
        if (folder / "result.json").exists():
            return None
        try:  # each save is a whole file (temp + rename)
            saved[name] = json.loads((folder / "train-state.json").read_text())["epochs_done"]
        except FileNotFoundError:
            pass
    return saved


def test_a_worker_killed_mid_sweep_loses_only_its_unfinished_epochs(tmp_path):
    """SIGKILL the worker training a pass group once its runs have saved an epoch: dask re-runs the task (on
    the other worker, or the one the nanny restarts), fit_many resumes each run from its last saved epoch,
    and the sweep ends with the in-process results, weights bit for bit."""
    store = write_tiny_store(str(tmp_path / "store.zarr"), sizes=LONG_SIZES)
    recipe_file = write_store_recipe(tmp_path / "long-sweep.toml", store.url, tmp_path / "in-process", LONG_SWEEP)
    expected_recipe = load_recipe(str(recipe_file))
    expected = train_in_process(expected_recipe)
    recipe = load_recipe(str(recipe_file), [f"workdir='{tmp_path / 'dask'}'"])
    groups = [list(g) for g in pass_groups(recipe.train)]
    assert [len(g) for g in groups] == [2, 2]

    deadline = time.monotonic() + 90
    # its own cluster (one of its workers dies); dashboard off, and its HTTP routes on a free port, as the
    # module's cluster holds the default one
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                       scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}, env=WORKER_ENV)
    pool = ThreadPoolExecutor(1)
    try:
        with distributed.Client(cluster) as client:
            client.wait_for_workers(2, timeout=60)
            pids = client.run(os.getpid)  # worker address -> its process
            assert len(pids) == 2 and os.getpid() not in pids.values()
            sweep = pool.submit(train_on_dask, recipe, groups, scheduler=cluster.scheduler_address, progress=False)
            killed = None
            while killed is None:
                assert not sweep.done(), f"the sweep ended before a worker was killed: {sweep.exception()}"
                assert time.monotonic() < deadline, "no run saved an epoch in time"
                time.sleep(0.02)
                for index, group in enumerate(groups):
                    if not saved_epochs(recipe, group):  # nothing saved yet, or finished
                        continue
                    worker_of = {int(key.rsplit("-", 1)[1]): worker  # task keys end with their group's index
                                 for worker, keys in client.processing().items() for key in keys
                                 if key.startswith("unipt-train-")}
                    if index not in worker_of:
                        continue
                    pid = pids[worker_of[index]]
                    os.kill(pid, signal.SIGSTOP)  # the group's files hold still while they are read
                    try:
                        saved = saved_epochs(recipe, group)
                        if saved:  # still training, with an epoch saved
                            os.kill(pid, signal.SIGKILL)
                            killed = index
                            break
                    finally:
                        if killed is None:  # it finished meanwhile: let it go on
                            os.kill(pid, signal.SIGCONT)
            untouched = [index for index, worker in worker_of.items() if worker != worker_of[killed]]
            results = sweep.result(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        cluster.close(timeout=30)
        pool.shutdown(wait=False, cancel_futures=True)

    assert_same_runs(results, expected)  # the resumed runs end exactly as uninterrupted ones
    records = [json.loads(line) for line in recipe.metrics_log.read_text().splitlines()]
    resumed = sorted((r["run"], r["resumed_after_epoch"]) for r in records if "resumed_after_epoch" in r)
    # each run of the killed group that had saved an epoch went on from it (once), not from epoch 0
    assert [(name, epoch) for name, epoch in resumed if name in groups[killed]] == sorted(saved.items())
    assert min(saved.values()) >= 1
    assert not [name for name, _ in resumed if any(name in groups[index] for index in untouched)]
    # the lost attempt's records stay (an epoch it logged but did not save is logged twice, the same): as a set,
    # the log is the in-process one plus the resume records
    rest = {json.dumps(untimed(r), sort_keys=True) for r in records if "resumed_after_epoch" not in r}
    assert rest == set(log_records(expected_recipe.metrics_log))


def test_bad_groups_are_refused_before_reaching_a_cluster(recipe_file):
    recipe = load_recipe(str(recipe_file))
    names = list(recipe.train)
    nowhere = "tcp://127.0.0.1:9"  # never contacted: every check runs first

    with pytest.raises(ValueError, match=r"no run 'nope' in recipe 'tiny-sweep'; its runs are \["):
        train_on_dask(recipe, [["nope"]], scheduler=nowhere)
    with pytest.raises(ValueError, match=r"run 'unipt@batch_size=8,lr=0.001' is in two pass groups"):
        train_on_dask(recipe, [[names[0]], [names[0], names[1]]], scheduler=nowhere)
    with pytest.raises(ValueError, match=r"cannot train in one pass over the store .*pass_groups"):
        train_on_dask(recipe, [[names[0], names[2]]], scheduler=nowhere)  # batch sizes 8 and 16
    changed = {names[0]: replace(recipe.train[names[0]], lr=0.5)}
    with pytest.raises(ValueError, match=r"is not the one recipe.raw gives .*apply_override"):
        train_on_dask(recipe, [changed], scheduler=nowhere)
    with pytest.raises(ValueError, match=r"an empty pass group"):
        train_on_dask(recipe, [[]], scheduler=nowhere)
    with pytest.raises(ValueError, match=r"workers must be >= 1 for a local cluster, got 0; or give scheduler"):
        with dask_client(0, None):
            pass
