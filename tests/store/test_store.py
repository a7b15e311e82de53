"""FeatureStore: round trips, commit-marker semantics, provenance checks, read-only opening, corruption."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import unipt.store._format as fmt
from unipt.store import (
    CorruptChunkError,
    FeatureStore,
    PartInfo,
    ProvenanceMismatch,
    StoreError,
    layer_key,
    part_key,
)

LAYERS = [0, 3]
WIDTHS = [8, 5]  # two layers of different widths
LABEL_NAMES = ["neg", "pos"]


def provenance(**backbone_overrides):
    backbone = {"location": "/models/tiny", "weights_sha256": "a" * 64, "tokenizer_sha256": "b" * 64}
    backbone.update(backbone_overrides)
    return {
        "backbone": backbone,
        "source": {"location": "/data/x.csv", "fingerprint": "c" * 64},
        "extraction": {"layers": LAYERS, "dtype": "float32", "part_size": 4},
        "versions": {"torch": "2.0", "zarr": "3.1"},
    }


def create(url, dtype="float32", **kwargs):
    args = dict(layers=LAYERS, layer_widths=WIDTHS, dtype=dtype, label_names=LABEL_NAMES, provenance=provenance())
    args.update(kwargs)
    return FeatureStore.create(str(url), **args)


def random_part(rng, lengths, widths=WIDTHS, scale=1.0):
    """Per-layer token rows (CSR order) for examples of the given lengths."""
    n_tokens = int(sum(lengths))
    return {layer: (rng.standard_normal((n_tokens, w)) * scale).astype(np.float32) for layer, w in zip(LAYERS, widths)}


def write_part(store, split, index, lengths, rows, *, batches=None, source_start=0, finish=True, ids=None):
    """Write one part, appending its rows in the given uneven batch sizes (default: one append)."""
    n_tokens = int(sum(lengths))
    writer = store.part_writer(split, index, n_examples=len(lengths), n_tokens=n_tokens, source_start=source_start)
    batches = batches or [n_tokens]
    assert sum(batches) == n_tokens
    start = 0
    for size in batches:
        writer.append({layer: torch.from_numpy(rows[layer][start : start + size]) for layer in rows})
        start += size
    ids = ids or [f"{split}-{index}-{i}" for i in range(len(lengths))]
    labels = [i % 2 for i in range(len(lengths))]
    if finish:
        writer.finish(ids, labels, lengths)
    return writer, ids, labels


@pytest.fixture
def small_chunks(monkeypatch):
    """Force several chunks per shard and several shards per layer on tiny parts."""
    monkeypatch.setattr(fmt, "CHUNK_BYTES", 64)
    monkeypatch.setattr(fmt, "SHARD_BYTES", 256)


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_ragged_parts_across_chunks_and_shards(tmp_path, small_chunks, dtype):
    rng = np.random.default_rng(0)
    store = create(tmp_path / "s.zarr", dtype=dtype)
    parts = {
        0: [1, 7, 3, 1, 12, 5],  # includes length-1 examples
        1: [1],  # a part of a single one-token example
        2: [9, 9, 2, 11, 1, 4, 6],
    }
    batches = {0: [1, 2, 17, 9], 1: [1], 2: [3, 1, 20, 5, 13]}  # uneven, crossing chunk and shard edges
    written = {}
    for index, lengths in parts.items():
        rows = random_part(rng, lengths)
        _, ids, labels = write_part(store, "train", index, lengths, rows, batches=batches[index],
                                    source_start=100 * index)
        written[index] = (lengths, rows, ids, labels)

    infos = store.parts("train")
    assert [p.name for p in infos] == [part_key(i) for i in parts]
    assert store.num_examples("train") == sum(len(l) for l in parts.values())
    assert store.num_tokens("train") == sum(sum(l) for l in parts.values())

    # Layer 0 is 8 wide: 64-byte chunks hold 2 float32 (4 float16) rows; part 0 has 29 tokens, so its
    # layer arrays must have been cut into several shard objects on disk.
    shard_dir = tmp_path / "s.zarr" / "train" / part_key(0) / layer_key(0) / "c"
    shards = [p for p in shard_dir.rglob("*") if p.is_file()]
    assert len(shards) >= 2, shards
    array = zarr.open_array(str(tmp_path / "s.zarr" / "train" / part_key(0) / layer_key(0)), mode="r")
    assert array.chunks[0] < array.shards[0] < array.shape[0]

    for info in infos:
        lengths, rows, ids, labels = written[info.index]
        assert info.n_examples == len(lengths) and info.n_tokens == sum(lengths)
        assert info.source_start == 100 * info.index and info.source_stop == 100 * info.index + len(lengths)
        data = store.read_part(info)
        assert list(data.example_id) == ids
        assert data.label.tolist() == labels
        assert data.length.tolist() == lengths
        assert data.offsets.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
        assert sorted(data.layers) == LAYERS
        for layer, width in zip(LAYERS, WIDTHS):
            stored = data.layers[layer]
            assert stored.dtype == getattr(torch, dtype)
            assert tuple(stored.shape) == (sum(lengths), width)
            expected = torch.from_numpy(rows[layer])
            if dtype == "float32":
                assert torch.equal(stored, expected)
            else:
                # float16 keeps 11 significant bits: relative error <= 2**-11.
                torch.testing.assert_close(stored.float(), expected, rtol=2**-10, atol=1e-7)
                assert torch.equal(stored, expected.half())
        # per-example views follow the offsets
        for i, length in enumerate(lengths):
            start = int(sum(lengths[:i]))
            for layer in LAYERS:
                assert data.example(i, layer).shape[0] == length
                assert torch.equal(data.example(i, layer).float(),
                                   data.layers[layer][start : start + length].float())


def test_read_part_layer_subset(tmp_path):
    rng = np.random.default_rng(1)
    store = create(tmp_path / "s.zarr")
    rows = random_part(rng, [3, 2])
    write_part(store, "train", 0, [3, 2], rows)
    data = store.read_part(("train", part_key(0)), layers=[3])
    assert list(data.layers) == [3]
    assert torch.equal(data.layers[3], torch.from_numpy(rows[3]))
    with pytest.raises(StoreError, match=r"layers \[1\] are not in"):
        store.read_part(("train", part_key(0)), layers=[1])


def test_store_metadata_round_trips(tmp_path):
    store = create(tmp_path / "s.zarr", dtype="float16")
    reopened = FeatureStore.open(str(tmp_path / "s.zarr"))
    assert reopened.layers == LAYERS
    assert reopened.layer_widths == dict(zip(LAYERS, WIDTHS))
    assert reopened.dtype == "float16"
    assert reopened.label_names == LABEL_NAMES
    assert reopened.provenance == provenance()
    assert reopened.meta["format_version"] == 1  # a classification store: version 1, as before tasks existed
    assert "task" not in reopened.meta and reopened.task == "classification"
    assert reopened.read_only and not store.read_only
    assert reopened.splits() == [] and reopened.parts("train") == []


def test_finish_rejects_wrong_counts(tmp_path):
    store = create(tmp_path / "s.zarr")
    rows = random_part(np.random.default_rng(2), [2, 2])
    writer, _, _ = write_part(store, "train", 0, [2, 2], rows, finish=False)
    with pytest.raises(ValueError, match="expected 2 ids"):
        writer.finish(["a"], [0], [4])
    with pytest.raises(ValueError, match="lengths sum to 3"):
        writer.finish(["a", "b"], [0, 1], [2, 1])
    assert store.parts("train") == []
    with pytest.raises(ValueError, match="more rows than"):
        writer.append({layer: np.zeros((1, w), np.float32) for layer, w in zip(LAYERS, WIDTHS)})
        writer.finish(["a", "b"], [0, 1], [2, 2])


# --------------------------------------------------------------------------- commit marker
def test_unfinished_part_is_invisible_and_can_be_redone(tmp_path):
    rng = np.random.default_rng(3)
    store = create(tmp_path / "s.zarr")
    rows0 = random_part(rng, [2, 3])
    write_part(store, "train", 0, [2, 3], rows0)
    rows1 = random_part(rng, [4, 1])
    write_part(store, "train", 1, [4, 1], rows1, finish=False)  # arrays written, no commit marker

    assert (tmp_path / "s.zarr" / "train" / part_key(1) / layer_key(0)).is_dir()  # data is on disk ...
    assert [p.name for p in store.parts("train")] == [part_key(0)]  # ... but the part is invisible
    assert store.committed("train") == {part_key(0)}
    assert store.num_examples("train") == 2
    reader = FeatureStore.open(str(tmp_path / "s.zarr"))
    assert [p.name for p in reader.parts("train")] == [part_key(0)]
    with pytest.raises(StoreError, match="not a committed part"):
        reader.read_part(("train", part_key(1)))

    # part_writer on the same index replaces the leftovers (different shape this time)
    rows1b = random_part(rng, [1, 1, 2])
    _, ids, _ = write_part(store, "train", 1, [1, 1, 2], rows1b, ids=["p", "q", "r"])
    infos = store.parts("train")
    assert [p.name for p in infos] == [part_key(0), part_key(1)]
    data = store.read_part(infos[1])
    assert list(data.example_id) == ["p", "q", "r"]
    assert data.length.tolist() == [1, 1, 2]
    for layer in LAYERS:
        assert torch.equal(data.layers[layer], torch.from_numpy(rows1b[layer]))


def test_committed_part_is_immutable(tmp_path):
    rng = np.random.default_rng(4)
    store = create(tmp_path / "s.zarr")
    rows = random_part(rng, [2, 2])
    write_part(store, "train", 0, [2, 2], rows)
    with pytest.raises(StoreError, match="already committed"):
        store.part_writer("train", 0, n_examples=1, n_tokens=1, source_start=0)
    reopened = create(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="immutable"):
        reopened.part_writer("train", 0, n_examples=1, n_tokens=1, source_start=0)
    # the data is untouched
    assert torch.equal(store.read_part(("train", part_key(0))).layers[0], torch.from_numpy(rows[0]))
    # other splits may reuse the index
    write_part(store, "test", 0, [1], random_part(rng, [1]))
    assert store.splits() == ["test", "train"]


def _corrupt_part_metadata(root: Path, split: str, index: int) -> None:
    meta = root / split / part_key(index) / "zarr.json"
    text = meta.read_text()
    assert fmt.COMMIT_ATTR in text
    meta.write_text(text[: len(text) // 2])  # a metadata document cut short by a crash


def test_truncated_part_metadata_reads_as_uncommitted(tmp_path):
    rng = np.random.default_rng(5)
    store = create(tmp_path / "s.zarr")
    write_part(store, "train", 0, [2], random_part(rng, [2]))
    write_part(store, "train", 1, [3], random_part(rng, [3]))
    _corrupt_part_metadata(tmp_path / "s.zarr", "train", 1)
    reader = FeatureStore.open(str(tmp_path / "s.zarr"))
    with pytest.raises(StoreError, match="not a committed part"):
        reader.read_part(("train", part_key(1)))
    assert reader.read_part(("train", part_key(0))).length.tolist() == [2]


def test_truncated_part_metadata_is_skipped_by_parts_and_redone(tmp_path):
    rng = np.random.default_rng(5)
    store = create(tmp_path / "s.zarr")
    write_part(store, "train", 0, [2], random_part(rng, [2]))
    write_part(store, "train", 1, [3], random_part(rng, [3]))
    _corrupt_part_metadata(tmp_path / "s.zarr", "train", 1)
    reader = FeatureStore.open(str(tmp_path / "s.zarr"), mode="r+")
    assert [p.name for p in reader.parts("train")] == [part_key(0)]
    rows = random_part(rng, [3])
    write_part(reader, "train", 1, [3], rows)
    assert [p.name for p in reader.parts("train")] == [part_key(0), part_key(1)]


# --------------------------------------------------------------------------- provenance
def test_create_reopens_store_with_identical_provenance(tmp_path):
    rng = np.random.default_rng(6)
    store = create(tmp_path / "s.zarr")
    rows = random_part(rng, [2, 1])
    write_part(store, "train", 0, [2, 1], rows)
    again = create(tmp_path / "s.zarr")
    assert again.committed("train") == {part_key(0)}
    assert torch.equal(again.read_part(("train", part_key(0))).layers[3], torch.from_numpy(rows[3]))
    assert again.meta["created"] == store.meta["created"]  # the existing group was kept, not rewritten


def test_create_refuses_different_provenance_naming_the_field(tmp_path):
    create(tmp_path / "s.zarr")
    with pytest.raises(ProvenanceMismatch) as info:
        create(tmp_path / "s.zarr", provenance=provenance(weights_sha256="f" * 64))
    message = str(info.value)
    assert "provenance.backbone.weights_sha256" in message
    assert "a" * 64 in message and "f" * 64 in message
    assert "tokenizer_sha256" not in message  # only differing fields are listed

    with pytest.raises(ProvenanceMismatch, match=r"dtype: expected 'float32', found 'float16'"):
        create(tmp_path / "s.zarr", dtype="float16")
    with pytest.raises(ProvenanceMismatch, match="layer_widths"):
        create(tmp_path / "s.zarr", layer_widths=[8, 6])
    with pytest.raises(ProvenanceMismatch, match="label_names"):
        create(tmp_path / "s.zarr", label_names=["neg", "neutral", "pos"])


def test_create_ignores_location_and_versions(tmp_path):
    create(tmp_path / "s.zarr")
    moved = provenance(location="/elsewhere/tiny")
    moved["source"]["location"] = "/other/place.csv"
    moved["versions"] = {"torch": "9.9", "zarr": "4.0", "numpy": "3"}
    store = create(tmp_path / "s.zarr", provenance=moved)
    assert store.provenance["backbone"]["location"] == "/models/tiny"  # the stored record is not rewritten


def test_create_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="not a storage dtype"):
        create(tmp_path / "a.zarr", dtype="int4")
    with pytest.raises(ValueError, match="2 layers but 1 widths"):
        create(tmp_path / "b.zarr", layer_widths=[8])


# --------------------------------------------------------------------------- opening
def test_read_only_store_refuses_writes(tmp_path):
    create(tmp_path / "s.zarr")
    reader = FeatureStore.open(str(tmp_path / "s.zarr"))
    with pytest.raises(StoreError, match="read-only.*mode='r\\+'"):
        reader.part_writer("train", 0, n_examples=1, n_tokens=1, source_start=0)
    assert not (tmp_path / "s.zarr" / "train").exists()
    writer = FeatureStore.open(str(tmp_path / "s.zarr"), mode="r+")
    write_part(writer, "train", 0, [1], random_part(np.random.default_rng(7), [1]))
    assert reader.committed("train") == {part_key(0)}
    with pytest.raises(ValueError, match="mode must be"):
        FeatureStore.open(str(tmp_path / "s.zarr"), mode="w")


def test_open_missing_store_mentions_extract(tmp_path):
    with pytest.raises(StoreError, match="unipt extract"):
        FeatureStore.open(str(tmp_path / "nowhere.zarr"))
    assert not (tmp_path / "nowhere.zarr").exists()  # opening for reading creates nothing


def test_open_refuses_plain_zarr_group(tmp_path):
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", zarr_format=3).attrs["something"] = 1
    with pytest.raises(StoreError, match="not a unipt feature store"):
        FeatureStore.open(str(tmp_path / "plain.zarr"))
    with pytest.raises(StoreError, match="not a unipt feature store"):
        create(tmp_path / "plain.zarr")


def test_create_refuses_a_non_empty_directory_that_is_not_a_store(tmp_path):
    folder = tmp_path / "my-data"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("important")
    try:
        with pytest.raises(StoreError):
            create(folder)
    finally:
        assert (folder / "notes.txt").read_text() == "important"


def test_open_refuses_other_format_version(tmp_path):
    create(tmp_path / "s.zarr")
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+", zarr_format=3)
    meta = dict(root.attrs[fmt.ROOT_ATTR])
    meta["format_version"] = fmt.FORMAT_VERSION + 1
    root.attrs[fmt.ROOT_ATTR] = meta
    with pytest.raises(StoreError, match=f"format version {fmt.FORMAT_VERSION + 1}"):
        FeatureStore.open(str(tmp_path / "s.zarr"))


# --------------------------------------------------------------------------- float16 overflow
def test_float16_overflow_is_refused_and_part_stays_uncommitted(tmp_path):
    store = create(tmp_path / "s.zarr", dtype="float16")
    lengths = [3, 2]
    rows = random_part(np.random.default_rng(8), lengths)
    writer = store.part_writer("train", 0, n_examples=2, n_tokens=5, source_start=0)
    writer.append({layer: r[:2] for layer, r in rows.items()})
    bad = {layer: r[2:].copy() for layer, r in rows.items()}
    bad[3][1, 2] = 70000.0  # beyond float16's 65504
    with pytest.raises(OverflowError) as info:
        writer.append(bad)
    message = str(info.value)
    assert "layer 3" in message and "float32" in message and "70000" in message
    assert store.parts("train") == []
    with pytest.raises(StoreError, match="not a committed part"):
        store.read_part(("train", part_key(0)))


def test_float16_store_accepts_values_at_the_limit_and_float32_any(tmp_path):
    store16 = create(tmp_path / "a.zarr", dtype="float16")
    rows = {0: np.full((1, 8), 65504.0, np.float32), 3: np.full((1, 5), -65504.0, np.float32)}
    write_part(store16, "train", 0, [1], rows)
    assert store16.read_part(("train", part_key(0))).layers[0].max().item() == 65504.0
    store32 = create(tmp_path / "b.zarr", dtype="float32")
    rows = {0: np.full((1, 8), 1e6, np.float32), 3: np.full((1, 5), -1e6, np.float32)}
    write_part(store32, "train", 0, [1], rows)
    assert store32.read_part(("train", part_key(0))).layers[3].min().item() == -1e6


def test_float16_nan_is_refused(tmp_path):
    store = create(tmp_path / "s.zarr", dtype="float16")
    rows = random_part(np.random.default_rng(9), [2])
    rows[0][0, 0] = np.nan
    writer = store.part_writer("train", 0, n_examples=1, n_tokens=2, source_start=0)
    with pytest.raises(OverflowError, match="layer 0"):
        writer.append(rows)


# --------------------------------------------------------------------------- corruption
def test_corrupted_chunk_raises_naming_part_and_array(tmp_path, small_chunks):
    rng = np.random.default_rng(10)
    store = create(tmp_path / "s.zarr")
    write_part(store, "train", 0, [6, 4], random_part(rng, [6, 4]))
    write_part(store, "train", 1, [5, 5], random_part(rng, [5, 5]))
    shard_dir = tmp_path / "s.zarr" / "train" / part_key(1) / layer_key(3) / "c"
    target = sorted(p for p in shard_dir.rglob("*") if p.is_file())[0]
    target.write_bytes(np.random.default_rng(0).bytes(target.stat().st_size))

    reader = FeatureStore.open(str(tmp_path / "s.zarr"))
    with pytest.raises(CorruptChunkError) as info:
        reader.read_part(("train", part_key(1)))
    message = str(info.value)
    assert f"train/{part_key(1)}" in message and layer_key(3) in message
    assert isinstance(info.value, StoreError)
    # the other layer of that part and the other part still read
    assert reader.read_part(("train", part_key(1)), layers=[0]).length.tolist() == [5, 5]
    assert reader.read_part(("train", part_key(0))).length.tolist() == [6, 4]


def test_missing_column_raises_corrupt_chunk(tmp_path):
    store = create(tmp_path / "s.zarr")
    write_part(store, "train", 0, [2], random_part(np.random.default_rng(11), [2]))
    label_dir = tmp_path / "s.zarr" / "train" / part_key(0) / "label"
    for path in sorted(label_dir.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    label_dir.rmdir()
    with pytest.raises(CorruptChunkError, match="'label' is missing"):
        store.read_part(("train", part_key(0)))


def test_deleted_shard_is_detected(tmp_path):
    store = create(tmp_path / "s.zarr")
    write_part(store, "train", 0, [3], random_part(np.random.default_rng(12), [3]))
    shard_dir = tmp_path / "s.zarr" / "train" / part_key(0) / layer_key(0) / "c"
    for path in [p for p in shard_dir.rglob("*") if p.is_file()]:
        os.remove(path)
    with pytest.raises(CorruptChunkError):
        store.read_part(("train", part_key(0)))


def test_partinfo_index():
    info = PartInfo("train", part_key(42), 1, 1, 0, 1)
    assert info.index == 42
    with pytest.raises(ValueError, match="not a part name"):
        PartInfo("train", "layer_000", 1, 1, 0, 1).index
