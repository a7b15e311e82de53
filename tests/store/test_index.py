"""The split index: equal to the listing, O(1) requests to open a split, safe under kills and races."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

from s3_server import moto_s3
from test_store import create, random_part, write_part
from unipt.pipelines.cli import main
from unipt.store import CorruptChunkError, FeatureStore, PartInfo, StoreError, compact_index, remove_part, verify
from unipt.store import _index
from unipt.store._index import read_index

LENGTHS = [2, 1, 3]  # every part: three examples of 6 tokens


class Killed(BaseException):
    """The process stopped here (not an error any code path catches)."""


def make(url, planned: int, written=(), compacted=()) -> FeatureStore:
    """A store whose plan has ``planned`` train parts: ``compacted`` written and compacted, then ``written``."""
    store = create(url, plan={"train": {"examples": 3 * planned, "parts": planned}})
    for indexes in (compacted, written):
        for i in indexes:
            add(store, i)
        if indexes is compacted and compacted:
            compact_index(store, "train")
    return store


def add(store: FeatureStore, index: int) -> None:
    rng = np.random.default_rng(index)
    write_part(store, "train", index, LENGTHS, random_part(rng, LENGTHS), source_start=3 * index)


def truth(url) -> list:
    """The committed parts, by listing the part folders (what the index must agree with)."""
    return [f.info for f in FeatureStore.open(str(url)).part_folders("train") if f.state == "committed"]


def seen(url) -> list:
    return FeatureStore.open(str(url)).parts("train")


def from_index(url) -> bool:
    store = FeatureStore.open(str(url))
    store.parts("train")
    return store._views["train"].from_index


def indexed(store: FeatureStore) -> list[str]:
    state = read_index(store._root.store, store._root.path, "train")
    return [] if state is None else list(state.entries())


def journal(url) -> list[str]:
    folder = Path(url) / "_index" / "train" / "journal"
    return sorted(p.name for p in folder.glob("*.json")) if folder.exists() else []


def kill_at(monkeypatch, store: FeatureStore, k: int) -> dict:
    """Make the k-th write or delete through ``store``'s Zarr store (from now on) stop the process."""
    zstore, calls = store._root.store, {"n": 0}
    for method in ("set", "set_if_not_exists", "delete", "delete_dir"):
        original = getattr(zstore, method)

        async def step(*args, _original=original, **kwargs):
            calls["n"] += 1
            if calls["n"] == k:
                raise Killed(f"killed at step {k}")
            return await _original(*args, **kwargs)

        monkeypatch.setattr(zstore, method, step)
    return calls


def each_kill(monkeypatch, build, action, check, most: int = 60) -> int:
    """For k = 1, 2, ...: a fresh store from ``build(k)``, ``action`` killed at its k-th write or delete, then
    ``check(url)``; stops once ``action`` runs to the end. Returns how many steps it took."""
    for k in range(1, most):
        url, store = build(k)
        with monkeypatch.context() as patch:
            calls = kill_at(patch, store, k)
            try:
                action(store)
                finished = True
            except Killed:
                finished = False
        check(url)
        if finished:
            assert calls["n"] == k - 1
            return k - 1
    raise AssertionError(f"{action} did not finish within {most} steps")


# ----------------------------------------------------------------------------- index == listing
def test_index_equals_the_listing_after_writes_and_compaction(tmp_path):
    url = tmp_path / "s.zarr"
    store = make(url, 5, written=range(5))
    assert journal(url) == [f"part-00000{i}.json" for i in range(5)]
    assert seen(url) == truth(url) and len(truth(url)) == 5 and from_index(url)
    result = compact_index(store, "train")
    assert (result.generation, result.parts, result.merged, result.missing) == (1, 5, 5, [])
    assert journal(url) == [] and sorted(p.name for p in (url / "_index" / "train").glob("base-*")) == [
        "base-00000001.json.zst"]
    assert seen(url) == truth(url) and from_index(url)
    expected = _index.parts_digest((f.name, f.record_sha256) for f in FeatureStore.open(str(url)).part_folders("train"))
    assert FeatureStore.open(str(url)).parts_digest("train") == expected
    assert compact_index(store, "train").generation == 1, "nothing new: no new generation"
    assert verify(FeatureStore.open(str(url))).ok


def test_an_incomplete_index_is_not_used(tmp_path):
    url = tmp_path / "s.zarr"
    store = make(url, 4, written=range(3))
    assert seen(url) == truth(url) and not from_index(url), "a part still to come: list the split"
    result = compact_index(store, "train")
    assert result.missing == ["part-000003"]
    status = FeatureStore.open(str(url)).split_status("train")
    assert (status.committed_parts, status.complete) == (3, False)
    add(store, 3)
    assert seen(url) == truth(url) and from_index(url)
    assert FeatureStore.open(str(url)).split_status("train").complete


def test_a_read_only_reader_keeps_its_first_list_and_a_writer_rereads(tmp_path):
    url = tmp_path / "s.zarr"
    store = make(url, 3, written=range(2))
    reader, writer = FeatureStore.open(str(url)), FeatureStore.open(str(url), mode="r+")
    first, digest = reader.parts("train"), reader.parts_digest("train")
    assert len(writer.parts("train")) == 2
    add(store, 2)
    assert reader.parts("train") == first and reader.parts_digest("train") == digest
    assert len(writer.parts("train")) == 3 and FeatureStore.open(str(url)).parts_digest("train") != digest


def test_index_equals_the_listing_on_s3(tmp_path):
    with pytest.MonkeyPatch.context() as monkeypatch, \
            moto_s3(monkeypatch, tmp_path, bucket=f"unipt-index-{uuid.uuid4().hex[:8]}") as s3:
        url = s3.url("indexed.zarr")
        store = make(url, 3, written=range(3))
        assert seen(url) == truth(url) and len(truth(url)) == 3 and from_index(url)
        assert compact_index(store, "train").generation == 1
        keys = sorted(k.split("/_index/")[-1] for k in s3.filesystem().find(f"{s3.bucket}/indexed.zarr/_index"))
        assert keys == ["train/base-00000001.json.zst"]
        assert seen(url) == truth(url) and from_index(url)
        remove_part(FeatureStore.open(url, mode="r+"), "train", "part-000001")
        assert seen(url) == truth(url) and len(truth(url)) == 2 and not from_index(url)


# ----------------------------------------------------------------------------- O(1) requests
READS = ("get", "get_partial_values", "exists", "list", "list_prefix", "list_dir")


def requests_to_open(monkeypatch, url) -> int:
    calls = {"n": 0}
    for method in READS:
        original = getattr(zarr.storage.LocalStore, method)
        if method.startswith("list"):
            def counted(self, *args, _original=original, **kwargs):
                calls["n"] += 1
                return _original(self, *args, **kwargs)
        else:
            async def counted(self, *args, _original=original, **kwargs):
                calls["n"] += 1
                return await _original(self, *args, **kwargs)
        monkeypatch.setattr(zarr.storage.LocalStore, method, counted)
    try:
        parts = FeatureStore.open(str(url)).parts("train")
    finally:
        monkeypatch.undo()
    assert parts == truth(url)
    return calls["n"]


def copies(url: Path, n: int) -> FeatureStore:
    """A store of ``n`` committed parts made fast: part 0 written, its folder copied to the other names (a
    commit record does not name its part), each entered in the index journal as its writer would."""
    store = make(url, n, written=[0])
    commit = store._root["train"]["part-000000"].attrs.asdict()["unipt_commit"]
    for i in range(1, n):
        shutil.copytree(url / "train" / "part-000000", url / "train" / f"part-{i:06d}")
        info = PartInfo("train", f"part-{i:06d}", 3, 6, 0, 3)
        _index.write_journal_entry(store._root.store, "", "train", _index.entry_of(info, commit))
    return store


def test_opening_an_indexed_split_reads_the_same_objects_for_10_or_200_parts(tmp_path, monkeypatch):
    counts, listed = {}, {}
    for n in (10, 200):
        url = tmp_path / f"s{n}.zarr"
        compact_index(copies(url, n), "train")
        counts[n] = requests_to_open(monkeypatch, url)
        shutil.rmtree(url / "_index")
        listed[n] = requests_to_open(monkeypatch, url)
    assert counts[10] == counts[200] <= 4, counts  # the root document, one listing, the base
    assert listed[200] > listed[10] + 150, listed  # the listing reads every part's metadata


# ----------------------------------------------------------------------------- kills
def test_a_kill_at_any_step_of_a_compaction_neither_hides_nor_invents_a_part(tmp_path, monkeypatch):
    def build(k):
        url = tmp_path / f"c{k}.zarr"
        return url, make(url, 4, compacted=range(2), written=range(2, 4))

    def check(url):
        assert seen(url) == truth(url) and len(truth(url)) == 4
        store = FeatureStore.open(str(url), mode="r+")
        compact_index(store, "train")  # a later compaction repairs it
        assert indexed(store) == [p.name for p in truth(url)] and journal(url) == [] and from_index(url)

    # the new base, the two journal entries it merged, the old base
    assert each_kill(monkeypatch, build, lambda store: compact_index(store, "train"), check) == 4


def test_a_kill_between_a_commit_and_its_journal_entry_falls_back_to_the_listing(tmp_path, monkeypatch):
    def build(k):
        url = tmp_path / f"j{k}.zarr"
        return url, make(url, 2, compacted=[0])

    def check(url):
        assert seen(url) == truth(url)
        assert main(["store", "index", str(url), "-q"]) == 0  # rebuilding from the parts repairs it
        store = FeatureStore.open(str(url))
        assert indexed(store) == [p.name for p in truth(url)] and journal(url) == []
        assert from_index(url) == (len(truth(url)) == 2) and seen(url) == truth(url)

    steps = each_kill(monkeypatch, build, lambda store: add(store, 1), check)
    assert steps > 5  # every array, the columns, the commit marker, then the journal entry


@pytest.mark.parametrize("part", ["part-000001", "part-000003"])  # in the base / only in the journal
def test_a_kill_at_any_step_of_rm_part_neither_hides_nor_invents_a_part(tmp_path, monkeypatch, part):
    def build(k):
        url = tmp_path / f"r{k}.zarr"
        return url, make(url, 4, compacted=range(3), written=[3])

    def check(url):
        assert seen(url) == truth(url)
        store = FeatureStore.open(str(url), mode="r+")
        if part in {p.name for p in truth(url)}:
            remove_part(store, "train", part)  # running it again finishes the job
        assert [p.name for p in truth(url)] == [f"part-00000{i}" for i in range(4) if f"part-00000{i}" != part]
        assert indexed(store) == [p.name for p in truth(url)] and seen(url) == truth(url)
        assert journal(url) == []  # the new base folds the journal in

    steps = each_kill(monkeypatch, build, lambda store: remove_part(store, "train", part), check)
    # its journal entry, the new base, the other journal entry it folded in (if any), the old base, its folder
    assert steps == {"part-000001": 5, "part-000003": 4}[part]


# ----------------------------------------------------------------------------- races
def test_racing_compactions_and_a_writer_leave_a_correct_index(tmp_path, monkeypatch):
    url = tmp_path / "s.zarr"
    store = make(url, 12, compacted=range(2), written=range(2, 8))
    create_exclusive = _index.create_exclusive

    def slow_create(*args):
        time.sleep(0.02)  # widen the window between reading the index and publishing a generation
        return create_exclusive(*args)

    monkeypatch.setattr(_index, "create_exclusive", slow_create)
    start, writing, results, errors = threading.Barrier(3), threading.Event(), [], []
    writing.set()

    def compactor():
        start.wait()
        try:
            while writing.is_set():
                results.append(compact_index(FeatureStore.open(str(url), mode="r+"), "train"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def writer():
        start.wait()
        for i in range(8, 12):
            add(store, i)
        writing.clear()

    threads = [threading.Thread(target=compactor), threading.Thread(target=compactor), threading.Thread(target=writer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(results) > 4 and max(r.generation for r in results) > 2
    compact_index(store, "train")
    assert indexed(store) == [p.name for p in truth(url)] == [f"part-{i:06d}" for i in range(12)]
    assert journal(url) == [] and len(list((url / "_index" / "train").glob("base-*"))) == 1
    assert seen(url) == truth(url) and from_index(url)


# ----------------------------------------------------------------------------- stale and conflicting entries
def test_a_part_removed_behind_the_index_is_named_when_read_and_by_verify(tmp_path):
    url = tmp_path / "s.zarr"
    compact_index(make(url, 3, written=range(3)), "train")
    shutil.rmtree(url / "train" / "part-000001")
    reader = FeatureStore.open(str(url))
    parts = reader.parts("train")
    reader.read_part(parts[0])
    with pytest.raises(CorruptChunkError, match=r"train/part-000001.*unipt store index"):
        reader.read_part(parts[1])
    problems = [str(p) for p in verify(FeatureStore.open(str(url))).problems if p.kind == "index"]
    assert len(problems) == 1 and "train/part-000001" in problems[0] and "not a committed part" in problems[0]
    assert main(["store", "index", str(url), "-q"]) == 0
    assert seen(url) == truth(url) and len(truth(url)) == 2
    assert [p for p in verify(FeatureStore.open(str(url))).problems if p.kind == "index"] == []


def test_a_second_commit_of_a_part_keeps_the_first_entry_and_is_logged(tmp_path, caplog):
    url = tmp_path / "s.zarr"
    store = make(url, 1, written=[0])
    entry = {**read_index(store._root.store, "", "train").journal["part-000000"], "record_sha256": "f" * 64}
    _index.write_journal_entry(store._root.store, "", "train", entry)
    assert "committed twice" in caplog.text
    assert read_index(store._root.store, "", "train").journal["part-000000"]["record_sha256"] != "f" * 64


def test_compaction_is_refused_where_objects_cannot_be_created_exclusively():
    url = f"memory://index-{uuid.uuid4().hex}"
    store = make(url, 2, written=range(2))
    assert seen(url) == truth(url) and from_index(url)  # the journal is written everywhere
    with pytest.raises(StoreError, match="unipt store index"):
        compact_index(store, "train")
    assert main(["store", "index", url, "-q"]) == 0
    assert indexed(store) == ["part-000000", "part-000001"] and seen(url) == truth(url) and from_index(url)


def test_a_damaged_base_is_not_used_and_a_rebuild_replaces_it(tmp_path):
    url = tmp_path / "s.zarr"
    store = make(url, 2, compacted=range(2))
    base = url / "_index" / "train" / "base-00000001.json.zst"
    base.write_bytes(base.read_bytes()[:-3])
    assert seen(url) == truth(url) and not from_index(url)
    with pytest.raises(StoreError, match="damaged.*unipt store index"):
        compact_index(store, "train")
    assert [p.kind for p in verify(FeatureStore.open(str(url))).problems] == ["index"]
    assert main(["store", "index", str(url), "-q"]) == 0
    assert seen(url) == truth(url) and from_index(url) and verify(FeatureStore.open(str(url))).ok
