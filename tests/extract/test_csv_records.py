"""CSV/TSV records: malformed rows (field counts, broken quoting) are bad input named by their file line;
legitimate quoting is read as usual; a field of any length is read (and truncated by the tokenizer)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from unipt.extract import BackboneConfig, ExtractConfig, SourceConfig, run_extraction
from unipt.extract._sources import BadInputError, load_source, text_id
from unipt.store import FeatureStore


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", newline="")
    return path


def texts(data) -> list[str]:
    return sorted(ex.text for examples in data.splits.values() for ex in examples)


def skipped(data) -> list[tuple[int, str]]:
    return [(s.row, s.reason) for s in data.skipped]


# --------------------------------------------------------------------------- field counts
@pytest.mark.parametrize("line, fields", [
    ("hello, world,positive", 3),  # an unquoted comma: used to create the class ' world'
    ("fine film,positive,extra", 3),  # an extra field
    ("just a text", 1),  # a missing field
])
def test_a_row_whose_field_count_differs_from_the_header_is_bad_input(tmp_path, line, fields):
    path = write(tmp_path / "d.csv", f"text,label\ngood movie,positive\n{line}\nbad plot,negative\n")
    with pytest.raises(BadInputError, match=rf"d\.csv line 3 \(row 2\): {fields} field\(s\) where the header has 2"):
        load_source(SourceConfig(path=str(path)))
    data = load_source(SourceConfig(path=str(path), bad_input="skip"))
    assert skipped(data) == [(2, "wrong field count")]
    assert data.skipped[0].id == "row-2"
    assert data.label_names == ["negative", "positive"] and texts(data) == ["bad plot", "good movie"]


def test_tsv_rows_get_the_same_checks(tmp_path):
    path = write(tmp_path / "d.tsv", "text\tlabel\ngood movie\tpositive\nhello\tworld\tpositive\n"
                                     '"broken start\tnegative\nbad plot\tnegative\nlonely text\n')
    with pytest.raises(BadInputError, match=r"line 3 \(row 2\): 3 field\(s\) .*a value holding '\\t' must be quoted"):
        load_source(SourceConfig(path=str(path)))
    data = load_source(SourceConfig(path=str(path), bad_input="skip"))
    assert skipped(data) == [(2, "wrong field count"), (3, "unbalanced quote"), (5, "wrong field count")]
    assert texts(data) == ["bad plot", "good movie"]


# --------------------------------------------------------------------------- broken quoting
def test_a_quote_that_never_closes_is_named_and_the_rows_it_swallowed_are_read_again(tmp_path):
    path = write(tmp_path / "d.csv", 'text,label\nfirst,positive\n"broken start,negative\nsecond,positive\n'
                                     "third,negative\n")
    with pytest.raises(BadInputError, match=r"line 3 \(row 2\): a quoted field starts on this line and its quote "
                                            r"never closes"):
        load_source(SourceConfig(path=str(path)))
    data = load_source(SourceConfig(path=str(path), bad_input="skip"))
    assert skipped(data) == [(2, "unbalanced quote")]
    assert texts(data) == ["first", "second", "third"]  # not one garbage example holding the rest of the file
    assert data.stats["rows"] == 4


def test_a_stray_quote_that_a_later_quote_breaks_is_named_at_its_own_line(tmp_path):
    # csv runs the stray quote on to the next quote (line 5), where strict reading fails; the record is
    # the stray line alone, and lines 4 and 5 are read again as the rows they are.
    path = write(tmp_path / "d.csv", 'text,label\nfirst,positive\n"broken start,negative\nsecond,positive\n'
                                     '"quoted, fine",negative\nlast,positive\n')
    with pytest.raises(BadInputError, match=r"line 3 \(row 2\): broken quoting: .* 2 lines further down"):
        load_source(SourceConfig(path=str(path)))
    data = load_source(SourceConfig(path=str(path), bad_input="skip"))
    assert skipped(data) == [(2, "unbalanced quote")]
    assert texts(data) == ["first", "last", "quoted, fine", "second"]
    # A quote inside a quoted field that is not doubled, on a single line.
    path = write(tmp_path / "e.csv", 'text,label\n"say "hi" now",positive\nok,negative\n')
    data = load_source(SourceConfig(path=str(path), bad_input="skip"))
    assert skipped(data) == [(1, "unbalanced quote")] and texts(data) == ["ok"]


def test_multi_line_quoted_texts_are_read_and_counted_in_the_log(tmp_path, caplog):
    # Valid CSV: a two-column text over three lines, each ending in a comma (a stray quote closed by another
    # stray quote reads the same, so such records are read as written and listed in the log to look at).
    path = write(tmp_path / "d.csv", 'text,label\n"roses are red,\nviolets are blue,\nsugar is sweet",positive\n'
                                     "ok,negative\n")
    with caplog.at_level("INFO", logger="unipt.extract._sources"):
        data = load_source(SourceConfig(path=str(path)))
    assert data.skipped == [] and texts(data) == ["ok", "roses are red,\nviolets are blue,\nsugar is sweet"]
    assert "1 records hold line breaks inside quoted fields (starting on lines 2)" in caplog.text


def test_legitimate_quoting_is_read_as_written(tmp_path):
    values = ["hello, world", 'she said "hi"', '""', "two\nlines", "three, lines\nwith, commas\neach",
              "a\r\nwindows break", "trailing comma,", " padded "]
    path = tmp_path / "w.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:  # what csv writers (pandas, Excel, csv) produce
        writer = csv.writer(f)
        writer.writerow(["id", "text", "label"])
        writer.writerows([i, text, "positive" if i % 2 else "negative"] for i, text in enumerate(values))
    data = load_source(SourceConfig(path=str(path), id_column="id"))
    assert data.skipped == [] and texts(data) == sorted(values)
    # Hand-written: quoted label, an empty quoted field elsewhere, a two-column multi-line text with commas.
    path = write(tmp_path / "h.csv", 'text,label,note\n"a, b","positive",""\n"line one, here\nline two",negative,\n')
    data = load_source(SourceConfig(path=str(path)))
    assert data.skipped == [] and texts(data) == ["a, b", "line one, here\nline two"]


def test_rows_after_multi_line_fields_are_named_by_their_file_line(tmp_path):
    path = write(tmp_path / "d.csv", 'text,label\n"two\nlines",positive\n\n"three\nmore\nlines",negative\n'
                                     ",neutral\nlast,positive\n")
    # record 3 (the empty text) starts on line 8: 2 lines + a blank line + 3 lines after the header
    with pytest.raises(BadInputError, match=r"d\.csv line 8 \(row 3\): empty 'text' value"):
        load_source(SourceConfig(path=str(path)))
    data = load_source(SourceConfig(path=str(path), bad_input="skip"))
    assert skipped(data) == [(3, "empty text")]  # the store's source_row stays the 1-based record number
    assert texts(data) == ["last", "three\nmore\nlines", "two\nlines"]


def test_an_unreadable_header_is_a_source_error(tmp_path):
    path = write(tmp_path / "d.csv", '"text" x,label\nfine,positive\n')
    with pytest.raises(ValueError, match=r"d\.csv line 1: the header cannot be read: broken quoting"):
        load_source(SourceConfig(path=str(path), bad_input="skip"))


# --------------------------------------------------------------------------- long fields
LONG = ("good movie " * 20_000)[:200_000]  # over csv's default field limit of 131,072 characters


def test_a_field_over_the_default_csv_limit_is_read(tmp_path):
    path = write(tmp_path / "d.csv", f"text,label\nshort one,negative\n{LONG},positive\n")
    data = load_source(SourceConfig(path=str(path), splits={"train": 1.0}))
    assert texts(data) == [LONG, "short one"] and data.skipped == []


def test_a_field_over_the_default_csv_limit_is_extracted_truncated(tmp_path, tiny_bert_dir):
    path = write(tmp_path / "d.csv", f"text,label\nshort one,negative\n{LONG},positive\n")
    backbone = BackboneConfig(model=str(tiny_bert_dir), device="cpu", max_length=16)
    url = str(tmp_path / "store.zarr")
    summary = run_extraction(SourceConfig(path=str(path), splits={"train": 1.0}), backbone,
                             ExtractConfig(part_size=16, batch_size=8), url, progress=False)
    assert summary.truncated == {"train": 1}
    store = FeatureStore.open(url)
    assert store.truncated("train") == [text_id(LONG)]
    part = store.read_part(store.parts("train")[0])
    assert dict(zip(part.example_id, part.length.tolist()))[text_id(LONG)] == 16
