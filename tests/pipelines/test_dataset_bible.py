"""The Bible paraphrase dataset: OSIS cleaning, alignment and pair building on small in-memory verse
dictionaries, then counts on the real prepared data (skipped unless ``scripts/install_data.sh bible`` has run)."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict

import pytest

from unipt.extract import hash_unit
from unipt.pipelines.datasets import bible, dataset_dir, get_dataset

MATT_23 = {  # the two texts number 23:13 and 23:14 the other way round
    "kjv": {
        ("Matt", 23, 12): "And whosoever shall exalt himself shall be abased; and he that shall humble himself "
                          "shall be exalted.",
        ("Matt", 23, 13): "But woe unto you, scribes and Pharisees, hypocrites! for ye shut up the kingdom of "
                          "heaven against men: for ye neither go in yourselves, neither suffer ye them that are "
                          "entering to go in.",
        ("Matt", 23, 14): "Woe unto you, scribes and Pharisees, hypocrites! for ye devour widows’ houses, and for "
                          "a pretence make long prayer: therefore ye shall receive the greater damnation.",
    },
    "web": {
        ("Matt", 23, 12): "Whoever exalts himself will be humbled, and whoever humbles himself will be exalted.",
        ("Matt", 23, 13): "“Woe to you, scribes and Pharisees, hypocrites! For you devour widows’ houses, and as a "
                          "pretense you make long prayers. Therefore you will receive greater condemnation.",
        ("Matt", 23, 14): "“But woe to you, scribes and Pharisees, hypocrites! Because you shut up the Kingdom of "
                          "Heaven against men; for you don’t enter in yourselves, neither do you allow those who "
                          "are entering in to enter.",
    },
}
KJV = {
    ("Gen", 1, 1): "In the beginning God created the heaven and the earth.",
    ("Gen", 1, 2): "And the earth was without form, and void; and darkness was upon the face of the deep.",
    ("Gen", 1, 3): "And God said, Let there be light: and there was light.",
    ("Gen", 1, 6): "And God blessed the seventh day.",
    ("Gen", 1, 7): "Amen.",
    **MATT_23["kjv"],
    ("Jude", 1, 1): "Jude, the servant of Jesus Christ, and brother of James.",
}
WEB = {
    ("Gen", 1, 1): "In the beginning, God created the heavens and the earth.",
    ("Gen", 1, 2): "The earth was formless and empty. Darkness was on the surface of the deep.",
    ("Gen", 1, 3): "God said, “Let there be light,” and there was light.",
    ("Gen", 1, 6): "",
    ("Gen", 1, 7): "Amen. The following words used in the World English Bible are not very common.",
    **MATT_23["web"],
    ("Tob", 1, 1): "The book of the words of Tobit.",
}


def verses(chapter: tuple[str, int], texts: list[tuple[str, str]]) -> dict:
    return {(*chapter, verse): pair for verse, pair in enumerate(texts, start=1)}


SPAKE = ("And the LORD spake unto Moses, saying,", "Yahweh spoke to Moses, saying,")
GEN_1 = verses(("Gen", 1), [
    ("In the beginning God created the heaven and the earth.",
     "In the beginning, God created the heavens and the earth."),
    ("And the earth was without form, and void; and darkness was upon the face of the deep. And the Spirit of God "
     "moved upon the face of the waters.",
     "The earth was formless and empty. Darkness was on the surface of the deep and God’s Spirit was hovering over "
     "the surface of the waters."),
    ("And God said, Let there be light: and there was light.",
     "God said, “Let there be light,” and there was light."),
    ("And God saw the light, that it was good: and God divided the light from the darkness.",
     "God saw the light, and saw that it was good. God divided the light from the darkness."),
    ("And God called the light Day, and the darkness he called Night. And the evening and the morning were the "
     "first day.",
     "God called the light “day”, and the darkness he called “night”. There was evening and there was morning, "
     "the first day."),
    ("And God said, Let there be a firmament in the midst of the waters, and let it divide the waters from the "
     "waters.",
     "God said, “Let there be an expanse in the middle of the waters, and let it divide the waters from the "
     "waters.”"),
])
ALIGNED = {
    **GEN_1,
    **verses(("Exod", 31), [SPAKE, ("See, I have called by name Bezaleel the son of Uri.",
                                    "“Behold, I have called by name Bezalel the son of Uri."), SPAKE]),
    **verses(("Lev", 1), [SPAKE, ("Speak unto the children of Israel.", "Speak to the children of Israel.")]),
    **verses(("Obad", 1), [("The vision of Obadiah.", "The vision of Obadiah.")]),
}


def test_clean_osis_strips_tags_strongs_notes_and_titles():
    pytest.importorskip("pysword", reason="needs pysword: scripts/install_data.sh bible")
    raw = ('<div type="x-milestone" subType="x-preverse" sID="pv1"/><title canonical="true" type="psalm">A Psalm '
           'of <w lemma="strong:H1732">David</w>.</title> <lg sID="gen2"/> <l level="1" sID="gen3"/>¶ '
           '<w lemma="strong:H0430">God</w><note placement="foot"><reference type="annotateRef">1:1 </reference>'
           'The Hebrew word rendered “God” is “אֱלֹהִ֑ים” (Elohim).</note><w lemma="strong:H1254">created</w> the '
           '\\nd <divineName><w lemma="strong:H3068">LORD</w></divineName>, and said,<note placement="foot">or, '
           'spake</note>“Let<note type="crossReference"><reference>Isaiah 7:14</reference></note>, there<lb/> '
           '<transChange type="added">be</transChange>  light.<l eID="gen3" level="1"/> ')
    assert bible.clean_osis(raw) == "God created the LORD, and said, “Let, there be light."
    assert bible.clean_osis("In the <w lemma=\"strong:H7225\">beginning</w>. ") == "In the beginning."
    assert bible.clean_osis("") == ""


def test_align_keeps_verses_of_both_and_says_why_it_dropped_the_rest():
    aligned, dropped = bible.align(KJV, WEB)
    assert aligned == {
        ("Gen", 1, 1): (KJV[("Gen", 1, 1)], WEB[("Gen", 1, 1)]),
        ("Gen", 1, 2): (KJV[("Gen", 1, 2)], WEB[("Gen", 1, 2)]),
        ("Gen", 1, 3): (KJV[("Gen", 1, 3)], WEB[("Gen", 1, 3)]),
        ("Matt", 23, 12): (KJV[("Matt", 23, 12)], WEB[("Matt", 23, 12)]),
    }
    assert dropped == {"only_kjv": [("Jude", 1, 1)], "only_web": [("Tob", 1, 1)], "empty": [("Gen", 1, 6)],
                       "length_ratio": [("Gen", 1, 7)], "shifted": [("Matt", 23, 13), ("Matt", 23, 14)]}


def test_align_keeps_a_verse_at_the_length_limit():
    kjv = {("Gen", 1, 1): "a" * 10}
    assert list(bible.align(kjv, {("Gen", 1, 1): "b" * 20})[0]) == [("Gen", 1, 1)]  # ratio 2.0: kept
    assert bible.align(kjv, {("Gen", 1, 1): "b" * 21})[1]["length_ratio"] == [("Gen", 1, 1)]
    assert bible.align(kjv, {("Gen", 1, 1): "b" * 4})[1]["length_ratio"] == [("Gen", 1, 1)]


def by_id(pairs):
    return {pair["id"]: pair for pair in pairs}


def refs(pair_id: str) -> tuple[tuple[str, int, int], tuple[str, int, int]]:
    """("Gen", 1, 1), ("Gen", 1, 7) from "Gen.1.1/Gen.1.7"."""
    def ref(name):
        book, chapter, verse = name.split(".")
        return book, int(chapter), int(verse)

    kjv, web = pair_id.split("/")
    return ref(kjv), ref(web)


def test_positives_pair_the_two_translations_of_one_verse():
    pairs, _ = bible.build_pairs(ALIGNED)
    positives = [p for p in pairs if p["label"] == "paraphrase"]
    assert [p["id"] for p in positives] == [
        "Gen.1.1/Gen.1.1", "Gen.1.2/Gen.1.2", "Gen.1.3/Gen.1.3", "Gen.1.4/Gen.1.4", "Gen.1.5/Gen.1.5",
        "Gen.1.6/Gen.1.6", "Exod.31.1/Exod.31.1", "Exod.31.2/Exod.31.2", "Lev.1.2/Lev.1.2", "Obad.1.1/Obad.1.1"]
    for pair in positives:
        kjv_ref, web_ref = refs(pair["id"])
        kjv_text, web_text = ALIGNED[kjv_ref]
        ordered = (kjv_text, web_text) if pair["first"] == "kjv" else (web_text, kjv_text)
        assert kjv_ref == web_ref and (pair["text"], pair["text_pair"]) == ordered
        assert (pair["chapter"], pair["book"]) == (f"{kjv_ref[0]}.{kjv_ref[1]}", kjv_ref[0])
    assert by_id(pairs)["Gen.1.1/Gen.1.1"] == {
        "id": "Gen.1.1/Gen.1.1", "text": "In the beginning God created the heaven and the earth.",
        "text_pair": "In the beginning, God created the heavens and the earth.", "label": "paraphrase",
        "chapter": "Gen.1", "book": "Gen", "first": "kjv"}


def test_negatives_come_from_the_same_chapter_never_the_same_or_a_near_identical_verse():
    pairs, counts = bible.build_pairs(ALIGNED)
    negatives = [p for p in pairs if p["label"] == "different"]
    assert [p["id"] for p in negatives] == [
        "Gen.1.1/Gen.1.4", "Gen.1.2/Gen.1.4", "Gen.1.3/Gen.1.1", "Gen.1.4/Gen.1.1", "Gen.1.5/Gen.1.6",
        "Gen.1.6/Gen.1.5", "Exod.31.1/Exod.31.2", "Exod.31.2/Exod.31.3", "Lev.1.1/Lev.1.2", "Lev.1.2/Lev.1.1"]
    for pair in negatives:
        kjv_ref, web_ref = refs(pair["id"])
        assert kjv_ref != web_ref and kjv_ref[:2] == web_ref[:2]
        assert {pair["text"], pair["text_pair"]} == {ALIGNED[kjv_ref][0], ALIGNED[web_ref][1]}
    # Exodus 31:1 and 31:3 are the same refrain: never each other's negative. Obadiah 1 has one verse: no negative.
    assert "Exod.31.1/Exod.31.3" not in by_id(pairs) and "Exod.31.3/Exod.31.1" not in by_id(pairs)
    assert not any(p["chapter"] == "Obad.1" and p["label"] == "different" for p in pairs)
    # The refrain's positive repeats in Exodus 31:3 and Leviticus 1:1, and Exodus 31:3's only candidate negative
    # (31:2) gives the pair Exodus 31:1 already has.
    assert counts == {"duplicate_different": 1, "duplicate_paraphrase": 2, "no_negative": 1}
    assert len(pairs) == 2 * len(ALIGNED) - 4


def test_a_negative_is_drawn_among_the_verses_closest_in_length():
    pairs, _ = bible.build_pairs(GEN_1)
    for pair in [p for p in pairs if p["label"] == "different"]:
        kjv_ref, web_ref = refs(pair["id"])
        own = len(GEN_1[kjv_ref][1])
        gaps = sorted(abs(math.log(len(web) / own)) for ref, (_, web) in GEN_1.items() if ref != kjv_ref)
        assert abs(math.log(len(GEN_1[web_ref][1]) / own)) <= gaps[bible.NEGATIVE_POOL - 1], pair["id"]


def test_pairs_are_deterministic_and_independent_of_verse_order():
    pairs, counts = bible.build_pairs(GEN_1)
    assert bible.build_pairs(GEN_1) == (pairs, counts)
    reversed_pairs, _ = bible.build_pairs(dict(reversed(list(GEN_1.items()))))
    assert sorted(reversed_pairs, key=lambda p: p["id"]) == sorted(pairs, key=lambda p: p["id"])


def test_the_first_text_is_drawn_per_pair_by_hash():
    pairs, _ = bible.build_pairs(ALIGNED)
    for pair in pairs:
        assert pair["first"] == ("kjv" if hash_unit(pair["id"], "bible-order") < 0.5 else "web")
    assert Counter(p["first"] for p in pairs) == {"kjv": 9, "web": 11}


def test_near_identical():
    assert bible.near_identical(SPAKE, ("And the LORD spake unto Moses, saying:", "Yahweh spoke to Moses, saying:"))
    assert bible.near_identical(("And he made staves of shittim wood, and overlaid them with gold.", "x"),
                                ("And he made the staves of shittim wood, and overlaid them with gold.", "y"))
    assert not bible.near_identical(("And Seth lived after he begat Enos eight hundred and seven years", "x"),
                                    ("And Enos lived after he begat Cainan eight hundred and fifteen years", "y"))


def test_the_dataset_is_registered():
    module = get_dataset("bible")
    assert module.INSTALL.apt == ("sword-text-kjv", "sword-text-web") and module.INSTALL.pip == ("pysword",)
    assert module.__doc__.strip().splitlines()[0]


def test_real_prepared_pairs():
    folder = dataset_dir("bible")
    if not (folder / ".prepared").is_file():
        pytest.skip("bible is not prepared: run scripts/install_data.sh bible")
    pairs = [json.loads(line) for line in (folder / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
    assert stats["verses"] == {"kjv": 31102, "web": 37457} and stats["aligned"] == 31087
    assert stats["dropped"] == {"only_kjv": 0, "only_web": 6689, "empty": 7, "length_ratio": 6, "shifted": 2}
    assert stats["dropped_refs"]["shifted"] == ["Matt.23.13", "Matt.23.14"]
    assert len(stats["only_web_books"]) == 17 and stats["only_web_refs_in_kjv_books"] == ["3John.1.15", "Rev.12.18"]
    labels = Counter(p["label"] for p in pairs)
    assert labels == stats["pairs"] == {"paraphrase": 30891, "different": 31023}
    assert labels["paraphrase"] + stats["pair_counts"]["duplicate_paraphrase"] == stats["aligned"]
    assert len({p["id"] for p in pairs}) == len(pairs)
    assert len({frozenset((p["text"], p["text_pair"])) for p in pairs}) == len(pairs)

    per_chapter = defaultdict(Counter)
    for pair in pairs:
        per_chapter[pair["chapter"]][pair["label"]] += 1
        kjv_ref, web_ref = refs(pair["id"])
        assert kjv_ref[:2] == web_ref[:2] and f"{kjv_ref[0]}.{kjv_ref[1]}" == pair["chapter"]
        assert kjv_ref[0] == pair["book"]
        assert (kjv_ref == web_ref) == (pair["label"] == "paraphrase")
        for text in (pair["text"], pair["text_pair"]):  # no markup, Strong's numbers or footnote anchors left
            assert text and text == text.strip() and "  " not in text
            assert not any(c in text for c in "<>\\¶0123456789"), (pair["id"], text)
    assert len(per_chapter) == stats["chapters"] == 1189 and len({p["book"] for p in pairs}) == stats["books"] == 66
    assert all(set(labels) == {"paraphrase", "different"} for labels in per_chapter.values())
    assert 0.48 < sum(p["first"] == "kjv" for p in pairs) / len(pairs) < 0.52
    first = pairs[0]
    assert first["id"] == "Gen.1.1/Gen.1.1" and {first["text"], first["text_pair"]} == {
        "In the beginning God created the heaven and the earth.",
        "In the beginning, God created the heavens and the earth."}
