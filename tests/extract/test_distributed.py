"""Distributed extraction on a real dask LocalCluster of processes: same store as a sequential run, the
backbone loaded once per worker, an existing scheduler address works, and a worker killed mid-run is
survived."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from unipt.extract import BackboneConfig, ExtractConfig, SourceConfig, load_source, plan_parts, run_extraction
from unipt.extract._distributed import run_on_dask
from unipt.store import FeatureStore, verify

distributed = pytest.importorskip("dask.distributed")


def assert_same_store(a: FeatureStore, b: FeatureStore) -> None:
    assert a.splits() == b.splits()
    for split in a.splits():
        assert [p.name for p in a.parts(split)] == [p.name for p in b.parts(split)]
        for pa, pb in zip(a.parts(split), b.parts(split)):
            x, y = a.read_part(pa), b.read_part(pb)
            assert list(x.example_id) == list(y.example_id)
            assert np.array_equal(x.label, y.label) and np.array_equal(x.offsets, y.offsets)
            for layer in a.layers:
                assert torch.equal(x.layers[layer], y.layers[layer])


@pytest.fixture(scope="module")
def setup(tiny_bert_dir, tmp_path_factory):
    from conftest import make_text_csv

    folder = tmp_path_factory.mktemp("distributed")
    source = SourceConfig(path=str(make_text_csv(folder / "texts.csv", n=160)))
    backbone = BackboneConfig(model=str(tiny_bert_dir))
    reference = str(folder / "sequential.zarr")
    run_extraction(source, backbone, ExtractConfig(part_size=16, batch_size=4), reference, progress=False)
    return folder, source, backbone, FeatureStore.open(reference)


def test_local_cluster_of_processes_writes_the_same_store(setup):
    folder, source, backbone, reference = setup
    url = str(folder / "two-workers.zarr")
    summary = run_extraction(source, backbone, ExtractConfig(part_size=16, batch_size=4, workers=2), url,
                             progress=False)
    assert sum(summary.examples.values()) == 160 and summary.parts_written == sum(
        len(reference.parts(s)) for s in reference.splits())
    assert_same_store(FeatureStore.open(url), reference)
    assert verify(FeatureStore.open(url)).ok
    # a second distributed run finds every part committed and writes nothing
    again = run_extraction(source, backbone, ExtractConfig(part_size=16, batch_size=4, workers=2), url, progress=False)
    assert again.parts_written == 0 and again.parts_skipped == summary.parts_written


def test_existing_scheduler_and_one_backbone_load_per_worker(setup):
    folder, source, backbone, reference = setup
    url = str(folder / "scheduler.zarr")
    # Create the store (and its provenance) with a sequential run of one split, then let the cluster do the rest.
    run_extraction(source, backbone, ExtractConfig(part_size=16, batch_size=4, splits=["validation"]), url,
                   progress=False)
    tasks = plan_parts("train", load_source(source).splits["train"], 16)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        summary, results = run_on_dask(tasks, backbone, url, batch_size=4, writer_queue=4,
                                       scheduler=cluster.scheduler_address, progress=False)
    assert summary.parts_written == len(tasks) > 2
    pids = {r["pid"] for r in results}
    assert 1 <= len(pids) <= 2
    for pid in pids:  # every worker process loaded the backbone exactly once, however many parts it ran
        loads = [r["loads"] for r in results if r["pid"] == pid][-1]
        assert list(loads.values()) == [1]
    got = FeatureStore.open(url)
    assert [p.name for p in got.parts("train")] == [p.name for p in reference.parts("train")]
    for pa, pb in zip(got.parts("train"), reference.parts("train")):
        assert torch.equal(got.read_part(pa).layers[0], reference.read_part(pb).layers[0])


def test_a_worker_killed_mid_run_is_survived(setup):
    folder, source, backbone, reference = setup
    url = str(folder / "killed.zarr")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        outcome: dict = {}

        def extract() -> None:
            try:
                outcome["summary"] = run_extraction(
                    source, backbone, ExtractConfig(part_size=8, batch_size=2, scheduler=cluster.scheduler_address,
                                                    retries=3), url, progress=False)
            except BaseException as exc:  # surfaced by the assertion below
                outcome["error"] = exc

        thread = threading.Thread(target=extract)
        thread.start()
        with distributed.Client(cluster.scheduler_address) as client:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (os.path.exists(url) and _committed_parts(url)):
                time.sleep(0.05)
            victim = next(iter(client.run(os.getpid).values()))
            os.kill(victim, signal.SIGKILL)  # the nanny restarts it; its running part is re-run elsewhere
        thread.join(timeout=120)
        assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert_same_store(FeatureStore.open(url), FeatureStore.open(_reference_small(folder, source, backbone)))
    assert verify(FeatureStore.open(url)).ok


def _committed_parts(url: str) -> int:
    try:
        store = FeatureStore.open(url)
    except Exception:
        return 0
    return sum(len(store.parts(s)) for s in store.splits())


def _reference_small(folder, source, backbone) -> str:
    url = str(folder / "sequential-small.zarr")
    run_extraction(source, backbone, ExtractConfig(part_size=8, batch_size=2), url, progress=False)
    return url


def test_image_extraction_on_a_local_cluster_equals_a_sequential_run(tiny_resnet_dir, image_folder, tmp_path):
    """Image parts as dask tasks: each worker builds its own vision encoder (processor threads included);
    the maps store equals the in-process one (same batch sizes, so bitwise)."""
    from unipt.extract import ImageSourceConfig

    source = ImageSourceConfig(path=str(image_folder))
    backbone = BackboneConfig(model=str(tiny_resnet_dir), device="cpu")
    config = dict(part_size=8, batch_size=4, layers="stages", max_grid=8)
    run_extraction(source, backbone, ExtractConfig(**config), str(tmp_path / "seq.zarr"), progress=False)
    summary = run_extraction(source, backbone, ExtractConfig(**config, workers=2), str(tmp_path / "dask.zarr"),
                             progress=False)
    assert sum(summary.examples.values()) == 36
    store = FeatureStore.open(str(tmp_path / "dask.zarr"))
    assert store.layout == "maps"
    assert_same_store(store, FeatureStore.open(str(tmp_path / "seq.zarr")))
