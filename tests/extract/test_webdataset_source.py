"""webdataset tar shards as a source: members and json fields, shard lists, key ids, errors, extraction."""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import pytest

wds = pytest.importorskip("webdataset")

from conftest import WORDS  # noqa: E402
from unipt.extract import BackboneConfig, ExtractConfig, SourceConfig, hash_unit, load_source, plan_source, run_extraction  # noqa: E402
from unipt.extract._sources import source_format, webdataset_shards  # noqa: E402
from unipt.store import FeatureStore  # noqa: E402

TOPICS = ("sport", "tech", "world")
N_SAMPLES, PER_SHARD = 60, 25  # three shards: 25 + 25 + 10


def make_samples(n: int = N_SAMPLES, seed: int = 0) -> list[dict]:
    """Distinct texts with a class index, a topic name, an own id and a split name."""
    rng = random.Random(seed)
    samples, seen = [], set()
    while len(samples) < n:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))
        if text in seen:
            continue
        seen.add(text)
        i = len(samples)
        samples.append({"key": f"sample{i:05d}", "text": text, "cls": i % 3, "topic": TOPICS[(i * 7) % 3],
                        "uid": f"uid-{1000 + i}", "split": "train" if i % 4 else "test"})
    return samples


def write_shards(folder: Path, samples: list[dict], member: str, per_shard: int = PER_SHARD) -> list[Path]:
    """Write ``samples`` as webdataset shards ``folder/shard-00000N.tar``.

    member="txt": <key>.txt + <key>.cls members; "json": one <key>.json member with every field;
    "mixed": <key>.txt + <key>.json holding the other fields.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, len(samples), per_shard)):
        path = folder / f"shard-{shard:06d}.tar"
        with wds.TarWriter(str(path), mtime=0) as writer:
            for s in samples[start : start + per_shard]:
                fields = {"caption": s["text"], "topic": s["topic"], "uid": s["uid"], "split": s["split"]}
                if member == "txt":
                    writer.write({"__key__": s["key"], "txt": s["text"], "cls": s["cls"]})
                elif member == "json":
                    writer.write({"__key__": s["key"], "json": fields})
                else:
                    writer.write({"__key__": s["key"], "txt": s["text"], "json": fields})
        paths.append(path)
    return paths


def as_tuples(data) -> dict[str, list[tuple[str, str, int]]]:
    return {name: [(ex.id, ex.text, ex.label) for ex in examples] for name, examples in data.splits.items()}


def hash_splits(samples: list[dict], label_of) -> dict[str, list[tuple[str, str, int]]]:
    """The expected splits, computed independently: the default 0.8/0.1/0.1 cut of hash_unit(key)."""
    out: dict[str, list] = {}
    for s in samples:
        u = hash_unit(s["key"], "split")
        split = "train" if u < 0.8 else "validation" if u < 0.9 else "test"
        out.setdefault(split, []).append((s["key"], s["text"], label_of(s)))
    return out


@pytest.fixture(scope="module")
def samples():
    return make_samples()


@pytest.fixture(scope="module")
def txt_shards(tmp_path_factory, samples) -> list[Path]:
    return write_shards(tmp_path_factory.mktemp("wds-txt"), samples, "txt")


# --------------------------------------------------------------------------- reading
def test_txt_and_cls_members_from_folder_pattern_and_file(txt_shards, samples):
    folder = txt_shards[0].parent
    config = dict(text_column="txt", label_column="cls")
    from_folder = load_source(SourceConfig(path=str(folder), **config))
    from_pattern = load_source(SourceConfig(path=str(folder / "shard-{000000..000002}.tar"), **config))
    assert as_tuples(from_folder) == as_tuples(from_pattern)
    assert from_folder.fingerprint == from_pattern.fingerprint
    assert from_folder.label_names == ["0", "1", "2"]
    assert as_tuples(from_folder) == hash_splits(samples, lambda s: s["cls"])  # ids = the sample keys
    assert from_folder.stats["rows"] == N_SAMPLES

    single = load_source(SourceConfig(path=str(txt_shards[0]), **config))
    assert sorted(ex.id for split in single.splits.values() for ex in split) == [s["key"] for s in samples[:PER_SHARD]]


def test_fingerprint_hashes_shard_content_in_name_order_not_paths(txt_shards, tmp_path):
    expected = hashlib.sha256(b"".join(p.read_bytes() for p in txt_shards)).hexdigest()
    copy = tmp_path / "elsewhere"
    shutil.copytree(txt_shards[0].parent, copy)
    config = dict(text_column="txt", label_column="cls")
    assert load_source(SourceConfig(path=str(copy), **config)).fingerprint == expected
    assert load_source(SourceConfig(path=str(txt_shards[0].parent), **config)).fingerprint == expected
    assert load_source(SourceConfig(path=str(txt_shards[0]), **config)).fingerprint == hashlib.sha256(
        txt_shards[0].read_bytes()).hexdigest()


def test_json_fields_and_mixed_members(tmp_path, samples):
    topic = lambda s: TOPICS.index(s["topic"])  # noqa: E731 (label names are the sorted topics)
    from_json = load_source(SourceConfig(path=str(write_shards(tmp_path / "j", samples, "json")[0].parent),
                                         text_column="caption", label_column="topic"))
    assert from_json.label_names == list(TOPICS)
    assert as_tuples(from_json) == hash_splits(samples, topic)

    mixed = load_source(SourceConfig(path=str(write_shards(tmp_path / "m", samples, "mixed")[0].parent),
                                     text_column="txt", label_column="topic"))
    assert as_tuples(mixed) == as_tuples(from_json)


def test_id_and_split_columns_from_json_fields(tmp_path, samples):
    folder = write_shards(tmp_path / "j", samples, "json")[0].parent
    data = load_source(SourceConfig(path=str(folder), text_column="caption", label_column=None,
                                    id_column="uid", split_column="split"))
    assert data.label_names == []
    expected: dict[str, list] = {}
    for s in samples:
        expected.setdefault(s["split"], []).append((s["uid"], s["text"], -1))
    assert as_tuples(data) == expected


def test_format_detection(txt_shards, tmp_path):
    auto = SourceConfig(path="x")
    folder = txt_shards[0].parent
    assert source_format(auto, str(txt_shards[0])) == "webdataset"
    assert source_format(auto, str(folder / "shard-{000000..000002}.tar")) == "webdataset"
    assert source_format(auto, str(folder)) == "webdataset"
    (tmp_path / "not-shards").mkdir()
    assert source_format(auto, str(tmp_path / "not-shards")) == "hf"  # a folder without tars stays hf
    assert webdataset_shards(str(folder)) == [str(p) for p in txt_shards]


def test_other_formats_still_read(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\nhello there,a\ngood movie,b\n")
    data = load_source(SourceConfig(path=str(path), splits={"train": 1.0}))
    assert [ex.text for ex in data.splits["train"]] == ["hello there", "good movie"]
    assert data.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- errors
def test_missing_member_names_the_sample_key(tmp_path, samples):
    folder = tmp_path / "broken"
    folder.mkdir()
    with wds.TarWriter(str(folder / "shard-000000.tar")) as writer:
        writer.write({"__key__": "good0001", "txt": "good movie", "cls": 1})
        writer.write({"__key__": "nolabel7", "txt": "bad movie"})
    with pytest.raises(ValueError, match=r"nolabel7.*no 'cls' member.*members \['txt'\]"):
        load_source(SourceConfig(path=str(folder), text_column="txt", label_column="cls"))
    with pytest.raises(KeyError, match=r"good0001.*no 'text' member.*members \['cls', 'txt'\]"):
        load_source(SourceConfig(path=str(folder), text_column="text", label_column="cls"))


def test_missing_shard_duplicate_key_and_empty_folder(tmp_path, txt_shards):
    folder = txt_shards[0].parent
    with pytest.raises(FileNotFoundError, match="1 of 4 shard files do not exist"):
        load_source(SourceConfig(path=str(folder / "shard-{000000..000003}.tar"), text_column="txt",
                                 label_column="cls"))
    with pytest.raises(ValueError, match="'sample00000' occurs twice"):
        load_source(SourceConfig(path=str(folder / "shard-{000000,000000}.tar"), text_column="txt",
                                 label_column="cls"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no \*\.tar shards"):
        load_source(SourceConfig(path=str(tmp_path / "empty"), format="webdataset"))
    (tmp_path / "junk.tar").write_bytes(b"not a tar file " * 40)
    with pytest.raises(ValueError, match="junk.tar cannot be read"):
        load_source(SourceConfig(path=str(tmp_path / "junk.tar"), text_column="txt"))


# --------------------------------------------------------------------------- extraction
def test_extraction_from_shards_round_trips(tmp_path, tiny_bert_dir, txt_shards, samples):
    source = SourceConfig(path=str(txt_shards[0].parent / "shard-{000000..000002}.tar"), text_column="txt",
                          label_column="cls")
    summary = run_extraction(source, BackboneConfig(model=str(tiny_bert_dir), device="cpu"),
                             ExtractConfig(part_size=8, batch_size=4, dtype="float32"), str(tmp_path / "s.zarr"),
                             progress=False)
    data = load_source(source)
    store = FeatureStore.open(str(tmp_path / "s.zarr"))
    assert sum(summary.examples.values()) == N_SAMPLES
    # Each tar is a shard, read and planned by itself; the fingerprint is over its rows (streamed planning).
    assert store.provenance["source"]["fingerprint"] == plan_source(source, part_size=8).fingerprint
    assert [p[0] for p in store.source_version()["pieces"]] == [f"shard-{i:06d}.tar" for i in range(3)]
    cls = {s["key"]: str(s["cls"]) for s in samples}
    for split, examples in data.splits.items():
        assert store.num_examples(split) == len(examples) == summary.examples[split]
        stored = {}
        for part in store.parts(split):
            decoded = store.read_part(part, layers=[])
            stored.update(zip(decoded.example_id, decoded.label))
        assert set(stored) == {ex.id for ex in examples}
        assert all(store.label_names[label] == cls[key] for key, label in stored.items())
