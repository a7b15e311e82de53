"""Sources for every task: pairs through the tokenizer's pair API, label sets, numbers, words and tags;
bad targets of each kind stop extraction naming the row, or are skipped and recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_tiny_bert
from unipt.extract import (BackboneConfig, BadInputError, ExtractConfig, SourceConfig, TextEncoder, load_source,
                           run_extraction)
from unipt.extract._targets import align_tags
from unipt.store import IGNORE_INDEX, FeatureStore


def jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def subword_encoder(tmp_path_factory):
    folder = make_tiny_bert(tmp_path_factory.mktemp("sub"), subwords=True)
    return TextEncoder(BackboneConfig(model=str(folder), device="cpu", max_length=8))


# --------------------------------------------------------------------------- tag alignment
def test_tags_sit_on_the_first_sub_word_of_each_word(subword_encoder):
    (feature,) = subword_encoder.tokenize(None, words=[("good", "playing", "walks", "movie")])
    tokens = subword_encoder.tokenizer.convert_ids_to_tokens(feature["input_ids"])
    assert tokens == ["[CLS]", "good", "play", "##ing", "walk", "##s", "movie", "[SEP]"]
    assert align_tags(feature["word_ids"], [10, 11, 12, 13]) == [IGNORE_INDEX, 10, 11, IGNORE_INDEX, 12,
                                                                  IGNORE_INDEX, 13, IGNORE_INDEX]


def test_words_cut_by_truncation_lose_their_tags(subword_encoder, tmp_path):
    # max_length 8: [CLS] good play ##ing walk ##s movie [SEP] fits; one more word is cut
    path = jsonl(tmp_path / "t.jsonl", [{"words": ["good", "playing", "walks", "movie", "fun"],
                                         "tags": ["A", "B", "C", "D", "E"]}])
    data = load_source(SourceConfig(path=path, task="tagging", text_column="words", label_column="tags",
                                    splits={"train": 1.0}))
    prepared = subword_encoder.prepare(data.splits["train"])
    assert prepared.truncated == [0]
    names = data.label_names
    scored = [names[t] for t in prepared.token_targets[0] if t != IGNORE_INDEX]
    assert scored == ["A", "B", "C", "D"] and len(prepared.token_targets[0]) == prepared.lengths[0] == 8


# --------------------------------------------------------------------------- pairs
def test_pairs_are_encoded_together_with_the_tokenizers_pair_api(encoder, tmp_path):
    path = jsonl(tmp_path / "p.jsonl", [{"a": "good movie", "b": "bad plot twist", "y": "x"}])
    data = load_source(SourceConfig(path=path, text_column="a", text_pair_column="b", label_column="y",
                                    splits={"train": 1.0}))
    (example,) = data.splits["train"]
    assert example.pair == "bad plot twist"
    (feature,) = encoder.prepare([example]).features
    expected = encoder.tokenizer("good movie", "bad plot twist")
    assert feature["input_ids"] == expected["input_ids"]
    assert feature["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1, 1]  # [CLS] a a [SEP] b b b [SEP]
    # the same first text with another second text is another example
    other = jsonl(tmp_path / "q.jsonl", [{"a": "good movie", "b": "x", "y": "x"}, {"a": "good movie", "b": "y", "y": "x"}])
    assert sum(len(v) for v in load_source(SourceConfig(path=other, text_column="a", text_pair_column="b",
                                                        label_column="y")).splits.values()) == 2


def test_group_column_keeps_each_group_in_one_split(tmp_path):
    rows = [{"text": f"text {i}", "label": "a", "doc": f"doc{i % 7}"} for i in range(200)]
    data = load_source(SourceConfig(path=jsonl(tmp_path / "g.jsonl", rows), group_column="doc"))
    where = {}
    for split, examples in data.splits.items():
        for ex in examples:
            where.setdefault(ex.group, set()).add(split)
    assert len(where) == 7 and all(len(s) == 1 for s in where.values())


# --------------------------------------------------------------------------- targets of each kind
def test_multilabel_from_lists_and_delimited_strings(tmp_path):
    lists = jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": ["x", "y"]}, {"text": "b", "label": []},
                                         {"text": "c", "label": ["y", "y"]}])
    data = load_source(SourceConfig(path=lists, task="multilabel", splits={"train": 1.0}))
    assert data.label_names == ["x", "y"]
    assert [ex.label for ex in data.splits["train"]] == [(0, 1), (), (1,)]  # a repeated label counts once
    strings = tmp_path / "s.csv"
    strings.write_text("text,label\na,x| y\nb,\n")
    data = load_source(SourceConfig(path=str(strings), task="multilabel", label_delimiter="|", splits={"train": 1.0}))
    assert [ex.label for ex in data.splits["train"]] == [(0, 1), ()]


def test_regression_reads_numbers_from_one_or_several_columns(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("text,v,w\na,1.5,2\nb,-3,1e2\n")
    data = load_source(SourceConfig(path=str(path), task="regression", label_column="v", splits={"train": 1.0}))
    assert data.label_names == ["v"] and [ex.label for ex in data.splits["train"]] == [(1.5,), (-3.0,)]
    data = load_source(SourceConfig(path=str(path), task="regression", label_column=None, target_columns=["v", "w"],
                                    splits={"train": 1.0}))
    assert data.label_names == ["v", "w"] and data.splits["train"][1].label == (-3.0, 100.0)


BAD_TARGETS = {
    # kind: (source options, rows with one bad target in row 2, the reason recorded, a word of the message)
    "regression NaN": ({"task": "regression", "label_column": "v"},
                       [{"text": "a", "v": 1.0}, {"text": "b", "v": "nan"}, {"text": "c", "v": 2}], "bad target",
                       "finite number"),
    "regression text": ({"task": "regression", "label_column": "v"},
                        [{"text": "a", "v": 1.0}, {"text": "b", "v": "high"}, {"text": "c", "v": 2}], "bad target",
                        "not a number"),
    "regression missing": ({"task": "regression", "label_column": "v"},
                           [{"text": "a", "v": 1.0}, {"text": "b", "v": None}, {"text": "c", "v": 2}],
                           "missing target", "missing"),
    "multilabel not a list": ({"task": "multilabel"},
                              [{"text": "a", "label": ["x"]}, {"text": "b", "label": 3.5}, {"text": "c", "label": []}],
                              "bad target", "list of labels"),
    "multilabel string without delimiter": ({"task": "multilabel"},
                                            [{"text": "a", "label": ["x"]}, {"text": "b", "label": "x,y"},
                                             {"text": "c", "label": []}], "bad target", "label_delimiter"),
    "tagging length": ({"task": "tagging", "text_column": "words", "label_column": "tags"},
                       [{"words": ["good", "movie"], "tags": ["A", "N"]}, {"words": ["bad", "plot"], "tags": ["A"]},
                        {"words": ["fun"], "tags": ["A"]}], "bad target", "1 tags for 2 words"),
    "tagging no words": ({"task": "tagging", "text_column": "words", "label_column": "tags"},
                         [{"words": ["good"], "tags": ["A"]}, {"words": [], "tags": []},
                          {"words": ["fun"], "tags": ["A"]}], "empty text", "no words"),
}


@pytest.mark.parametrize("case", sorted(BAD_TARGETS))
def test_bad_targets_stop_with_the_row_named_or_are_skipped_and_recorded(case, tiny_bert_dir, tmp_path):
    options, rows, reason, words = BAD_TARGETS[case]
    path = jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(BadInputError, match=rf"bad.jsonl row 2: .*{words}"):
        load_source(SourceConfig(path=path, **options))
    source = SourceConfig(path=path, bad_input="skip", splits={"train": 1.0}, **options)
    run_extraction(source, BackboneConfig(model=str(tiny_bert_dir), device="cpu"), ExtractConfig(dtype="float32"),
                   str(tmp_path / "s.zarr"), progress=False)
    store = FeatureStore.open(str(tmp_path / "s.zarr"))
    assert store.num_examples("train") == 2
    assert [(r["source_row"], r["reason"]) for r in store.skipped()] == [(2, reason)]


def test_task_options_that_do_not_fit_are_refused(tmp_path):
    with pytest.raises(ValueError, match="source.task must be one of"):
        SourceConfig(path="x.csv", task="ranking")
    with pytest.raises(ValueError, match="label_delimiter splits a multilabel column"):
        SourceConfig(path="x.csv", label_delimiter="|")
    with pytest.raises(ValueError, match="target_columns names regression targets"):
        SourceConfig(path="x.csv", target_columns=["a"])
    with pytest.raises(ValueError, match="a regression source needs its targets"):
        SourceConfig(path="x.csv", task="regression", label_column=None)
    with pytest.raises(ValueError, match="text_pair_column does not apply to tagging"):
        SourceConfig(path="x.csv", task="tagging", text_pair_column="b")
    path = jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "x"}])
    with pytest.raises(KeyError, match=r"no column\(s\) \['pair'\]"):
        load_source(SourceConfig(path=path, text_pair_column="pair"))
