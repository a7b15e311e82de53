"""Streamed, sharded sources: planned and read piece by piece, equal to reading the source into memory,
flat in memory, deduplicated across shards, and growing stores that extract only what is new."""

from __future__ import annotations

import csv
import json
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from conftest import LABELS, WORDS
from unipt.extract import ExtractConfig, SourceConfig, hash_unit, load_source, plan_source, run_extraction
from unipt.store import FeatureStore
from unipt.train import TrainConfig
from unipt.train._trainer import parts_used

PART_SIZE = 16
BLOCK_ROWS = 64


def make_rows(n: int, *, seed: int = 0, duplicates: int = 0) -> list[dict]:
    """``n`` rows of short texts and labels; ``duplicates`` of them repeat an earlier row's text."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if duplicates and i > 10 and i % max(1, n // duplicates) == 0:
            rows.append({"text": rows[rng.randrange(i)]["text"], "label": rng.choice(LABELS)})
            continue
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 8))]
        rows.append({"text": " ".join(words) + f" {seed}.{i}", "label": rng.choice(LABELS)})
    return rows


def write(path: Path, rows: list[dict], fmt: str, row_group: int = 37) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group)
    return path


def reference_parts(shards: list[list[dict]], splits: dict[str, float]) -> dict[str, list[list[str]]]:
    """The parts' example ids, computed here from the rules alone with every row in memory: pieces of
    BLOCK_ROWS rows per shard, first occurrence of a text kept across all pieces, split by the id's hash,
    hash order inside each piece, parts of PART_SIZE numbered on across pieces."""
    from unipt.extract import text_id

    cuts, total = [], 0.0
    for name, fraction in splits.items():
        total += fraction
        cuts.append((name, total))
    seen, out = set(), {name: [] for name in splits}
    for rows in shards:
        for start in range(0, len(rows), BLOCK_ROWS):
            by_split: dict[str, list[str]] = {}
            for row in rows[start : start + BLOCK_ROWS]:
                if row["text"] in seen:
                    continue
                seen.add(row["text"])
                example_id = text_id(row["text"])
                u = hash_unit(example_id, "split")
                split = next((name for name, cut in cuts if u < cut), cuts[-1][0])
                by_split.setdefault(split, []).append(example_id)
            for split, ids in by_split.items():
                ids.sort(key=lambda i: hash_unit(i, "part"))
                out[split] += [ids[k : k + PART_SIZE] for k in range(0, len(ids), PART_SIZE)]
    return out


def extract(source: SourceConfig, backbone, encoder, url, **config):
    config = {"part_size": PART_SIZE, "batch_size": 8, "block_rows": BLOCK_ROWS, "layers": [0, -1], **config}
    return run_extraction(source, backbone, ExtractConfig(**config), str(url), progress=False, encoder=encoder)


def stored_parts(url) -> dict[str, list[list[str]]]:
    store = FeatureStore.open(str(url))
    return {split: [list(store.read_part(info, layers=[]).example_id) for info in store.parts(split)]
            for split in store.splits()}


def test_streamed_store_follows_the_rules_and_the_format_does_not_matter(tmp_path, backbone, encoder):
    """Three shards (with texts repeated within and across them) as CSV, JSONL and Parquet folders: each store
    holds exactly the parts the rules give, computed here in memory, whatever the format or row groups."""
    shards = [make_rows(150, seed=s, duplicates=12) for s in range(3)]
    shards[2][5] = dict(shards[0][3])  # a text of shard 0 again in shard 2: dropped there
    splits = {"train": 0.7, "validation": 0.15, "test": 0.15}
    expected = reference_parts(shards, splits)
    stores = {}
    for fmt in ("csv", "jsonl", "parquet"):
        folder = tmp_path / fmt
        for i, rows in enumerate(shards):
            write(folder / f"shard-{i:02d}.{fmt}", rows, fmt)
        summary = extract(SourceConfig(path=str(folder), splits=splits), backbone, encoder, tmp_path / f"{fmt}.zarr")
        stores[fmt] = stored_parts(tmp_path / f"{fmt}.zarr")
        parts = {split: [sorted(p) for p in ps] for split, ps in stores[fmt].items()}
        assert parts == {split: [sorted(p) for p in ps] for split, ps in expected.items()}, fmt
        assert summary.parts_written == sum(len(p) for p in expected.values())
        version = FeatureStore.open(str(tmp_path / f"{fmt}.zarr")).source_version()
        assert len(version["pieces"]) == 9 and version["stats"]["duplicates_dropped"] >= 13
    assert stores["csv"] == stores["jsonl"] == stores["parquet"]  # the same parts, in the same storage order


def test_one_piece_store_equals_the_in_memory_store(tmp_path, backbone, encoder):
    """A source of one piece, streamed, gives the store that the whole source read into memory gives: the same
    parts with the same ids, targets and activations, bit for bit."""
    path = write(tmp_path / "texts.parquet", make_rows(200, duplicates=10), "parquet", row_group=13)
    source = SourceConfig(path=str(path))
    extract(source, backbone, encoder, tmp_path / "streamed.zarr", block_rows=1000)
    run_extraction(source, backbone, ExtractConfig(part_size=PART_SIZE, batch_size=8, layers=[0, -1]),
                   str(tmp_path / "memory.zarr"), progress=False, encoder=encoder, data=load_source(source))
    streamed, memory = FeatureStore.open(str(tmp_path / "streamed.zarr")), FeatureStore.open(str(tmp_path / "memory.zarr"))
    assert memory.provenance["extraction"]["part_order"] == "hash"
    assert streamed.provenance["extraction"]["part_order"] == "piece-hash"
    assert streamed.label_names == memory.label_names and streamed.splits() == memory.splits()
    for split in memory.splits():
        assert [p.name for p in streamed.parts(split)] == [p.name for p in memory.parts(split)]
        for a, b in zip(streamed.parts(split), memory.parts(split)):
            assert (a.n_examples, a.n_tokens, a.source_start) == (b.n_examples, b.n_tokens, b.source_start)
            pa, pb = streamed.read_part(a), memory.read_part(b)
            assert list(pa.example_id) == list(pb.example_id)
            assert np.array_equal(pa.label, pb.label) and np.array_equal(pa.length, pb.length)
            for layer in memory.layers:
                assert np.array_equal(pa.layers[layer].numpy(), pb.layers[layer].numpy())


def test_planning_memory_is_flat_in_the_source_length(tmp_path):
    """Planning 4x more rows peaks at about the same traced memory: pieces are read one at a time and the
    texts seen are kept on disk, not in a Python set."""
    peaks = {}
    for n in (6_000, 24_000):
        path = write(tmp_path / f"{n}.csv", make_rows(n), "csv")
        tracemalloc.start()
        plan = plan_source(SourceConfig(path=str(path)), part_size=PART_SIZE, block_rows=2_000)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert sum(p["examples"] for p in plan.plan.values()) == n and len(plan.pieces) == n // 2_000
    assert peaks[24_000] < 1.3 * peaks[6_000], peaks


def test_caps_over_a_streamed_source_keep_the_in_memory_subset(tmp_path):
    path = write(tmp_path / "texts.jsonl", make_rows(300), "jsonl")
    source = SourceConfig(path=str(path), max_examples={"train": 50})
    plan = plan_source(source, part_size=PART_SIZE, block_rows=BLOCK_ROWS)
    streamed = {ex.id for task in plan.tasks(["train"]) for ex in task.examples}
    assert streamed == {ex.id for ex in load_source(source).splits["train"]} and len(streamed) == 50


def test_a_webdataset_key_repeated_in_another_shard_is_refused(tmp_path):
    import io
    import tarfile

    for shard, keys in (("a.tar", ["k1", "k2"]), ("b.tar", ["k3", "k1"])):
        with tarfile.open(tmp_path / shard, "w") as tar:
            for key in keys:
                for ext, value in (("txt", f"text of {key} in {shard}"), ("cls", "pos")):
                    data = value.encode()
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="'k1' occurs twice .*a.tar and b.tar"):
        plan_source(SourceConfig(path=str(tmp_path), label_column="cls", text_column="txt"), part_size=PART_SIZE)


def test_a_grown_source_adds_only_new_parts(tmp_path, backbone, encoder):
    """Rows appended to a shard and a new shard: only the new pieces' parts are extracted, committed parts are
    untouched, both source versions are recorded, and a reader opened before keeps the parts it saw."""
    folder = tmp_path / "src"
    first = [make_rows(100, seed=1), make_rows(90, seed=2)]
    for i, rows in enumerate(first):
        write(folder / f"s{i}.jsonl", rows, "jsonl")
    url = tmp_path / "grow.zarr"
    before = extract(SourceConfig(path=str(folder)), backbone, encoder, url)
    reader = FeatureStore.open(str(url))
    seen_before = {split: [(p.name, p.n_examples) for p in reader.parts(split)] for split in reader.splits()}
    commits = _commit_records(url)
    used_before = parts_used(reader, TrainConfig())
    opened_before = FeatureStore.open(str(url))  # opened before the growth, its parts first read after it

    grown = [first[0] + make_rows(40, seed=3), first[1]]
    write(folder / "s0.jsonl", grown[0], "jsonl")
    new_shard = make_rows(70, seed=4)
    write(folder / "s2.jsonl", new_shard, "jsonl")
    after = extract(SourceConfig(path=str(folder)), backbone, encoder, url)

    store = FeatureStore.open(str(url))
    version = store.source_version()
    assert version["version"] == 2 and len(version["pieces"]) == 2 + 2 + 1 + 2  # s0: 2+1, s1: 2, s2: 2 pieces
    total = sum(p["parts"] for p in version["plan"].values())
    assert after.parts_skipped == before.parts_written and after.parts_written == total - before.parts_written
    assert all(_commit_records(url)[key] == record for key, record in commits.items())  # committed: untouched
    new_ids = {ex.id for rows in (grown[0][100:], new_shard) for ex in
               load_source(SourceConfig(path=str(write(tmp_path / "new.jsonl", rows, "jsonl")))).splits["train"]}
    written = {split: {i for p in parts[len(seen_before.get(split, [])):] for i in p}
               for split, parts in stored_parts(url).items()}
    assert new_ids <= written["train"]  # the new train examples are in the new parts (and only new parts were added)
    assert {split: [(p.name, p.n_examples) for p in reader.parts(split)] for split in reader.splits()} == seen_before
    assert reader.source_version()["version"] == 1  # the reader keeps the version it opened
    assert {split: [(p.name, p.n_examples) for p in opened_before.parts(split)] for split in seen_before} == seen_before
    # What a training run records of the parts it read: the reader's are those of version 1, a new reader's more.
    assert parts_used(reader, TrainConfig()) == used_before and used_before["train"]["source_version"] == 1
    used_after = parts_used(store, TrainConfig())
    assert used_after["train"]["source_version"] == 2 and used_after["train"]["sha256"] != used_before["train"]["sha256"]
    again = extract(SourceConfig(path=str(folder)), backbone, encoder, url)
    assert again.parts_written == 0 and FeatureStore.open(str(url)).source_version()["version"] == 2


def test_growth_that_is_not_an_append_is_refused(tmp_path, backbone, encoder):
    folder = tmp_path / "src"
    rows = make_rows(80)
    write(folder / "s0.csv", rows, "csv")
    url = tmp_path / "s.zarr"
    extract(SourceConfig(path=str(folder)), backbone, encoder, url)
    write(folder / "s0.csv", rows[:40] + [{"text": "an edited row", "label": "positive"}] + rows[41:], "csv")
    with pytest.raises(ValueError, match="rows 0..63 of shard s0.csv changed since this store extracted them"):
        extract(SourceConfig(path=str(folder)), backbone, encoder, url)
    (folder / "s0.csv").rename(folder / "renamed.csv")
    with pytest.raises(ValueError, match=r"no longer has shard\(s\) \['s0.csv'\]"):
        extract(SourceConfig(path=str(folder)), backbone, encoder, url)
    capped = tmp_path / "capped.csv"
    write(capped, rows, "csv")
    extract(SourceConfig(path=str(capped), max_examples={"train": 20}), backbone, encoder, tmp_path / "c.zarr")
    write(capped, rows + make_rows(10, seed=9), "csv")
    with pytest.raises(ValueError, match="has grown by 1 piece.*caps"):
        extract(SourceConfig(path=str(capped), max_examples={"train": 20}), backbone, encoder, tmp_path / "c.zarr")


def _commit_records(url) -> dict[str, str]:
    store = FeatureStore.open(str(url))
    out = {}
    for split in store.splits():
        for info in store.parts(split):
            document = json.loads((Path(url) / split / info.name / "zarr.json").read_text())
            out[f"{split}/{info.name}"] = document["attributes"]["unipt_commit"]["record_sha256"]
    return out


def test_a_datasets_folder_is_read_arrow_file_by_arrow_file(tmp_path):
    """A DatasetDict saved in several Arrow shards per split: each file is a shard, its rows keep the split
    they came with, and the examples are those of the in-memory reader."""
    datasets = pytest.importorskip("datasets")
    parts = {"train": make_rows(120, seed=5), "test": make_rows(40, seed=6)}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in parts.items()}).save_to_disk(
        str(tmp_path / "hf"), num_shards={"train": 3, "test": 2})
    source = SourceConfig(path=str(tmp_path / "hf"))
    plan = plan_source(source, part_size=PART_SIZE, block_rows=BLOCK_ROWS)
    assert sorted({piece.shard.split("/")[0] for piece in plan.pieces}) == ["test", "train"]
    assert len({piece.shard for piece in plan.pieces}) == 5
    memory = load_source(source)
    for split in ("train", "test"):
        streamed = {ex.id: ex.label for task in plan.tasks([split]) for ex in task.examples}
        assert streamed == {ex.id: ex.label for ex in memory.splits[split]}
