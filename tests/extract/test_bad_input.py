"""Bad input: named and stopped by default, or skipped and recorded in the store; truncation is recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset as wds

from conftest import make_text_csv
from unipt.extract import BackboneConfig, ExtractConfig, SourceConfig, run_extraction
from unipt.extract._sources import BadInputError, load_source, text_id
from unipt.pipelines.cli import main
from unipt.store import FeatureStore, ProvenanceMismatch

EXTRACT = ExtractConfig(part_size=16, batch_size=8)


def csv_with_bad_rows(tmp_path: Path) -> tuple[Path, dict[int, str]]:
    """The tiny CSV with bad rows mixed in; returns it and {source row number: reason} of the bad ones."""
    good = make_text_csv(tmp_path / "good.csv", n=60).read_bytes().splitlines(keepends=True)
    header, rows = good[0], good[1:]
    bad = {
        5: (b'"   ",positive\n', "empty text"),
        11: (b"caf\xe9 au lait,neutral\n", "undecodable text"),  # latin-1 bytes in a utf-8 file
        23: (b"a perfectly fine text,\n", "missing label"),
        40: (b",negative\n", "empty text"),
    }
    out, expected, number = [header], {}, 0
    for row in rows:
        number += 1
        if number in bad:
            line, reason = bad[number]
            out.append(line)
            expected[number] = reason
            number += 1
        out.append(row)
    path = tmp_path / "mixed.csv"
    path.write_bytes(b"".join(out))
    return path, expected


def test_error_policy_names_the_row_the_problem_and_the_fix(tmp_path):
    path, expected = csv_with_bad_rows(tmp_path)
    first = min(expected)
    # A CSV row is named by the file line it starts on (the header is line 1) and its row number.
    with pytest.raises(BadInputError,
                       match=rf"line {first + 1} \(row {first}\): empty 'text' value .*bad_input = \"skip\""):
        load_source(SourceConfig(path=str(path)))
    # Undecodable bytes are named with the bytes around them and the encoding that failed.
    only_latin1 = tmp_path / "latin1.csv"
    only_latin1.write_bytes(b"text,label\nfine,positive\ncaf\xe9 au lait,neutral\n")
    with pytest.raises(BadInputError, match=r"line 3 \(row 2\): 'text' has bytes that are not valid utf-8 .*caf\\xe9"):
        load_source(SourceConfig(path=str(only_latin1)))
    assert load_source(SourceConfig(path=str(only_latin1), encoding="latin-1")).skipped == []


def test_skip_policy_lists_every_bad_row_with_its_reason(tmp_path):
    path, expected = csv_with_bad_rows(tmp_path)
    data = load_source(SourceConfig(path=str(path), bad_input="skip"))
    assert {s.row: s.reason for s in data.skipped} == expected
    by_row = {s.row: s for s in data.skipped}
    assert by_row[23].id == text_id("a perfectly fine text")  # the id it would have had
    assert by_row[5].id == "row-5"  # no text, no content id: the row number names it
    assert sum(len(ex) for ex in data.splits.values()) == 60
    assert data.stats["skipped"] == {"empty text": 2, "undecodable text": 1, "missing label": 1}
    assert data.stats["rows"] == 64


def test_jsonl_and_webdataset_bad_records_are_skippable(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join([json.dumps({"text": "good movie", "label": "positive"}), "{not json",
                                json.dumps([1, 2]), json.dumps({"text": 7, "label": "neutral"}),
                                json.dumps({"text": "bad movie", "label": "negative"})]) + "\n")
    with pytest.raises(BadInputError, match="row 2: line 2 is not JSON"):
        load_source(SourceConfig(path=str(jsonl)))
    data = load_source(SourceConfig(path=str(jsonl), bad_input="skip"))
    assert [(s.row, s.reason) for s in data.skipped] == [(2, "not JSON"), (3, "not JSON"), (4, "non-text value")]

    shards = tmp_path / "shards"
    shards.mkdir()
    with wds.TarWriter(str(shards / "shard-000000.tar")) as writer:
        writer.write({"__key__": "ok000001", "txt": "good movie", "cls": 1})
        writer.write({"__key__": "latin001", "txt": b"caf\xe9", "cls": 0})
        writer.write({"__key__": "nolabel1", "txt": "fine film"})
        writer.write({"__key__": "badjson1", "json": b"{oops", "cls": 0})
        writer.write({"__key__": "ok000002", "txt": "awful plot", "cls": 0})
    config = SourceConfig(path=str(shards), text_column="txt", label_column="cls", bad_input="skip")
    data = load_source(config)
    assert [(s.id, s.reason) for s in data.skipped] == [("latin001", "undecodable text"),
                                                       ("nolabel1", "missing label"), ("badjson1", "not JSON")]
    assert sorted(ex.id for exs in data.splits.values() for ex in exs) == ["ok000001", "ok000002"]


def test_skipped_rows_are_recorded_in_the_store_and_reported(tmp_path, backbone, encoder):
    path, expected = csv_with_bad_rows(tmp_path)
    url = str(tmp_path / "store.zarr")
    with pytest.raises(BadInputError):
        run_extraction(SourceConfig(path=str(path)), backbone, EXTRACT, url, progress=False, encoder=encoder)
    assert not Path(url).exists(), "a refused source must not leave a store behind"

    source = SourceConfig(path=str(path), bad_input="skip")
    summary = run_extraction(source, backbone, EXTRACT, url, progress=False, encoder=encoder)
    assert summary.skipped == {"empty text": 2, "undecodable text": 1, "missing label": 1}
    assert "skipped 4 bad source rows (empty text: 2, missing label: 1, undecodable text: 1" in summary.describe()
    store = FeatureStore.open(url)
    assert {r["source_row"]: r["reason"] for r in store.skipped()} == expected
    assert store.provenance["source"]["bad_input"] == "skip"
    assert sum(store.num_examples(s) for s in store.splits()) == 60
    assert "_skipped" not in store.splits()

    # Resuming records nothing twice; switching the policy on an existing store is refused (other contents).
    again = run_extraction(source, backbone, EXTRACT, url, progress=False, encoder=encoder)
    assert again.parts_written == 0 and len(FeatureStore.open(url).skipped()) == 4
    with pytest.raises(ProvenanceMismatch, match="bad_input"):
        FeatureStore.create(url, layers=store.layers, layer_widths=list(store.layer_widths.values()),
                            dtype=store.dtype, label_names=store.label_names, compression=store.meta["compression"],
                            provenance={**store.provenance,
                                        "source": {**store.provenance["source"], "bad_input": "error"}})

    assert main(["store", "info", url]) == 0


def test_truncated_examples_are_counted_and_recorded(tmp_path, tiny_bert_dir):
    texts = ["short one", "a b c d e f g h i j k l m n o p", "exactly six words are in it", "x y z"]
    csv = tmp_path / "t.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate(texts)))
    backbone = BackboneConfig(model=str(tiny_bert_dir), device="cpu", max_length=8)  # 6 words + [CLS] [SEP]
    url = str(tmp_path / "store.zarr")
    source = SourceConfig(path=str(csv), splits={"train": 1.0})
    summary = run_extraction(source, backbone, EXTRACT, url, progress=False)
    assert summary.truncated == {"train": 1}
    assert "1 examples cut to max_length" in summary.describe()
    store = FeatureStore.open(url)
    assert store.truncated("train") == [text_id(texts[1])]  # "exactly six words" fits exactly: not cut
    assert sum(p.truncated for p in store.parts("train")) == 1
    lengths = dict(zip(*(lambda d: (d.example_id, d.length))(store.read_part(store.parts("train")[0]))))
    assert lengths[text_id(texts[1])] == 8 and lengths[text_id(texts[2])] == 8


def test_store_commands_show_skipped_rows_and_truncation(tmp_path, backbone, encoder, capsys):
    path, expected = csv_with_bad_rows(tmp_path)
    url = str(tmp_path / "store.zarr")
    run_extraction(SourceConfig(path=str(path), bad_input="skip"), backbone, EXTRACT, url, progress=False,
                   encoder=encoder)
    capsys.readouterr()
    assert main(["store", "info", url]) == 0
    info = capsys.readouterr().out
    assert "skipped    4 bad source rows (empty text: 2, missing label: 1, undecodable text: 1)" in info
    assert "truncated" in next(line for line in info.splitlines() if line.startswith("split"))
    assert main(["store", "skipped", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "source_row\texample_id\treason"
    assert {int(l.split("\t")[0]): l.split("\t")[2] for l in lines[1:]} == expected
