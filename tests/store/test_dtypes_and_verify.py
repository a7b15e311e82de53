"""Storage dtypes (float32/float16/bfloat16/int8), per-object checksums, verify, remove_part, describe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from unipt.store import FeatureStore, StoreError, ValueRangeError, describe, layer_key, part_key, remove_part, verify

WIDTHS = {0: 8, 2: 12}


def make_store(path: Path, dtype: str, parts: int = 2, seed: int = 0):
    """A store of ``parts`` parts of ragged examples (lengths include 1); returns it and the float rows."""
    rng = np.random.default_rng(seed)
    store = FeatureStore.create(str(path), layers=list(WIDTHS), layer_widths=list(WIDTHS.values()), dtype=dtype,
                                label_names=["a", "b"], provenance={"test": True})
    expected = {}
    for index in range(parts):
        lengths = [1, 5, 3]
        n_tokens = sum(lengths)
        rows = {l: torch.from_numpy(rng.normal(0, 3, (n_tokens, w)).astype(np.float32)) for l, w in WIDTHS.items()}
        writer = store.part_writer("train", index, n_examples=3, n_tokens=n_tokens, source_start=3 * index)
        writer.append({l: r[:2] for l, r in rows.items()})  # uneven batches
        writer.append({l: r[2:] for l, r in rows.items()})
        writer.finish([f"ex{index}-{i}" for i in range(3)], [0, 1, 0], lengths)
        expected[part_key(index)] = (rows, lengths)
    return store, expected


def decoded(store: FeatureStore, name: str, layer: int) -> torch.Tensor:
    data = store.read_part(("train", name))
    return torch.cat([data.example(i, layer) for i in range(data.info.n_examples)])


@pytest.mark.parametrize("dtype, rtol", [("float32", 0), ("float16", 2**-11), ("bfloat16", 2**-8)])
def test_float_modes_round_trip_within_their_precision(tmp_path, dtype, rtol):
    store, expected = make_store(tmp_path / "s.zarr", dtype)
    for name, (rows, _) in expected.items():
        for layer in WIDTHS:
            got = decoded(store, name, layer)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, rows[layer], rtol=rtol, atol=1e-30 if rtol else 0)
    stored = store.read_part(("train", part_key(0))).layers[0].dtype
    assert stored == {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def test_bfloat16_is_stored_as_uint16_bits(tmp_path):
    import zarr

    make_store(tmp_path / "s.zarr", "bfloat16")
    array = zarr.open_array(str(tmp_path / "s.zarr" / "train" / part_key(0) / layer_key(0)), mode="r")
    assert array.dtype == np.uint16
    assert FeatureStore.open(str(tmp_path / "s.zarr")).dtype == "bfloat16"


def test_int8_keeps_a_per_token_scale_and_dequantises_within_one_step(tmp_path):
    store, expected = make_store(tmp_path / "s.zarr", "int8")
    data = store.read_part(("train", part_key(1)))
    assert data.layers[2].dtype == torch.int8 and data.scales[2].shape == (data.info.n_tokens,)
    rows = expected[part_key(1)][0][2]
    got = decoded(store, part_key(1), 2)
    step = rows.abs().amax(dim=1, keepdim=True) / 127  # one quantisation step per token row
    assert ((got - rows).abs() <= step / 2 + 1e-6).all()
    assert (got.abs().amax(dim=1) - rows.abs().amax(dim=1)).abs().max() < 1e-5  # absmax is exact


def test_float16_overflow_suggests_bfloat16_and_nan_is_refused_in_every_mode(tmp_path):
    store = FeatureStore.create(str(tmp_path / "f16.zarr"), layers=[0], layer_widths=[4], dtype="float16",
                                label_names=["a"], provenance={})
    writer = store.part_writer("train", 0, n_examples=1, n_tokens=2, source_start=0)
    with pytest.raises(ValueRangeError, match="layer 0 .* beyond float16's range .*dtype=bfloat16"):
        writer.append({0: torch.tensor([[1.0, 2.0, 7e4, 0.0], [0.0, 0.0, 0.0, 0.0]])})
    for dtype in ("float32", "bfloat16", "int8"):
        s = FeatureStore.create(str(tmp_path / f"{dtype}.zarr"), layers=[0], layer_widths=[2], dtype=dtype,
                                label_names=["a"], provenance={})
        w = s.part_writer("train", 0, n_examples=1, n_tokens=1, source_start=0)
        with pytest.raises(ValueRangeError, match="non-finite"):
            w.append({0: torch.tensor([[float("nan"), 1.0]])})
    assert store.parts("train") == []


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_commit_records_a_sha256_per_object_and_verify_passes(tmp_path, dtype):
    store, _ = make_store(tmp_path / "s.zarr", dtype)
    report = verify(FeatureStore.open(str(tmp_path / "s.zarr")))
    assert report.ok, [str(p) for p in report.problems]
    assert report.parts == 2
    # every layer shard, scale shard (int8), column and array metadata document is covered
    per_part = 2 * 2 + (2 * 2 if dtype == "int8" else 0) + 4 * 2
    assert report.objects == 2 * per_part


def test_verify_names_corrupt_missing_and_unrecorded_objects(tmp_path):
    root = tmp_path / "s.zarr"
    make_store(root, "float16")
    shard = next((root / "train" / part_key(0) / layer_key(2) / "c").rglob("*"))
    while shard.is_dir():
        shard = next(shard.iterdir())
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (root / "train" / part_key(1) / "label" / "c" / "0").unlink()
    (root / "train" / part_key(1) / "stray.bin").write_bytes(b"x")
    problems = {(p.kind, p.where) for p in verify(FeatureStore.open(str(root))).problems}
    rel = shard.relative_to(root / "train" / part_key(0)).as_posix()
    assert problems == {("corrupt", f"train/{part_key(0)}/{rel}"),
                        ("missing", f"train/{part_key(1)}/label/c/0"),
                        ("unrecorded", f"train/{part_key(1)}/stray.bin")}


def test_remove_part_makes_it_redoable_and_is_refused_read_only(tmp_path):
    root = tmp_path / "s.zarr"
    make_store(root, "float16")
    with pytest.raises(StoreError, match="read-only"):
        remove_part(FeatureStore.open(str(root)), "train", part_key(0))
    writable = FeatureStore.open(str(root), mode="r+")
    with pytest.raises(StoreError, match="no part train/part-000009"):
        remove_part(writable, "train", part_key(9))
    assert remove_part(writable, "train", part_key(0)) > 0
    assert [p.name for p in writable.parts("train")] == [part_key(1)]
    assert not (root / "train" / part_key(0)).exists()
    assert verify(writable).ok


def test_describe_counts_bytes_per_value(tmp_path):
    store, _ = make_store(tmp_path / "s.zarr", "int8")
    info = describe(store)
    assert info["splits"]["train"] == {"parts": 2, "examples": 6, "tokens": 18, "truncated": 0, "bytes": info["bytes"],
                                       "planned_parts": None, "planned_examples": None, "not_committed": {}}
    assert info["skipped"] == {} and info["in_progress"] == []
    assert info["chunk_checksum"] == "crc32c" and info["metadata_checksum"]
    assert info["dtype"] == "int8" and info["compression"] == "zstd"
    # random normals in int8 with a float32 scale per 8- or 12-wide row: ~1 byte/value + scales + headers
    assert 1.0 < info["bytes_per_value"] < 3.0
