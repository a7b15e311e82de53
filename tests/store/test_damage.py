"""Nothing damaged is read silently: every kind of damage to a committed store fails the read naming the
part and the array (or is reported by verify), and only what unipt wrote is ever removed.

Each store is extracted for real from the tiny BERT (parts of 16 examples); the damage is done on disk in
the test, the way a failed copy, a bit flip or a hand edit would do it.
"""

from __future__ import annotations

import json
import shutil
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from unipt.extract import ExtractConfig, SourceConfig, run_extraction
from unipt.store import CorruptChunkError, FeatureStore, IncompleteStoreError, StoreError, describe, verify
from unipt.store._claims import Owner
from unipt.train import LoaderConfig, TrainConfig, fit

PART_SIZE = 16
TRAIN = TrainConfig(method="linear_probe", epochs=1, batch_size=16, model={"layer": -1})
LOADER = LoaderConfig(mode="memory", background="off")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, backbone, encoder) -> Path:
    """A committed store of 120 texts: train 101 examples in 7 parts, test 11 and validation 8 in one each."""
    from conftest import make_text_csv

    folder = tmp_path_factory.mktemp("pristine")
    csv = make_text_csv(folder / "texts.csv")
    root = folder / "features.zarr"
    run_extraction(SourceConfig(path=str(csv)), backbone, ExtractConfig(part_size=PART_SIZE, batch_size=8), str(root),
                   progress=False, encoder=encoder)
    return root


@pytest.fixture
def store_copy(pristine, tmp_path) -> Path:
    """A fresh copy of the pristine store to damage."""
    import shutil

    return Path(shutil.copytree(pristine, tmp_path / "features.zarr"))


def train(root: Path, tmp_path: Path, **options):
    return fit("probe", FeatureStore.open(str(root)), TRAIN, tmp_path / "ckpt", loader_config=LOADER,
               progress=False, **options)


def edit_json(path: Path, edit) -> None:
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document, indent=2))


# --------------------------------------------------------------------------- missing and changed chunks
@pytest.mark.parametrize("column", ["label", "offsets", "length", "example_id"])
def test_a_missing_column_chunk_fails_the_read_naming_part_and_array(store_copy, tmp_path, column):
    (store_copy / "train" / "part-000002" / column / "c" / "0").unlink()
    store = FeatureStore.open(str(store_copy))
    with pytest.raises(CorruptChunkError, match=rf"train/part-000002/{column}: the stored object {column}/c/0 is "
                                                r"missing; delete the part"):
        store.read_part(("train", "part-000002"))
    with pytest.raises(CorruptChunkError, match=rf"part-000002/{column}"):
        train(store_copy, tmp_path)  # training does not read the column back as all zeros


def test_a_missing_layer_shard_fails_the_read(store_copy):
    (store_copy / "train" / "part-000001" / "layer_002" / "c" / "0" / "0").unlink()
    with pytest.raises(CorruptChunkError, match=r"train/part-000001/layer_002: the stored object layer_002/c/0/0 is "
                                                "missing"):
        FeatureStore.open(str(store_copy)).read_part(("train", "part-000001"))


def flip_bytes(path: Path, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + n] = bytes(b ^ 0xFF for b in data[middle : middle + n])
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_layer_shard_fail_the_checksum_on_read(store_copy, tmp_path):
    flip_bytes(store_copy / "train" / "part-000002" / "layer_002" / "c" / "0" / "0")
    store = FeatureStore.open(str(store_copy))
    with pytest.raises(CorruptChunkError, match=r"train/part-000002/layer_002 fails its checksum"):
        store.read_part(("train", "part-000002"))
    store.read_part(("train", "part-000002"), layers=[0, 1])  # the other layers are intact and still read
    with pytest.raises(CorruptChunkError, match="part-000002/layer_002 fails its checksum"):
        train(store_copy, tmp_path)


def test_flipped_bytes_in_a_column_fail_the_checksum_on_read(store_copy):
    flip_bytes(store_copy / "validation" / "part-000000" / "label" / "c" / "0", n=4)
    with pytest.raises(CorruptChunkError, match="validation/part-000000/label fails its checksum"):
        FeatureStore.open(str(store_copy)).read_part(("validation", "part-000000"))


def test_a_store_without_chunk_checksums_still_reads_and_says_so(tmp_path, backbone, encoder, text_csv):
    """Stores written before chunks carried checksums (no crc32c codec, no root or commit digests, no plan)."""
    root = tmp_path / "old.zarr"
    run_extraction(SourceConfig(path=str(text_csv)), backbone, ExtractConfig(part_size=PART_SIZE), str(root),
                   progress=False, encoder=encoder)
    new = FeatureStore.open(str(root))
    reference = {split: [new.read_part(info) for info in new.parts(split)] for split in new.splits()}

    # Rewrite it as an older unipt left it: the same values, without any of the checksums or the plan.
    old = FeatureStore.create(str(tmp_path / "older.zarr"), layers=new.layers, layer_widths=list(new.layer_widths.values()),
                              dtype=new.dtype, label_names=new.label_names, provenance=new.provenance,
                              chunk_checksum=None)
    for split, parts in reference.items():
        for data in parts:
            writer = old.part_writer(split, data.info.index, n_examples=data.info.n_examples,
                                     n_tokens=data.info.n_tokens, source_start=data.info.source_start)
            writer.append(data.layers)
            writer.finish(list(data.example_id), data.label, data.length)
    older = Path(old.url)
    edit_json(older / "zarr.json", lambda doc: doc["attributes"].pop("unipt_sha256"))
    for part in older.glob("*/part-*"):
        edit_json(part / "zarr.json", lambda doc: doc["attributes"]["unipt_commit"].pop("record_sha256"))
    shutil.rmtree(older / "_index")  # nor had it a split index
    codecs = json.loads((older / "train" / "part-000000" / "layer_001" / "zarr.json").read_text())["codecs"]
    assert "crc32c" not in json.dumps(codecs[0]["configuration"]["codecs"])  # no checksum inside the shards

    store = FeatureStore.open(str(older))
    for split, parts in reference.items():
        for data in parts:
            again = store.read_part(data.info)
            assert all((again.layers[l] == data.layers[l]).all() for l in store.layers)
            assert np.array_equal(again.label, data.label)
    info = describe(store)
    assert info["chunk_checksum"] is None and info["metadata_checksum"] is False
    assert verify(store).ok
    fit("probe", store, TRAIN, tmp_path / "ckpt", loader_config=LOADER, progress=False)  # no plan: trains


def test_store_info_says_whether_chunks_are_checksummed(store_copy, capsys):
    from unipt.pipelines.cli import main

    assert main(["store", "info", str(store_copy)]) == 0
    assert "crc32c on every chunk, checked by every read; root metadata sha256 checked on open" in capsys.readouterr().out


# --------------------------------------------------------------------------- metadata and commit records
def test_an_edited_root_metadata_is_refused_on_open(store_copy):
    edit_json(store_copy / "zarr.json", lambda doc: doc["attributes"]["unipt"]["label_names"].reverse())
    with pytest.raises(CorruptChunkError, match="root metadata .* does not match the sha256 recorded when the store "
                                                "was created"):
        FeatureStore.open(str(store_copy))


def test_an_edited_commit_record_is_refused_and_verify_names_it(store_copy, tmp_path):
    part = store_copy / "train" / "part-000003"
    edit_json(part / "zarr.json", lambda doc: doc["attributes"]["unipt_commit"].update(n_examples=10))
    store = FeatureStore.open(str(store_copy))
    # Opening the split trusts its index (no commit record is read); reading the part checks its record.
    with pytest.raises(CorruptChunkError, match=r"train/part-000003: its commit record does not match the checksum"):
        store.read_part(("train", "part-000003"))
    with pytest.raises(CorruptChunkError, match="part-000003"):
        train(store_copy, tmp_path)
    report = verify(store)
    assert {(p.kind, p.where) for p in report.problems} == {("damaged", "train/part-000003"), ("incomplete", "train"),
                                                            ("index", "train/part-000003")}
    shutil.rmtree(store_copy / "_index")  # without an index, opening the split reads every commit record
    with pytest.raises(CorruptChunkError, match=r"train/part-000003: its commit record does not match the checksum"):
        FeatureStore.open(str(store_copy)).parts("train")


def test_verify_reports_a_part_whose_metadata_was_cut_short(store_copy, tmp_path):
    document = store_copy / "train" / "part-000004" / "zarr.json"
    document.write_bytes(document.read_bytes()[:100])  # truncated: the part is invisible to readers
    store = FeatureStore.open(str(store_copy))
    report = verify(store)
    kinds = {(p.kind, p.where) for p in report.problems}
    assert kinds == {("unreadable", "train/part-000004"), ("incomplete", "train"), ("index", "train/part-000004")}, \
        report.problems
    assert not report.ok
    # The index still lists it (damage behind its back): reading the part names it instead of using 6 of 7.
    with pytest.raises(CorruptChunkError, match=r"train/part-000004: the split's index lists it .* `unipt store index"):
        train(store_copy, tmp_path)
    from unipt.pipelines.cli import main

    # Rebuilt from the parts, the index no longer lists it, and training notices the missing part at the start.
    assert main(["store", "index", str(store_copy)]) == 0
    assert "part-000004" not in FeatureStore.open(str(store_copy)).committed("train")
    with pytest.raises(IncompleteStoreError, match=r"train: 6 of 7 parts committed \(85 of 101 examples\)"):
        train(store_copy, tmp_path)


def test_verify_counts_a_deleted_part_against_the_plan(store_copy):
    import shutil

    shutil.rmtree(store_copy / "test" / "part-000000")
    problems = verify(FeatureStore.open(str(store_copy))).problems
    assert [(p.kind, p.where, p.detail) for p in problems][:1] == [
        ("incomplete", "test", "0 of 1 planned parts committed; not committed: part-000000")]
    assert [(p.kind, p.where) for p in problems][1:] == [("index", "test/part-000000")]  # the index still lists it


# --------------------------------------------------------------------------- incomplete stores
@pytest.fixture
def dead_owner():
    """The claim owner of a run that died on this host (a real process, now gone)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(process.pid).create_time()
    process.wait()
    return Owner("dead-run-0123456789", __import__("socket").gethostname(), process.pid, started)


def interrupt(root: Path, owner: Owner, keep: int) -> None:
    """Make ``root`` look like an extraction killed after ``keep`` train parts: later parts and the other splits
    gone, part ``keep`` half-written and still claimed by ``owner``, and no split index (a killed run's journal
    holds the parts it committed and no more: without the compaction at a run's end there is no base)."""
    shutil.rmtree(root / "_index")
    for part in sorted((root / "train").glob("part-*"))[keep:]:
        shutil.rmtree(part)
    for split in ("validation", "test"):
        shutil.rmtree(root / split)
    half = root / "train" / f"part-{keep:06d}"
    half.mkdir()
    (half / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    claim = root / "_claims" / "train" / f"part-{keep:06d}.json"
    claim.parent.mkdir(parents=True, exist_ok=True)
    claim.write_text(json.dumps({"owner": owner.__dict__, "token": "t", "claimed": time.time(),
                                 "heartbeat": time.time(), "ttl": 120.0}))


def test_training_from_an_interrupted_extraction_is_refused_naming_what_is_missing(store_copy, tmp_path, dead_owner):
    interrupt(store_copy, dead_owner, keep=4)
    with pytest.raises(IncompleteStoreError) as refused:
        train(store_copy, tmp_path)
    message = str(refused.value)
    assert "train: 4 of 7 parts committed (64 of 101 examples); claimed: part-000004 (stale (its process is gone)" in message
    assert "validation: 0 of 1 parts committed" in message and "test: 0 of 1 parts committed" in message
    assert "--allow-incomplete" in message and "re-running it resumes" in message


def test_allow_incomplete_trains_on_the_committed_parts_with_a_warning(store_copy, tmp_path, dead_owner, caplog):
    interrupt(store_copy, dead_owner, keep=4)
    with caplog.at_level(logging.WARNING):
        result = train(store_copy, tmp_path, allow_incomplete=True)
    assert "not completely extracted" in caplog.text and "using the committed parts only" in caplog.text
    assert result.history[0]["train_examples_per_s"] > 0 and result.test_metrics is None


def test_a_split_the_source_never_had_is_a_warning_not_a_refusal(store_copy, tmp_path, caplog):
    config = TrainConfig(method="linear_probe", epochs=1, batch_size=16, model={"layer": -1}, eval_split="dev")
    with caplog.at_level(logging.WARNING):
        fit("probe", FeatureStore.open(str(store_copy)), config, tmp_path / "ckpt", loader_config=LOADER,
            progress=False)
    assert "has no split 'dev': its source has ['test', 'train', 'validation']" in caplog.text


def test_store_info_marks_a_dead_runs_claim_stale(store_copy, dead_owner, capsys):
    from unipt.pipelines.cli import main

    interrupt(store_copy, dead_owner, keep=4)
    assert main(["store", "info", str(store_copy)]) == 0
    out = capsys.readouterr().out
    assert f"stale      train/part-000004 claimed by pid {dead_owner.pid}" in out
    assert "stale, its process is gone: the next extraction takes it over" in out
    assert "incomplete train 4 of 7, test 0 of 1, validation 0 of 1 planned parts committed" in out


def test_a_live_claim_shows_as_writing(store_copy, capsys):
    from unipt.pipelines.cli import main

    interrupt(store_copy, Owner.current("live-run"), keep=4)
    assert main(["store", "info", str(store_copy)]) == 0
    assert "writing    train/part-000004 claimed by pid" in capsys.readouterr().out


# --------------------------------------------------------------------------- creation never deletes a user's file
def test_extraction_into_a_folder_holding_a_users_file_is_refused_and_the_file_kept(tmp_path, backbone, encoder,
                                                                                    text_csv):
    folder = tmp_path / "features.zarr"
    folder.mkdir()
    (folder / "notes.partial").write_text("my notes")
    with pytest.raises(StoreError, match="exists and is not a unipt store"):
        run_extraction(SourceConfig(path=str(text_csv)), backbone, ExtractConfig(part_size=PART_SIZE), str(folder),
                       progress=False, encoder=encoder)
    assert (folder / "notes.partial").read_text() == "my notes"


def test_what_a_killed_creation_leaves_is_cleared_and_the_store_created(tmp_path, backbone, encoder, text_csv):
    folder = tmp_path / "features.zarr"
    folder.mkdir()
    (folder / "zarr.0123456789abcdef0123456789abcdef.partial").write_text('{"zarr_format": 3, "node')
    run_extraction(SourceConfig(path=str(text_csv)), backbone, ExtractConfig(part_size=PART_SIZE), str(folder),
                   progress=False, encoder=encoder)
    assert verify(FeatureStore.open(str(folder))).ok
    assert not list(folder.glob("*.partial"))


def test_training_on_a_one_class_store_warns(tmp_path, backbone, encoder, caplog):
    csv = tmp_path / "one.csv"
    csv.write_text("text,label\n" + "".join(f"text number {'good bad fine'.split()[i % 3]} {i},positive\n"
                                            for i in range(40)))
    root = tmp_path / "one.zarr"
    run_extraction(SourceConfig(path=str(csv)), backbone, ExtractConfig(part_size=PART_SIZE), str(root),
                   progress=False, encoder=encoder)
    with caplog.at_level(logging.WARNING):
        train(root, tmp_path)
    assert "has a single class ('positive'): a classifier learns nothing from it" in caplog.text
