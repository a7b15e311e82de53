"""Feature stores at s3:// URLs, over a real S3-compatible HTTP endpoint on loopback (moto server mode).

The endpoint and credentials come from the standard AWS environment only (see ``s3_server``): unipt is
given nothing but the ``s3://`` URL, exactly as a user with a configured AWS environment would run it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_text_csv
from s3_server import moto_s3
from unipt.extract import ExtractConfig, SourceConfig, run_extraction
from unipt.store import FeatureStore, StoreError, verify
from unipt.train import LoaderConfig, TrainConfig, fit

EXTRACT = dict(part_size=32, batch_size=8)  # a few parts per split, few objects (object stores are slow)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        with moto_s3(monkeypatch, tmp_path_factory.mktemp("aws")) as endpoint:
            yield endpoint


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> SourceConfig:
    return SourceConfig(path=str(make_text_csv(tmp_path_factory.mktemp("src") / "texts.csv")))


def extract(source, backbone, encoder, url):
    return run_extraction(source, backbone, ExtractConfig(**EXTRACT), url, progress=False, encoder=encoder)


@pytest.fixture(scope="module")
def stores(s3, source, backbone, encoder, tmp_path_factory):
    """The same source extracted twice: into a local folder and into s3://bucket/store.zarr."""
    local_url = str(tmp_path_factory.mktemp("local") / "store.zarr")
    remote_url = s3.url("store.zarr")
    local_summary = extract(source, backbone, encoder, local_url)
    remote_summary = extract(source, backbone, encoder, remote_url)
    return {"local": (local_url, local_summary), "remote": (remote_url, remote_summary)}


def stored_objects(s3) -> dict[str, dict]:
    """Every object in the bucket: key -> (size, ETag)."""
    fs = s3.filesystem()
    return {key: (info["size"], info.get("ETag")) for key, info in fs.find(s3.bucket, detail=True).items()}


def bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().numpy().tobytes()


# ----------------------------------------------------------------------------- (a) round trip
def test_s3_store_holds_exactly_what_a_local_extraction_holds(s3, stores):
    local_url, local_summary = stores["local"]
    remote_url, remote_summary = stores["remote"]
    assert remote_summary.parts_written == local_summary.parts_written > 3
    assert remote_summary.examples == local_summary.examples
    assert any(key.startswith(f"{s3.bucket}/store.zarr/") for key in stored_objects(s3))

    local, remote = FeatureStore.open(local_url), FeatureStore.open(remote_url)
    assert remote.read_only and remote.url == remote_url
    assert remote.splits() == local.splits() == ["test", "train", "validation"]
    assert (remote.layers, remote.layer_widths, remote.dtype, remote.label_names) == (
        local.layers, local.layer_widths, local.dtype, local.label_names)
    assert remote.provenance == local.provenance
    n_parts = 0
    for split in local.splits():
        assert remote.parts(split) == local.parts(split)
        for part in local.parts(split):
            ours, theirs = local.read_part(part), remote.read_part(part)
            assert theirs.info == ours.info
            assert list(theirs.example_id) == list(ours.example_id)
            for column in ("label", "length", "offsets"):
                got, want = getattr(theirs, column), getattr(ours, column)
                assert got.dtype == want.dtype and np.array_equal(got, want), column
            assert sorted(theirs.layers) == sorted(ours.layers) == local.layers
            for layer in local.layers:
                assert theirs.layers[layer].dtype == ours.layers[layer].dtype
                assert theirs.layers[layer].shape == ours.layers[layer].shape
                assert bits(theirs.layers[layer]) == bits(ours.layers[layer]), (split, part.name, layer)
            n_parts += 1
    assert n_parts == remote_summary.parts_written
    # integrity over HTTP: every object re-hashed against the commit records
    report = verify(remote)
    assert report.ok and report.parts == n_parts and report.objects > n_parts


def test_verify_names_an_object_corrupted_in_the_bucket(s3, stores):
    remote_url, _ = stores["remote"]
    fs = s3.filesystem()
    key = next(k for k in sorted(fs.find(f"{s3.bucket}/store.zarr/train/part-000000/layer_001/")) if "/c/" in k)
    original = fs.cat_file(key)
    try:
        fs.pipe_file(key, original[:-1] + bytes([original[-1] ^ 0xFF]))
        problems = verify(FeatureStore.open(remote_url)).problems
        assert [(p.kind, p.where) for p in problems] == [("corrupt", key.split("store.zarr/", 1)[1])]
    finally:
        fs.pipe_file(key, original)


def test_endpoint_can_also_come_from_storage_options(s3, stores, monkeypatch):
    """Without AWS_ENDPOINT_URL, the fsspec way (client_kwargs) reaches the same store through FeatureStore.open."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    options = {"client_kwargs": {"endpoint_url": s3.endpoint_url}}
    remote = FeatureStore.open(stores["remote"][0], storage_options=options)
    local = FeatureStore.open(stores["local"][0])
    assert remote.meta == local.meta | {"created": remote.meta["created"]}
    part = local.parts("validation")[0]
    assert remote.parts("validation") == [part]
    assert bits(remote.read_part(part).layers[local.layers[-1]]) == bits(local.read_part(part).layers[local.layers[-1]])


# ----------------------------------------------------------------------------- (b) training
@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_training_from_s3_equals_training_from_local(s3, stores, tmp_path, mode):
    config = TrainConfig(epochs=2, batch_size=8, seed=3, device="cpu", model={"reduction": 2})
    loader = LoaderConfig(mode=mode, shuffle_buffer=16, decode_threads=2, background="on")
    results = {}
    for where in ("local", "remote"):
        store = FeatureStore.open(stores[where][0])
        results[where] = fit(f"run-{where}", store, config, tmp_path / where, loader_config=loader, progress=False)
    local, remote = results["local"], results["remote"]
    assert remote.test_metrics is not None
    assert remote.test_metrics == local.test_metrics
    assert remote.eval_metrics == local.eval_metrics
    assert remote.best_epoch == local.best_epoch
    assert [h["train_loss"] for h in remote.history] == [h["train_loss"] for h in local.history]
    weights_local = load_file(str(Path(local.checkpoint) / "model.safetensors"))
    weights_remote = load_file(str(Path(remote.checkpoint) / "model.safetensors"))
    assert set(weights_remote) == set(weights_local)
    for key, value in weights_local.items():
        assert bits(weights_remote[key]) == bits(value), key
    # the checkpoint names the store by its URL and nothing else
    saved = (Path(remote.checkpoint) / "config.json").read_text()
    assert stores["remote"][0] in saved
    for secret in (s3.access_key, s3.secret_key, s3.endpoint_url):
        assert secret not in saved


# ----------------------------------------------------------------------------- (c) no credentials stored
def test_no_credentials_or_endpoint_are_written_into_the_store(s3, stores):
    fs = s3.filesystem()
    keys = fs.find(f"{s3.bucket}/store.zarr")
    assert len(keys) > 20
    assert any(key.endswith("/zarr.json") for key in keys) and any("/c/" in key for key in keys)
    needles = [s3.access_key, s3.secret_key, s3.endpoint_url, s3.endpoint_url.split("//", 1)[1]]
    needles = [n.encode() for n in needles]
    for key in keys:
        data = fs.cat_file(key)
        for needle in needles:
            assert needle not in data, f"{key} holds {needle!r}"


# ----------------------------------------------------------------------------- (d) read-only opening
def test_read_only_s3_store_refuses_to_write(s3, stores):
    before = stored_objects(s3)
    store = FeatureStore.open(stores["remote"][0])
    assert store.read_only
    with pytest.raises(StoreError, match="read-only"):
        store.part_writer("train", 99, n_examples=1, n_tokens=1, source_start=0)
    assert stored_objects(s3) == before


# ----------------------------------------------------------------------------- (e) resume
def test_rerunning_extraction_over_s3_resumes_and_writes_nothing(s3, stores, source, backbone, encoder):
    remote_url, first = stores["remote"]
    before = stored_objects(s3)
    again = extract(source, backbone, encoder, remote_url)
    assert again.parts_written == 0
    assert again.parts_skipped == first.parts_written
    assert sum(again.examples.values()) == 0
    assert stored_objects(s3) == before  # not one object rewritten
