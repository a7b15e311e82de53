"""Sources: every file format gives the same examples; dedupe, hash splits, hash subsets, errors, pkg://."""

from __future__ import annotations

import csv
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from unipt.extract import Example, SourceConfig, hash_unit, load_source, resolve_path, text_id

LABELS = ("negative", "neutral", "positive")


def make_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
    rows, seen = [], set()
    while len(rows) < n:
        text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 9)))
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": rng.choice(LABELS)})
    return rows


def write_csv(path: Path, rows, delimiter=",", fieldnames=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fieldnames), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def as_tuples(data) -> dict[str, list[tuple[str, str, int]]]:
    return {name: [(ex.id, ex.text, ex.label) for ex in examples] for name, examples in data.splits.items()}


@pytest.fixture(scope="module")
def rows():
    return make_rows(150)


# --------------------------------------------------------------------------- formats
def test_every_format_loads_the_same_examples(tmp_path, rows):
    pytest.importorskip("datasets")
    import datasets

    paths = {
        "csv": write_csv(tmp_path / "d.csv", rows),
        "tsv": write_csv(tmp_path / "d.tsv", rows, delimiter="\t"),
        "jsonl": write_jsonl(tmp_path / "d.jsonl", rows),
        "parquet": write_parquet(tmp_path / "d.parquet", rows),
    }
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf_dataset"))
    paths["hf"] = tmp_path / "hf_dataset"

    loaded = {fmt: load_source(SourceConfig(path=str(p))) for fmt, p in paths.items()}
    reference = as_tuples(loaded["csv"])
    assert set(reference) == {"train", "validation", "test"}
    assert sum(len(v) for v in reference.values()) == len(rows)
    for fmt, data in loaded.items():
        assert as_tuples(data) == reference, fmt
        assert data.label_names == sorted(LABELS), fmt
        assert data.stats["rows"] == len(rows) and data.stats["duplicates_dropped"] == 0
        assert len(data.fingerprint) == 64
    # ids are content hashes; labels index the sorted label names
    by_text = {r["text"]: r["label"] for r in rows}
    for examples in loaded["csv"].splits.values():
        for ex in examples:
            assert isinstance(ex, Example)
            assert ex.id == text_id(ex.text)
            assert loaded["csv"].label_names[ex.label] == by_text[ex.text]
    # a file's fingerprint is a hash of its content, not its path
    copy = tmp_path / "elsewhere.csv"
    copy.write_bytes(paths["csv"].read_bytes())
    assert load_source(SourceConfig(path=str(copy))).fingerprint == loaded["csv"].fingerprint
    assert loaded["tsv"].fingerprint != loaded["csv"].fingerprint


def test_explicit_format_overrides_suffix(tmp_path, rows):
    path = write_csv(tmp_path / "data.txt", rows[:20], delimiter="\t")
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_source(SourceConfig(path=str(path)))
    data = load_source(SourceConfig(path=str(path), format="tsv"))
    assert sum(len(v) for v in data.splits.values()) == 20


def test_hf_dataset_dict_keeps_its_own_splits(tmp_path, rows):
    pytest.importorskip("datasets")
    import datasets

    parts = {"train": rows[:100], "validation": rows[100:120], "test": rows[120:]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in parts.items()}).save_to_disk(
        str(tmp_path / "hf_dict"))
    data = load_source(SourceConfig(path=str(tmp_path / "hf_dict")))
    assert set(data.splits) == set(parts)
    for name, split_rows in parts.items():
        assert [ex.text for ex in data.splits[name]] == [r["text"] for r in split_rows]
        assert [data.label_names[ex.label] for ex in data.splits[name]] == [r["label"] for r in split_rows]
    # the same examples as the flat file, only split differently
    flat = load_source(SourceConfig(path=str(write_csv(tmp_path / "d.csv", rows))))
    flat_all = sorted((ex.id, ex.text, ex.label) for v in flat.splits.values() for ex in v)
    dict_all = sorted((ex.id, ex.text, ex.label) for v in data.splits.values() for ex in v)
    assert flat_all == dict_all


def test_split_column_names_the_splits(tmp_path, rows):
    tagged = [{**r, "part": "dev" if i % 4 == 0 else "fit"} for i, r in enumerate(rows)]
    path = write_csv(tmp_path / "d.csv", tagged, fieldnames=("text", "label", "part"))
    data = load_source(SourceConfig(path=str(path), split_column="part"))
    assert {k: len(v) for k, v in data.splits.items()} == {"dev": len(rows[::4]), "fit": len(rows) - len(rows[::4])}


def test_id_column_is_used_as_example_id(tmp_path, rows):
    keyed = [{**r, "key": f"doc-{i}"} for i, r in enumerate(rows)]
    data = load_source(SourceConfig(path=str(write_jsonl(tmp_path / "d.jsonl", keyed)), id_column="key"))
    ids = {ex.id for v in data.splits.values() for ex in v}
    assert ids == {f"doc-{i}" for i in range(len(rows))}


def test_unlabelled_source(tmp_path, rows):
    data = load_source(SourceConfig(path=str(write_csv(tmp_path / "d.csv", rows)), label_column=None))
    assert data.label_names == []
    assert {ex.label for v in data.splits.values() for ex in v} == {-1}


# --------------------------------------------------------------------------- dedupe
def test_dedupe_keeps_first_occurrence(tmp_path, rows):
    dup_rows = list(rows[:30])
    dup_rows.insert(5, {"text": rows[20]["text"], "label": "neutral" if rows[20]["label"] != "neutral" else "positive"})
    dup_rows.append(dict(rows[3]))
    dup_rows.append({"text": rows[3]["text"], "label": "negative" if rows[3]["label"] != "negative" else "positive"})
    path = write_csv(tmp_path / "d.csv", dup_rows)
    data = load_source(SourceConfig(path=str(path)))
    examples = [ex for v in data.splits.values() for ex in v]
    assert len(examples) == 30
    assert data.stats["duplicates_dropped"] == 3
    assert data.stats["label_conflicts"] == 2
    by_text = {ex.text: data.label_names[ex.label] for ex in examples}
    assert by_text[rows[20]["text"]] == dup_rows[5]["label"]  # the earlier (inserted) row wins
    assert by_text[rows[3]["text"]] == rows[3]["label"]
    kept = load_source(SourceConfig(path=str(path), dedupe=False))
    assert sum(len(v) for v in kept.splits.values()) == 33


# --------------------------------------------------------------------------- hash split
def test_hash_split_is_deterministic_and_order_independent(tmp_path, rows):
    data = load_source(SourceConfig(path=str(write_csv(tmp_path / "a.csv", rows))))
    again = load_source(SourceConfig(path=str(write_csv(tmp_path / "a2.csv", rows))))
    assert as_tuples(data) == as_tuples(again)
    shuffled = list(rows)
    random.Random(7).shuffle(shuffled)
    assert shuffled != rows
    other = load_source(SourceConfig(path=str(write_csv(tmp_path / "b.csv", shuffled))))
    membership = {name: {ex.id for ex in v} for name, v in data.splits.items()}
    assert {name: {ex.id for ex in v} for name, v in other.splits.items()} == membership
    # each split keeps the file's order
    position = {r["text"]: i for i, r in enumerate(shuffled)}
    for examples in other.splits.values():
        assert [position[ex.text] for ex in examples] == sorted(position[ex.text] for ex in examples)
    # adding rows does not move existing ones
    more = load_source(SourceConfig(path=str(write_csv(tmp_path / "c.csv", rows + make_rows(40, seed=5)))))
    for name, ids in membership.items():
        assert ids <= {ex.id for ex in more.splits[name]}


def test_hash_split_fractions_are_roughly_respected(tmp_path):
    many = make_rows(2000, seed=3)
    fractions = {"train": 0.7, "validation": 0.2, "test": 0.1}
    data = load_source(SourceConfig(path=str(write_csv(tmp_path / "d.csv", many)), splits=fractions))
    sizes = {k: len(v) for k, v in data.splits.items()}
    assert sum(sizes.values()) == 2000
    for name, fraction in fractions.items():
        assert abs(sizes[name] / 2000 - fraction) < 0.035, sizes
    # membership follows hash_unit(id, "split") against the cumulative cuts
    for ex in data.splits["validation"]:
        assert 0.7 <= hash_unit(ex.id, "split") < 0.9


def test_hash_unit_is_uniform_and_salted():
    values = [hash_unit(str(i), "a") for i in range(4000)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert abs(sum(values) / len(values) - 0.5) < 0.02
    assert hash_unit("x", "a") == hash_unit("x", "a") != hash_unit("x", "b")


# --------------------------------------------------------------------------- max_examples
def test_max_examples_draws_by_hash_not_first_rows(tmp_path):
    many = make_rows(600, seed=11)
    for i, row in enumerate(many):
        row["label"] = LABELS[i * 3 // 600]  # the file is sorted by label: 200 of each, in blocks
    path = write_csv(tmp_path / "sorted.csv", many)
    full = load_source(SourceConfig(path=str(path), splits={"train": 1.0}))
    data = load_source(SourceConfig(path=str(path), splits={"train": 1.0}, max_examples={"train": 45}))
    subset = data.splits["train"]
    assert len(subset) == 45
    counts = Counter(data.label_names[ex.label] for ex in subset)
    assert len(counts) == 3 and min(counts.values()) >= 5, counts  # not just the first label's block
    # the subset is the 45 smallest subset-hashes, kept in source order
    expected = sorted(full.splits["train"], key=lambda ex: hash_unit(ex.id, "subset"))[:45]
    assert {ex.id for ex in subset} == {ex.id for ex in expected}
    order = {ex.id: i for i, ex in enumerate(full.splits["train"])}
    assert [order[ex.id] for ex in subset] == sorted(order[ex.id] for ex in subset)
    # same rows in another order: the same subset
    shuffled = list(many)
    random.Random(1).shuffle(shuffled)
    other = load_source(SourceConfig(path=str(write_csv(tmp_path / "shuffled.csv", shuffled)),
                                     splits={"train": 1.0}, max_examples={"train": 45}))
    assert {ex.id for ex in other.splits["train"]} == {ex.id for ex in subset}
    assert data.stats["examples"] == {"train": 45}


def test_max_examples_caps_only_named_splits(tmp_path, rows):
    path = write_csv(tmp_path / "d.csv", rows)
    full = load_source(SourceConfig(path=str(path)))
    capped = load_source(SourceConfig(path=str(path), max_examples={"train": 10, "test": 10_000}))
    assert len(capped.splits["train"]) == 10
    assert as_tuples(capped)["validation"] == as_tuples(full)["validation"]
    assert as_tuples(capped)["test"] == as_tuples(full)["test"]
    with pytest.raises(ValueError, match="names split 'dev'"):
        load_source(SourceConfig(path=str(path), max_examples={"dev": 3}))


# --------------------------------------------------------------------------- errors
def test_missing_columns_list_the_available_ones(tmp_path, rows):
    path = write_csv(tmp_path / "d.csv", rows)
    with pytest.raises(KeyError) as info:
        load_source(SourceConfig(path=str(path), text_column="sentence"))
    message = str(info.value)
    assert "sentence" in message and "['label', 'text']" in message
    with pytest.raises(KeyError, match="stars"):
        load_source(SourceConfig(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), label_column="stars"))


def test_empty_text_names_the_row(tmp_path, rows):
    bad = [dict(r) for r in rows[:10]]
    bad[3]["text"] = "   "
    with pytest.raises(ValueError, match=r"line 5 \(row 4\): empty 'text' value .*bad_input = \"skip\""):
        load_source(SourceConfig(path=str(write_csv(tmp_path / "d.csv", bad))))
    bad[3]["text"] = None
    with pytest.raises(ValueError, match="row 4"):
        load_source(SourceConfig(path=str(write_jsonl(tmp_path / "d.jsonl", bad))))


def test_missing_label_names_the_row(tmp_path, rows):
    bad = [dict(r) for r in rows[:10]]
    bad[6]["label"] = ""
    with pytest.raises(ValueError, match=r"line 8 \(row 7\): missing 'label'"):
        load_source(SourceConfig(path=str(write_csv(tmp_path / "d.csv", bad))))
    bad[6]["label"] = None
    with pytest.raises(ValueError, match=r"row 7: missing 'label'"):
        load_source(SourceConfig(path=str(write_parquet(tmp_path / "d.parquet", bad))))


def test_bad_json_line_names_the_line(tmp_path, rows):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n" + "{not json\n")
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        load_source(SourceConfig(path=str(path)))


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_source(SourceConfig(path=str(tmp_path / "missing.csv")))
    empty = write_csv(tmp_path / "empty.csv", [])
    with pytest.raises(ValueError, match="has no rows"):
        load_source(SourceConfig(path=str(empty)))


def test_source_config_validation():
    with pytest.raises(ValueError, match="source.path is required"):
        SourceConfig()
    with pytest.raises(ValueError, match="summing to 1"):
        SourceConfig(path="x.csv", splits={"train": 0.5, "test": 0.4})
    with pytest.raises(ValueError, match="max_examples"):
        SourceConfig(path="x.csv", max_examples={"train": 0})
    with pytest.raises(ValueError, match="source.format"):
        SourceConfig(path="x.csv", format="xml")


@pytest.mark.parametrize("name, why", [("a/b", "path separator"), ("a\\b", "path separator"), ("", "is empty"),
                                       (".", "only dots"), ("..", "only dots"), ("_parts", "reserves")])
def test_a_split_name_that_cannot_be_a_store_path_component_is_refused(tmp_path, rows, name, why):
    # From the source's split column ...
    path = write_csv(tmp_path / "d.csv", [{**r, "part": name if i == 5 else "train"} for i, r in enumerate(rows[:20])],
                     fieldnames=("text", "label", "part"))
    with pytest.raises(ValueError, match=rf"split name {re.escape(repr(name))} \(from the source's own splits.*{why}"):
        load_source(SourceConfig(path=str(path), split_column="part"))
    # ... and from the hashed split fractions, whether or not any example hashes to it.
    path = write_csv(tmp_path / "e.csv", rows[:20])
    for splits in ({name: 0.8, "test": 0.2}, {"train": 0.999999, name: 0.000001}):
        with pytest.raises(ValueError, match=rf"split name {re.escape(repr(name))} \(from source.splits\) .*{why}"):
            load_source(SourceConfig(path=str(path), splits=splits))


def test_a_source_with_one_class_warns(tmp_path, rows, caplog):
    one = write_csv(tmp_path / "one.csv", [{**r, "label": "positive"} for r in rows[:20]])
    with caplog.at_level("WARNING", logger="unipt.extract"):
        load_source(SourceConfig(path=str(one)))
    assert "every example of source" in caplog.text and "has label 'positive'" in caplog.text
    assert "source.label_column ('label')" in caplog.text and "source.max_examples" in caplog.text
    caplog.clear()
    # One class left after bad rows are skipped counts too; two classes, or no labels, do not warn.
    positive = [{**r, "label": "positive"} for r in rows[:20]]
    bad = write_csv(tmp_path / "bad.csv", positive + [{"text": "", "label": "negative"}])
    with caplog.at_level("WARNING", logger="unipt.extract"):
        load_source(SourceConfig(path=str(bad), bad_input="skip"))
    assert "has label 'positive'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="unipt.extract"):
        load_source(SourceConfig(path=str(write_csv(tmp_path / "two.csv", rows[:20]))))
        load_source(SourceConfig(path=str(one), label_column=None))
    assert "every example" not in caplog.text


# --------------------------------------------------------------------------- pkg://
def test_pkg_scheme_resolves_inside_an_installed_package():
    import pytest as pytest_module

    resolved = Path(resolve_path("pkg://pytest/__init__.py"))
    assert resolved.is_file()
    assert resolved.resolve() == Path(pytest_module.__file__).resolve()
    assert Path(resolve_path("pkg://pytest/")).is_dir()
    assert resolve_path("/plain/path.csv") == "/plain/path.csv"  # other specs pass through


def test_pkg_scheme_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="package 'no_such_pkg_zz' is not installed.*pip install"):
        resolve_path("pkg://no_such_pkg_zz/data.csv")
    with pytest.raises(FileNotFoundError, match="'missing/data.csv' does not exist inside package 'pytest'"):
        resolve_path("pkg://pytest/missing/data.csv")
    with pytest.raises(FileNotFoundError, match="not installed"):
        load_source(SourceConfig(path="pkg://no_such_pkg_zz/data.csv"))
