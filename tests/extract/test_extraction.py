"""run_extraction with a tiny random BERT: contents equal a live forward, provenance, layer subsets, resume."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from conftest import make_text_csv
from unipt.extract import (
    BackboneConfig,
    ExtractConfig,
    SourceConfig,
    TextEncoder,
    hash_unit,
    load_source,
    plan_source,
    run_extraction,
)
from unipt.store import FeatureStore, PartWriter, ProvenanceMismatch, layer_key

PART_SIZE = 16
BATCH_SIZE = 5


def sha256_of(folder: Path, names) -> str:
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(name.encode())
        h.update((folder / name).read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def csv_path(tmp_path_factory) -> Path:
    return make_text_csv(tmp_path_factory.mktemp("src") / "texts.csv")


@pytest.fixture(scope="module")
def source(csv_path) -> SourceConfig:
    return SourceConfig(path=str(csv_path))


@pytest.fixture(scope="module")
def live(tiny_bert_dir):
    """The same backbone, loaded independently of unipt."""
    return AutoModel.from_pretrained(tiny_bert_dir).eval(), AutoTokenizer.from_pretrained(tiny_bert_dir)


def extract(source, backbone, encoder, url, **config):
    config = {"part_size": PART_SIZE, "batch_size": BATCH_SIZE, **config}
    return run_extraction(source, backbone, ExtractConfig(**config), str(url), progress=False, encoder=encoder)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, source, backbone, encoder):
    """A float32 and a float16 extraction of every split of the CSV."""
    root = tmp_path_factory.mktemp("stores")
    out = {}
    for dtype in ("float32", "float16"):
        url = root / f"{dtype}.zarr"
        summary = extract(source, backbone, encoder, url, dtype=dtype)
        out[dtype] = (summary, FeatureStore.open(str(url)))
    return out


def live_hidden(live, text):
    model, tokenizer = live
    batch = tokenizer([text], return_tensors="pt", truncation=True, max_length=128)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    return [h[0] for h in out.hidden_states]  # (n, D) per hidden state, no padding


def all_examples(store, split):
    """(example_id, label, length, {layer: rows}) of every stored example of ``split``, in store order."""
    out = []
    for info in store.parts(split):
        data = store.read_part(info)
        for i in range(info.n_examples):
            out.append((data.example_id[i], int(data.label[i]), int(data.length[i]),
                        {l: data.layers[l][data.offsets[i]:data.offsets[i + 1]] for l in data.layers}))
    return out


# --------------------------------------------------------------------------- a full run
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_extraction_counts_splits_and_parts(runs, source, live, dtype):
    summary, store = runs[dtype]
    data = load_source(source)
    tokenizer = live[1]
    assert store.dtype == dtype
    assert store.splits() == sorted(data.splits) == ["test", "train", "validation"]
    assert store.label_names == data.label_names == ["negative", "neutral", "positive"]
    assert store.layers == [0, 1, 2] and store.layer_widths == {0: 32, 1: 32, 2: 32}
    n_parts = 0
    for split, examples in data.splits.items():
        expected_tokens = sum(len(tokenizer(ex.text)["input_ids"]) for ex in examples)
        assert summary.examples[split] == len(examples) == store.num_examples(split)
        assert summary.tokens[split] == expected_tokens == store.num_tokens(split)
        parts = store.parts(split)
        assert len(parts) == math.ceil(len(examples) / PART_SIZE)
        n_parts += len(parts)
        stored_ids = []
        # Part order: the split's examples sorted by a hash of their ids (so a part is a random sample).
        in_part_order = sorted(examples, key=lambda ex: hash_unit(ex.id, "part"))
        for info in parts:
            assert info.source_start == info.index * PART_SIZE
            assert info.source_stop == min(info.source_start + PART_SIZE, len(examples))
            part = store.read_part(info)
            # a part holds exactly its range of the split in part order ...
            block = in_part_order[info.source_start : info.source_stop]
            assert sorted(part.example_id) == sorted(ex.id for ex in block)
            by_id = {ex.id: ex for ex in block}
            assert [by_id[i].label for i in part.example_id] == part.label.tolist()
            assert [len(tokenizer(by_id[i].text)["input_ids"]) for i in part.example_id] == part.length.tolist()
            # ... stored longest-first
            assert list(part.length) == sorted(part.length, reverse=True)
            assert part.length[0] > part.length[-1]
            stored_ids.extend(part.example_id)
        assert sorted(stored_ids) == sorted(ex.id for ex in examples)
    assert summary.parts_written == n_parts and summary.parts_skipped == 0
    assert len(store.parts("train")) >= 4


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_stored_rows_equal_a_live_forward(runs, source, live, dtype):
    _, store = runs[dtype]
    data = load_source(source)
    for split, examples in data.splits.items():
        text = {ex.id: ex.text for ex in examples}
        stored = all_examples(store, split)
        # one long and one short example per split (they sat in differently padded batches)
        for example_id, _, length, rows in (stored[0], stored[-1]):
            hidden = live_hidden(live, text[example_id])
            assert len(hidden) == 3
            for layer in store.layers:
                assert rows[layer].shape == (length, 32) == hidden[layer].shape
                if dtype == "float32":
                    assert rows[layer].dtype == torch.float32
                    torch.testing.assert_close(rows[layer], hidden[layer], atol=1e-6, rtol=0)
                else:
                    assert rows[layer].dtype == torch.float16
                    torch.testing.assert_close(rows[layer].float(), hidden[layer], atol=1e-5, rtol=2**-10)
            assert not torch.equal(rows[0], rows[2])  # layers are really different arrays


def test_provenance_is_recorded(runs, source, csv_path, tiny_bert_dir):
    _, store = runs["float16"]
    prov = store.provenance
    files = [p.name for p in Path(tiny_bert_dir).iterdir() if p.is_file()]
    weights = [n for n in files if n.endswith(".safetensors")] + ["config.json"]
    tokenizer_files = [n for n in files if n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                                                "special_tokens_map.json")]
    assert "model.safetensors" in weights and "vocab.txt" in tokenizer_files
    assert prov["backbone"]["weights_sha256"] == sha256_of(Path(tiny_bert_dir), weights)
    assert prov["backbone"]["tokenizer_sha256"] == sha256_of(Path(tiny_bert_dir), tokenizer_files)
    assert prov["backbone"]["architecture"] == "BertModel"
    assert prov["backbone"]["num_hidden_states"] == 3 and prov["backbone"]["hidden_size"] == 32
    assert prov["extraction"]["layers"] == [0, 1, 2]
    assert prov["extraction"]["dtype"] == "float16"
    assert prov["extraction"]["part_size"] == PART_SIZE
    # The fingerprint is of the rows as read (sha256 over the pieces' sha256), not of the file's path or bytes.
    assert prov["source"]["fingerprint"] == plan_source(source, part_size=PART_SIZE).fingerprint
    assert prov["source"]["fingerprint"] == store.source_version()["fingerprint"]
    edited = csv_path.parent / "edited.csv"
    edited.write_text(csv_path.read_text() + "one more row,positive\n")
    assert plan_source(SourceConfig(path=str(edited)), part_size=PART_SIZE).fingerprint != prov["source"]["fingerprint"]
    assert prov["source"]["text_column"] == "text" and prov["source"]["label_column"] == "label"
    versions = prov["versions"]
    assert {"python", "torch", "transformers", "zarr", "numcodecs"} <= set(versions)
    assert versions["torch"] == torch.__version__
    assert runs["float32"][1].provenance["extraction"]["dtype"] == "float32"


def test_weights_hash_depends_on_weights_only(tmp_path, tiny_bert_dir):
    from conftest import make_tiny_bert

    other = TextEncoder(BackboneConfig(model=str(make_tiny_bert(tmp_path / "other", seed=1)), device="cpu"))
    same = TextEncoder(BackboneConfig(model=str(make_tiny_bert(tmp_path / "same", seed=0)), device="cpu"))
    base = TextEncoder(BackboneConfig(model=str(tiny_bert_dir), device="cpu")).provenance()
    assert other.provenance()["weights_sha256"] != base["weights_sha256"]
    assert other.provenance()["tokenizer_sha256"] == base["tokenizer_sha256"]
    assert same.provenance()["weights_sha256"] == base["weights_sha256"]  # content, not location


# --------------------------------------------------------------------------- layer subset
def test_layer_subset_stores_only_those_layers(tmp_path, runs, source, backbone, encoder):
    url = tmp_path / "subset.zarr"
    summary = extract(source, backbone, encoder, url, dtype="float32", layers=[0, -1], splits=["validation"])
    store = FeatureStore.open(str(url))
    assert store.layers == [0, 2]
    assert store.provenance["extraction"]["layers"] == [0, 2]
    assert store.splits() == ["validation"] and set(summary.examples) == {"validation"}
    info = store.parts("validation")[0]
    data = store.read_part(info)
    assert sorted(data.layers) == [0, 2]
    part_dir = url / "validation" / info.name
    assert (part_dir / layer_key(0)).is_dir() and (part_dir / layer_key(2)).is_dir()
    assert not (part_dir / layer_key(1)).exists()
    full = runs["float32"][1].read_part(info)
    assert list(full.example_id) == list(data.example_id)
    for layer in (0, 2):
        torch.testing.assert_close(data.layers[layer], full.layers[layer], atol=1e-6, rtol=0)


def test_bad_layer_selection_is_refused(tmp_path, source, backbone, encoder):
    with pytest.raises(ValueError, match="out of range"):
        extract(source, backbone, encoder, tmp_path / "a.zarr", layers=[0, 5])
    with pytest.raises(ValueError, match="increasing and distinct"):
        extract(source, backbone, encoder, tmp_path / "b.zarr", layers=[2, 0])
    with pytest.raises(ValueError, match=r"names \['dev'\]"):
        extract(source, backbone, encoder, tmp_path / "c.zarr", splits=["dev"])
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "c.zarr").exists()


# --------------------------------------------------------------------------- resume
def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def test_interrupted_extraction_resumes_to_the_same_store(tmp_path, runs, source, backbone, encoder, monkeypatch):
    url = tmp_path / "resumed.zarr"
    calls = {"n": 0}
    original = PartWriter.finish

    def crash_on_third(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash while committing")
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(PartWriter, "finish", crash_on_third)
        with pytest.raises(RuntimeError, match="simulated crash"):
            extract(source, backbone, encoder, url, dtype="float32")

    store = FeatureStore.open(str(url))
    assert [p.name for p in store.parts("train")] == ["part-000000", "part-000001"]
    assert (url / "train" / "part-000002").is_dir()  # written but never committed
    assert store.parts("validation") == [] and store.parts("test") == []
    # nothing queued after the failure was written
    assert not (url / "train" / "part-000003").exists()

    before = {name: snapshot(url / "train" / name) for name in ("part-000000", "part-000001")}
    assert all(before.values())
    summary = extract(source, backbone, encoder, url, dtype="float32")
    _, reference = runs["float32"]
    total_parts = sum(len(reference.parts(s)) for s in reference.splits())
    assert summary.parts_skipped == 2
    assert summary.parts_written == total_parts - 2
    assert summary.examples["train"] == reference.num_examples("train") - 2 * PART_SIZE
    for name, files in before.items():
        assert snapshot(url / "train" / name) == files  # committed parts were not rewritten

    resumed = FeatureStore.open(str(url))
    assert resumed.splits() == reference.splits()
    for split in reference.splits():
        assert [p.name for p in resumed.parts(split)] == [p.name for p in reference.parts(split)]
        got, want = all_examples(resumed, split), all_examples(reference, split)
        assert [g[:3] for g in got] == [w[:3] for w in want]
        for g, w in zip(got, want):
            for layer in reference.layers:
                assert torch.equal(g[3][layer], w[3][layer])


def test_rerunning_a_complete_extraction_writes_nothing(tmp_path, source, backbone, encoder):
    url = tmp_path / "done.zarr"
    first = extract(source, backbone, encoder, url, dtype="float16", splits=["validation", "test"])
    before = snapshot(url / "test")
    again = extract(source, backbone, encoder, url, dtype="float16", splits=["validation", "test"])
    assert first.parts_written >= 2
    assert again.parts_written == 0
    assert again.parts_skipped == first.parts_written
    assert again.examples == {} and again.tokens == {}
    assert snapshot(url / "test") == before


def test_rerun_with_other_dtype_or_layers_is_refused(tmp_path, source, backbone, encoder):
    url = tmp_path / "fixed.zarr"
    extract(source, backbone, encoder, url, dtype="float16", splits=["test"])
    before = snapshot(url)
    with pytest.raises(ProvenanceMismatch, match="dtype") as info:
        extract(source, backbone, encoder, url, dtype="float32", splits=["test"])
    assert "'float16'" in str(info.value) and "'float32'" in str(info.value)
    with pytest.raises(ProvenanceMismatch, match=r"layers: expected \[0, 1, 2\], found \[0, 2\]"):
        extract(source, backbone, encoder, url, dtype="float16", layers=[0, 2], splits=["test"])
    with pytest.raises(ProvenanceMismatch, match="part_size"):
        extract(source, backbone, encoder, url, dtype="float16", part_size=PART_SIZE + 1, splits=["test"])
    assert snapshot(url) == before


def test_rerun_from_a_moved_source_resumes(tmp_path, csv_path, backbone, encoder):
    url = tmp_path / "moved.zarr"
    extract(SourceConfig(path=str(csv_path)), backbone, encoder, url, dtype="float16", splits=["test"])
    moved = tmp_path / "copy.csv"
    moved.write_bytes(Path(csv_path).read_bytes())
    again = extract(SourceConfig(path=str(moved)), backbone, encoder, url, dtype="float16", splits=["test"])
    assert again.parts_written == 0 and again.parts_skipped >= 1
    # Rows appended: the store grows (tests/extract/test_streamed_sources.py); a row edited in place is refused.
    lines = Path(csv_path).read_text().splitlines(keepends=True)
    edited = tmp_path / "edited.csv"
    edited.write_text("".join(lines[:5]) + "new words here,positive\n" + "".join(lines[6:]))
    with pytest.raises(ValueError, match="changed since this store extracted them"):
        extract(SourceConfig(path=str(edited)), backbone, encoder, url, dtype="float16", splits=["test"])


def test_float16_overflow_during_extraction_commits_nothing(tmp_path, source, backbone, encoder, monkeypatch):
    real = encoder.hidden_states

    def exploding(features):
        hidden, mask = real(features)
        return tuple(h * 1e5 if i == 1 else h for i, h in enumerate(hidden)), mask

    monkeypatch.setattr(encoder, "hidden_states", exploding)
    url = tmp_path / "overflow.zarr"
    with pytest.raises(OverflowError, match="layer 1.*float32"):
        extract(source, backbone, encoder, url, dtype="float16", splits=["test"])
    assert FeatureStore.open(str(url)).parts("test") == []


def test_parts_of_a_label_sorted_source_are_random_samples(tiny_bert_dir, tmp_path):
    """A source sorted by label (as the demo's tweets are) still gives parts that mix the classes: parts take
    the split's examples in hash order, not source order, so a stream loader's small buffer still shuffles."""
    import csv

    rows = list(csv.DictReader(make_text_csv(tmp_path / "texts.csv", n=240).open()))
    rows.sort(key=lambda r: r["label"])
    with (tmp_path / "sorted.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    run_extraction(SourceConfig(path=str(tmp_path / "sorted.csv"), splits={"train": 1.0}),
                   BackboneConfig(model=str(tiny_bert_dir), device="cpu"), ExtractConfig(part_size=24),
                   str(tmp_path / "s.zarr"), progress=False)
    store = FeatureStore.open(str(tmp_path / "s.zarr"))
    labels = [set(store.read_part(info, layers=[]).label.tolist()) for info in store.parts("train")]
    assert len(labels) == 10 and all(len(found) == 3 for found in labels)
    assert store.provenance["extraction"]["part_order"] == "piece-hash"
