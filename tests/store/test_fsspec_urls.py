"""Stores at fsspec URLs other than S3: memory:// (in-process) and file:// round-trip like a plain path."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch

from unipt.store import FeatureStore, StoreError, verify


def write_two_parts(url: str) -> FeatureStore:
    store = FeatureStore.create(url, layers=[0, 1], layer_widths=[4, 6], dtype="float16", label_names=["a", "b"],
                                provenance={"source": {"fingerprint": "x"}})
    rng = np.random.default_rng(0)
    for index, lengths in enumerate(([1, 3], [2, 2, 5])):
        n = sum(lengths)
        writer = store.part_writer("train", index, n_examples=len(lengths), n_tokens=n, source_start=3 * index)
        writer.append({0: torch.from_numpy(rng.normal(size=(n, 4)).astype(np.float32)),
                       1: torch.from_numpy(rng.normal(size=(n, 6)).astype(np.float32))})
        writer.finish([f"e{index}{i}" for i in range(len(lengths))], [i % 2 for i in range(len(lengths))], lengths)
    return store


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_store_at_an_fsspec_url_round_trips_and_verifies(scheme, tmp_path):
    url = f"memory://unipt-{uuid.uuid4().hex}/s.zarr" if scheme == "memory" else f"file://{tmp_path}/s.zarr"
    local = write_two_parts(str(tmp_path / "local.zarr"))
    write_two_parts(url)
    remote = FeatureStore.open(url)
    assert [p.name for p in remote.parts("train")] == [p.name for p in local.parts("train")]
    for a, b in zip(remote.parts("train"), local.parts("train")):
        x, y = remote.read_part(a), local.read_part(b)
        assert list(x.example_id) == list(y.example_id)
        for layer in (0, 1):
            assert torch.equal(x.layers[layer], y.layers[layer])
    assert verify(remote).ok
    with pytest.raises(StoreError, match="read-only"):
        remote.part_writer("train", 5, n_examples=1, n_tokens=1, source_start=0)
