"""export_webdataset: every committed example comes back from the shards exactly as read_part decodes it."""

from __future__ import annotations

import io
import tarfile
import json
from pathlib import Path

import numpy as np
import pytest
import torch

wds = pytest.importorskip("webdataset")

from unipt.store import STORAGE_DTYPES, FeatureStore, StoreError, layer_key  # noqa: E402
from unipt.store._export import MANIFEST, export_webdataset  # noqa: E402

LAYERS = [0, 3]
WIDTHS = [8, 5]
LABEL_NAMES = ["neg", "pos"]
# split -> lengths of each committed part's examples
PARTS = {"train": [[3, 1, 4, 2], [5, 2, 1]], "validation": [[2, 6]]}


def build_store(url, dtype: str) -> FeatureStore:
    """Two splits of committed parts (labels 0, 1 and -1 = unlabelled), plus one uncommitted part."""
    rng = np.random.default_rng(0)
    store = FeatureStore.create(str(url), layers=LAYERS, layer_widths=WIDTHS, dtype=dtype, label_names=LABEL_NAMES,
                                provenance={"backbone": {"location": "/models/tiny"}, "source": {"fingerprint": "c" * 64}})
    for split, parts in PARTS.items():
        for index, lengths in enumerate(parts + ([[2, 2]] if split == "train" else [])):
            n_tokens = sum(lengths)
            writer = store.part_writer(split, index, n_examples=len(lengths), n_tokens=n_tokens,
                                       source_start=index * 4)
            writer.append({layer: torch.from_numpy(rng.standard_normal((n_tokens, w)).astype(np.float32) * 3)
                           for layer, w in zip(LAYERS, WIDTHS)})
            if index < len(parts):  # the extra train part stays uncommitted: invisible, never exported
                writer.finish([f"{split}-{index}-{i}" for i in range(len(lengths))],
                              [(i % 3) - 1 for i in range(len(lengths))], lengths)
    return store


def stored_numpy(rows: torch.Tensor) -> np.ndarray:
    """Rows as read_part gives them, as numpy (bfloat16 as its uint16 bit patterns)."""
    return rows.view(torch.int16).numpy().view(np.uint16) if rows.dtype == torch.bfloat16 else rows.numpy()


def read_shards(shards) -> list[dict]:
    """Samples of the shards as webdataset groups them (its tar iterators; files closed here, unlike
    WebDataset's own opener, which leaves them to the garbage collector)."""
    samples = []
    for shard in shards:
        with open(shard, "rb") as stream:
            files = wds.tariterators.tar_file_expander([{"url": str(shard), "stream": stream}])
            samples.extend(wds.tariterators.group_by_keys(files))
    return samples


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_every_example_round_trips_exactly(tmp_path, dtype):
    if dtype not in STORAGE_DTYPES:
        pytest.skip(f"this store has no {dtype} mode")
    store = build_store(tmp_path / "s.zarr", dtype)
    out = tmp_path / "wds"
    shards = export_webdataset(store, str(out), maxcount=3)

    # 7 train examples in shards of 3 -> 3 shards; 2 validation examples -> 1 shard
    assert [p.rsplit("/", 1)[-1] for p in shards] == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar", "validation-000000.tar"]
    samples = {s["__key__"]: s for s in read_shards(shards)}
    assert len(samples) == sum(store.num_examples(split) for split in store.splits()) == 9

    for split in store.splits():
        for part in store.parts(split):
            data = store.read_part(part)
            for i, example_id in enumerate(data.example_id):
                sample = samples.pop(example_id)
                label = int(data.label[i])
                assert json.loads(sample["json"]) == {
                    "example_id": example_id, "label": label, "label_name": LABEL_NAMES[label] if label >= 0 else None,
                    "length": int(data.length[i]), "split": split, "part": part.name}
                start, stop = data.offsets[i], data.offsets[i + 1]
                for layer in LAYERS:
                    expected = stored_numpy(data.layers[layer][start:stop])
                    got = npy(sample[f"{layer_key(layer)}.npy"])
                    assert got.dtype == expected.dtype and got.shape == (data.length[i], store.layer_widths[layer])
                    np.testing.assert_array_equal(got, expected)
                    if dtype == "int8":
                        np.testing.assert_array_equal(npy(sample[f"{layer_key(layer)}_scale.npy"]),
                                                      data.scales[layer][start:stop].numpy())
    assert not samples  # nothing beyond the committed examples (the uncommitted part is not exported)

    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["splits"] == {
        "train": {"examples": 7, "tokens": 18, "parts": 2,
                  "shards": ["train-000000.tar", "train-000001.tar", "train-000002.tar"]},
        "validation": {"examples": 2, "tokens": 8, "parts": 1, "shards": ["validation-000000.tar"]}}
    assert manifest["store"]["provenance"] == store.provenance
    assert manifest["dtype"] == dtype and manifest["layers"] == LAYERS
    assert manifest["layer_widths"] == {"0": 8, "3": 5}


def test_split_and_layer_subsets_and_reproducible_bytes(tmp_path):
    store = build_store(tmp_path / "s.zarr", "float16")
    shards = export_webdataset(store, str(tmp_path / "a"), splits=["validation"], layers=[3])
    assert [p.rsplit("/", 1)[-1] for p in shards] == ["validation-000000.tar"]
    samples = read_shards(shards)
    assert sorted(k for k in samples[0] if not k.startswith("__")) == ["json", "layer_003.npy"]
    assert json.loads((tmp_path / "a" / MANIFEST).read_text())["splits"]["validation"]["examples"] == 2

    again = export_webdataset(store, str(tmp_path / "b"), splits=["validation"], layers=[3])
    assert Path(shards[0]).read_bytes() == Path(again[0]).read_bytes()  # same store -> same bytes


@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_standard_webdataset_pipeline_reads_the_export(tmp_path):
    store = build_store(tmp_path / "s.zarr", "float16")
    shards = export_webdataset(store, str(tmp_path / "wds"), maxcount=4)
    # raw bytes, decoded here (no .decode(): its default handlers would unpickle .pyd members)
    dataset = wds.WebDataset(shards, shardshuffle=False).to_tuple("__key__", "json", "layer_003.npy")
    rows = {key: (json.loads(meta), npy(tokens)) for key, meta, tokens in dataset}
    assert len(rows) == 9
    data = store.read_part(store.parts("validation")[0])
    meta, tokens = rows[data.example_id[1]]
    assert meta["length"] == data.length[1] == tokens.shape[0]
    np.testing.assert_array_equal(tokens, data.layers[3][data.offsets[1] : data.offsets[2]].numpy())


def test_refusals(tmp_path):
    store = build_store(tmp_path / "s.zarr", "float32")
    with pytest.raises(StoreError, match=r"splits \['dev'\] are not in .*splits \['train', 'validation'\]"):
        export_webdataset(store, str(tmp_path / "x"), splits=["dev"])
    with pytest.raises(StoreError, match=r"layers \[7\] are not in .*layers \[0, 3\]"):
        export_webdataset(store, str(tmp_path / "x"), layers=[7])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old-000000.tar").write_bytes(b"")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export_webdataset(store, str(tmp_path / "full"))


def test_example_ids_with_dots_become_escaped_keys_and_reserved_ids_are_refused(tmp_path):
    store = FeatureStore.create(str(tmp_path / "s.zarr"), layers=[0], layer_widths=[4], dtype="float32",
                                label_names=[], provenance={})
    writer = store.part_writer("train", 0, n_examples=2, n_tokens=3, source_start=0)
    writer.append({0: torch.arange(12.0).view(3, 4)})
    writer.finish(["cats/file.1.png", "50%.txt"], [-1, -1], [2, 1])
    (shard,) = export_webdataset(store, str(tmp_path / "out"))
    with tarfile.open(shard) as tar:
        names = sorted(tar.getnames())
        documents = [json.loads(tar.extractfile(n).read()) for n in names if n.endswith(".json")]
    assert names == ["50%25%2Etxt.json", "50%25%2Etxt.layer_000.npy",
                     "cats/file%2E1%2Epng.json", "cats/file%2E1%2Epng.layer_000.npy"]
    assert sorted(d["example_id"] for d in documents) == ["50%.txt", "cats/file.1.png"]

    bad = FeatureStore.create(str(tmp_path / "b.zarr"), layers=[0], layer_widths=[4], dtype="float32",
                              label_names=[], provenance={})
    writer = bad.part_writer("train", 0, n_examples=1, n_tokens=2, source_start=0)
    writer.append({0: torch.zeros(2, 4)})
    writer.finish(["__key__"], [-1], [2])
    with pytest.raises(ValueError, match=r"'__key__' .* cannot be a webdataset key"):
        export_webdataset(bad, str(tmp_path / "out2"))
