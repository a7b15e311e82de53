"""Part claims: exclusive, kept alive by heartbeats, taken over when stale, fenced at commit time."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from s3_server import moto_s3
from unipt.store import FeatureStore
from unipt.store._claims import ClaimLost, Owner

LAYERS, WIDTHS = [0, 1], [4, 4]


def make_store(url: str, **options) -> FeatureStore:
    return FeatureStore.create(url, layers=LAYERS, layer_widths=WIDTHS, dtype="float32", label_names=["a", "b"],
                               provenance={"backbone": {"location": "none"}}, storage_options=options or None)


def claim_document(store: FeatureStore, split: str, part: str) -> dict:
    return json.loads((store_path(store) / "_claims" / split / f"{part}.json").read_text())


def store_path(store: FeatureStore):
    from pathlib import Path

    return Path(store.url)


def forge_claim(store: FeatureStore, split: str, part: str, owner: Owner, heartbeat: float) -> None:
    """Write the claim document another run would have left (e.g. one that died)."""
    path = store_path(store) / "_claims" / split / f"{part}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"owner": owner.__dict__, "token": "theirs", "claimed": heartbeat, "heartbeat": heartbeat}
    path.write_text(json.dumps(document))


def test_a_claim_is_exclusive_between_runs_and_shared_within_one(tmp_path):
    store = make_store(str(tmp_path / "s.zarr"))
    with store.claims("run-a", ttl=60) as a, store.claims("run-b", ttl=60) as b, \
            store.claims("run-a", ttl=60) as a_retry:
        assert a.acquire("train", "part-000000")
        assert not b.acquire("train", "part-000000"), "another live run's claim must be respected"
        assert b.acquire("train", "part-000001")
        # A retried task of run A (e.g. on another dask worker) takes run A's claim over at once.
        assert a_retry.acquire("train", "part-000000")
        with pytest.raises(ClaimLost, match="part-000000"):
            a.check("train", "part-000000")  # the first attempt is fenced off: it must not commit
        a_retry.check("train", "part-000000")
        listed = {(split, part): doc["owner"]["run"] for split, part, doc in store.active_claims()}
        assert listed == {("train", "part-000000"): "run-a", ("train", "part-000001"): "run-b"}
    assert store.active_claims() == [], "closing releases every claim still held"


def test_heartbeats_keep_a_claim_fresh_and_release_deletes_it(tmp_path):
    store = make_store(str(tmp_path / "s.zarr"))
    with store.claims("run-a", ttl=0.4) as a, store.claims("run-b", ttl=0.4) as b:
        assert a.acquire("train", "part-000000")
        first = claim_document(store, "train", "part-000000")["heartbeat"]
        time.sleep(1.0)  # 2.5 ttl: without heartbeats it would be stale
        document = claim_document(store, "train", "part-000000")
        assert document["heartbeat"] > first
        assert not b.is_stale(document)
        assert not b.acquire("train", "part-000000")
        a.release("train", "part-000000")
        assert store.active_claims() == []
        assert b.acquire("train", "part-000000")


def test_a_claim_without_heartbeats_expires(tmp_path):
    store = make_store(str(tmp_path / "s.zarr"))
    elsewhere = Owner("run-dead", "another-host", 1234, 0.0)
    forge_claim(store, "train", "part-000003", elsewhere, heartbeat=time.time())
    with store.claims("run-b", ttl=30) as b:
        assert not b.acquire("train", "part-000003"), "a fresh claim from another host is live"
    forge_claim(store, "train", "part-000003", elsewhere, heartbeat=time.time() - 31)
    with store.claims("run-b", ttl=30) as b:
        assert b.acquire("train", "part-000003"), "no heartbeat for longer than the ttl: stale, taken over"
        assert claim_document(store, "train", "part-000003")["owner"]["run"] == "run-b"


def test_a_claim_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    store = make_store(str(tmp_path / "s.zarr"))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = Owner("run-killed", Owner.current("x").host, child.pid, psutil.Process(child.pid).create_time())
        forge_claim(store, "train", "part-000000", owner, heartbeat=time.time())
        with store.claims("run-b", ttl=600) as b:
            assert not b.acquire("train", "part-000000"), "its process still runs: the claim is live"
            child.kill()
            child.wait()
            assert b.acquire("train", "part-000000"), "a killed run's claim must not make resume wait the ttl"
        # The same pid number reused by a later process is not the claim's owner.
        forge_claim(store, "train", "part-000001", Owner("run-old", owner.host, child.pid, 12.0), time.time())
        with store.claims("run-c", ttl=600) as c:
            assert c.acquire("train", "part-000001")
    finally:
        child.kill()


def test_a_lost_claim_leaves_the_part_uncommitted(tmp_path):
    store = make_store(str(tmp_path / "s.zarr"), )
    with store.claims("run-a", ttl=60) as a, store.claims("run-a", ttl=60) as a_retry:
        assert a.acquire("train", "part-000000")
        writer = store.part_writer("train", 0, n_examples=2, n_tokens=3, source_start=0)
        writer.append({0: np.ones((3, 4), np.float32), 1: np.ones((3, 4), np.float32)})
        assert a_retry.acquire("train", "part-000000")
        with pytest.raises(ClaimLost):
            writer.finish(["x", "y"], [0, 1], [1, 2], before_commit=lambda: a.check("train", "part-000000"))
    assert store.committed("train") == set(), "a writer that lost its claim must not commit"


def test_claims_are_exclusive_on_s3(tmp_path_factory):
    """On S3 the claim is a conditional put (If-None-Match: *): exactly one of many racing runs wins."""
    with pytest.MonkeyPatch.context() as monkeypatch, moto_s3(monkeypatch, tmp_path_factory.mktemp("aws")) as s3:
        store = make_store(s3.url("claims.zarr"))
        books = [store.claims(f"run-{i}", ttl=60) for i in range(4)]
        try:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(4) as pool:
                won = list(pool.map(lambda book: book.acquire("train", "part-000000"), books))
            assert sum(won) == 1, f"exactly one run may hold the claim, got {won}"
            winner = books[won.index(True)]
            assert [doc["owner"]["run"] for _, _, doc in store.active_claims()] == [winner.owner.run]
        finally:
            for book in books:
                book.close()
        assert store.active_claims() == []
