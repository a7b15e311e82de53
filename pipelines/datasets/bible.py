"""Verse-pair paraphrase detection from two aligned English Bibles (KJV 1769 and the World English Bible).

Debian ships both as SWORD modules (``sword-text-kjv``: engKJV2006eb, KJV versification; ``sword-text-web``:
engWEB2015eb, NRSVA versification with the deuterocanon), read with PyPI ``pysword``. Every verse is
cleaned of its OSIS markup (Strong's numbers, footnotes, cross-references, psalm titles), the two Bibles are
aligned by (book, chapter, verse), and each aligned verse gives two pairs: the KJV and WEB renderings of it
(label ``paraphrase``) and its KJV text with the WEB text of another verse of the same chapter (label
``different``, a hard negative: same book, characters and style). Which translation comes first is drawn per
pair, so a model cannot learn "KJV first".

``pairs.jsonl`` rows: ``{"id", "text", "text_pair", "label", "chapter", "book", "first"}``; ``id`` is
``<KJV verse>/<WEB verse>`` (``Gen.1.1/Gen.1.1`` for a positive, ``Gen.1.1/Gen.1.7`` for a negative),
``chapter`` is ``Gen.1`` (split by it, so a verse never sits on both sides of a split), ``first`` is the
translation in ``text``. ``stats.json`` gives the counts and every verse dropped, with the reason.

What is dropped (measured on KJV 14.3 / WEB 426.0: 31,102 KJV verses, 37,791 WEB verse slots):

* the WEB's 17 deuterocanonical books (6,687 slots) and two NRSVA-only slots (3 John 1:15, Revelation
  12:18), which the KJV lacks; the module keeps the KJV's verse boundaries there, so no shift follows;
* 7 verses empty in the WEB: Luke 17:36, Acts 8:37, 15:34 and 24:7, which its text omits, and Romans
  16:25-27, which it moves to the end of 14:23;
* a verse whose two texts differ in length by more than 2x (:data:`MAX_LENGTH_RATIO`), 6 verses: Revelation
  22:21 (the WEB module appends its glossary, 17,000 characters), Romans 14:23 (the WEB moves the doxology
  of Romans 16:25-27 there), 3 readings of the KJV's Textus Receptus that the WEB's Majority Text lacks
  (1 John 5:7, Matthew 27:35, Acts 9:6) and Jeremiah 51:21, half of which the WEB leaves out: not
  paraphrases of each other;
* a verse whose KJV text shares far more words with a neighbouring WEB verse than with its own
  (:data:`SHIFT_MARGIN`), 2 verses: Matthew 23:13 and 23:14, which the two texts number the other way round.

31,087 verses are left, in 1,189 chapters of 66 books (every chapter keeps 2+ verses, so each verse gets a
negative): 61,914 pairs, 30,891 ``paraphrase`` and 31,023 ``different``, after leaving out 260 pairs that
repeat an earlier pair's texts (:func:`build_pairs`). Pairs average 67 MiniLM word pieces (p99 141, max 222).
Word overlap alone separates the labels at 0.97 accuracy: the WEB revises the ASV, a revision of the KJV.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

from unipt.extract import hash_unit

from . import Install

NAME = "bible"
INSTALL = Install(apt=("sword-text-kjv", "sword-text-web"), pip=("pysword",))

SWORD_PATH = Path("/usr/share/sword")
"""Where Debian's sword-text-* packages put mods.d/ and modules/."""
MODULES = {"kjv": "engKJV2006eb", "web": "engWEB2015eb"}
"""The SWORD module of each translation (their mods.d/*.conf section names)."""
MAX_LENGTH_RATIO = 2.0
"""Drop a verse whose WEB and KJV texts differ in length (characters) by more than this factor either way.
Of the 31,095 verses with text in both, 6 lie outside [0.5, 2] (0.28-0.45, then 4.8 and 307), the next
ones at 0.54 (Job 3:2, "And Job spake, and said," / "Job answered:") and 1.71 (the genealogies' "begat" ->
"became the father of")."""
SHIFT_MARGIN = 0.3
"""Drop a verse whose KJV text's word overlap (Jaccard of words of 4+ letters) with the WEB text of the verse
before or after exceeds that with its own WEB text by more than this. The two swapped verses exceed it by
0.44; the next margins are 0.23 (Revelation 7:6, in a list of tribes) and 0.22 (Revelation 22:21)."""
NEAR_IDENTICAL = 0.8
"""Word overlap (as for SHIFT_MARGIN) from which another verse of the chapter is too close to serve as a
negative, e.g. Exodus 37:4 and 37:28 ("And he made [the] staves of shittim wood, and overlaid them with
gold."), Psalm 24:7 and 24:9; the genealogies' "And Seth lived after he begat Enos eight hundred and seven
years" against the verse about Enos (0.7) stay: hard negatives that differ in names and numbers."""
NEGATIVE_POOL = 3
"""A negative is drawn among this many candidates closest in length to the verse (see build_pairs). Drawn
among all candidates instead, the length ratio alone told the labels apart at 0.82 accuracy; with 3, 0.57."""

Ref = tuple[str, int, int]
"""A verse reference: (OSIS book name, chapter, verse), e.g. ("Gen", 1, 1)."""

_NOTE = re.compile(r"<note\b[^>]*/>|<note\b.*?</note>", re.DOTALL)
_USFM_MARKER = re.compile(r"\\[a-z]+\d*\*?")  # the KJV module leaves "\nd " before JEHOVAH/LORD in 27 verses
_MARKUP_LEFT = re.compile(r"[<>\\]|strong:[HG]|\b[HG]\d{3,4}\b|\d+[:.]\d+")  # tags, Strong's, note anchors


def ref_name(ref: Ref) -> str:
    book, chapter, verse = ref
    return f"{book}.{chapter}.{verse}"


def read_module(module: str, sword_path: Path = SWORD_PATH) -> dict[Ref, str]:
    """Every verse slot of one SWORD Bible module, as raw OSIS text, in canonical order ("" = an empty slot)."""
    from pysword.modules import SwordModules

    modules = SwordModules(str(sword_path))
    found = modules.parse_modules()
    if module not in found:
        raise FileNotFoundError(f"no SWORD module {module!r} under {sword_path}; found {sorted(found)}. "
                                f"Install it: scripts/install_data.sh {NAME}")
    bible = modules.get_bible_from_module(module)
    # These modules compress one block per book and pysword decompresses the block again for every verse
    # (2.5 min for both Bibles); remembering the last block makes it 20 s.
    bible._decompressed_text = functools.lru_cache(maxsize=2)(bible._decompressed_text)
    verses = {}
    for books in bible.get_structure().get_books().values():
        for book in books:
            for chapter, n_verses in enumerate(book.chapter_lengths, start=1):
                texts = list(bible.get_iter(books=book.osis_name, chapters=chapter, clean=False))
                if len(texts) != n_verses:
                    raise ValueError(f"{module} {book.osis_name} {chapter}: read {len(texts)} verses, its "
                                     f"versification has {n_verses}")
                for verse, text in enumerate(texts, start=1):
                    verses[(book.osis_name, chapter, verse)] = text
    return verses


def clean_osis(text: str) -> str:
    """Plain text of one OSIS verse: notes (footnotes, cross-references) dropped with their content, titles
    too (pysword's cleaner), every other tag removed keeping its content; "¶" and whitespace normalised."""
    # A note often sits between two words with no space ("God<note>…</note><w>created</w>"): leave a mark
    # that becomes a space only where it would otherwise join two words.
    text = _NOTE.sub("\x00", text)
    if "<" in text:
        text = _osis_cleaner().clean(text)
    text = re.sub(r"(?<=\S)\x00+(?=[^\s,.;:!?’”)\]])", " ", text).replace("\x00", "")
    text = _USFM_MARKER.sub("", text).replace("¶", "")
    return " ".join(text.split())


@functools.cache
def _osis_cleaner():
    from pysword.cleaner import OSISCleaner

    return OSISCleaner()  # compiles ~100 regular expressions: once


def align(kjv: dict[Ref, str], web: dict[Ref, str]) -> tuple[dict[Ref, tuple[str, str]], dict[str, list[Ref]]]:
    """Pair the two translations' cleaned verses by reference.

    Returns ``(aligned, dropped)``: ``aligned`` maps each kept reference to ``(kjv_text, web_text)`` in the
    KJV's order; ``dropped`` maps a reason to the references it removed: ``only_kjv`` / ``only_web`` (no slot
    in the other versification, e.g. the deuterocanon), ``empty`` (no text in either), ``length_ratio``
    (lengths differ by more than :data:`MAX_LENGTH_RATIO`), ``shifted`` (see :data:`SHIFT_MARGIN`).
    """
    dropped: dict[str, list[Ref]] = {"only_kjv": [], "only_web": [], "empty": [], "length_ratio": [], "shifted": []}
    dropped["only_web"] = [ref for ref in web if ref not in kjv]
    candidates = {}
    for ref, kjv_text in kjv.items():
        if ref not in web:
            dropped["only_kjv"].append(ref)
        elif not kjv_text or not web[ref]:
            dropped["empty"].append(ref)
        elif not 1 / MAX_LENGTH_RATIO <= len(web[ref]) / len(kjv_text) <= MAX_LENGTH_RATIO:
            dropped["length_ratio"].append(ref)
        else:
            candidates[ref] = (kjv_text, web[ref])
    aligned = {}
    for ref, (kjv_text, web_text) in candidates.items():
        book, chapter, verse = ref
        own = _overlap(kjv_text, web_text)
        neighbours = [web.get((book, chapter, verse + step), "") for step in (-1, 1)]
        if any(_overlap(kjv_text, other) > own + SHIFT_MARGIN for other in neighbours if other):
            dropped["shifted"].append(ref)
        else:
            aligned[ref] = (kjv_text, web_text)
    return aligned, dropped


@functools.lru_cache(maxsize=1 << 17)  # build_pairs compares each verse with every other of its chapter
def _words(text: str) -> frozenset[str]:
    return frozenset(w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 4)


def _overlap(a: str, b: str) -> float:
    wa, wb = _words(a), _words(b)
    return len(wa & wb) / max(1, len(wa | wb))


@functools.lru_cache(maxsize=1 << 17)
def _normalised(text: str) -> str:
    return " ".join(re.findall(r"[a-z]+", text.lower()))


def build_pairs(aligned: dict[Ref, tuple[str, str]]) -> tuple[list[dict], dict[str, int]]:
    """Two pairs per aligned verse, in the order of ``aligned``: a positive and a same-chapter hard negative.

    The negative pairs the verse's KJV text with the WEB text of another verse of its chapter: of the
    :data:`NEGATIVE_POOL` whose WEB text is closest in length to this verse's (so length says nothing about
    the label), one drawn by a hash of the verse reference. Candidates near-identical to the verse in either
    translation (:func:`near_identical`: refrains such as "And the LORD spake unto Moses, saying,") are left
    out, as they would be false negatives; a verse with no candidate gets no negative (``no_negative``).
    Which translation goes in ``text`` is drawn by a hash of the pair's id. A pair whose two texts repeat an
    earlier pair's (either order) is left out (``duplicate_<label>``): formulaic verses recur across
    chapters, and a repeat would put the same example in two splits.

    Returns ``(pairs, counts)``, the counts of what was left out.
    """
    by_chapter: dict[tuple[str, int], list[Ref]] = defaultdict(list)
    for ref in aligned:
        by_chapter[ref[:2]].append(ref)
    counts = Counter()
    pairs, seen = [], set()

    def add(kjv_ref: Ref, web_ref: Ref, label: str) -> None:
        kjv_text, web_text = aligned[kjv_ref][0], aligned[web_ref][1]
        key = frozenset((kjv_text, web_text))
        if key in seen:
            counts[f"duplicate_{label}"] += 1
            return
        seen.add(key)
        pair_id = f"{ref_name(kjv_ref)}/{ref_name(web_ref)}"
        kjv_first = hash_unit(pair_id, "bible-order") < 0.5
        book, chapter, _ = kjv_ref
        pairs.append({"id": pair_id, "text": kjv_text if kjv_first else web_text,
                      "text_pair": web_text if kjv_first else kjv_text, "label": label,
                      "chapter": f"{book}.{chapter}", "book": book, "first": "kjv" if kjv_first else "web"})

    for ref, texts in aligned.items():
        add(ref, ref, "paraphrase")
        others = [other for other in by_chapter[ref[:2]] if other != ref and not near_identical(texts, aligned[other])]
        if not others:
            counts["no_negative"] += 1
            continue
        length = len(texts[1])
        pool = sorted(others, key=lambda other: (abs(math.log(len(aligned[other][1]) / length)), other[2]))
        pool = pool[:NEGATIVE_POOL]
        add(ref, pool[int(hash_unit(ref_name(ref), "bible-negative") * len(pool))], "different")
    return pairs, dict(sorted(counts.items()))


def near_identical(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Whether two verses, each ``(kjv_text, web_text)``, say nearly the same in either translation: equal up
    to case and punctuation, or a word overlap of at least :data:`NEAR_IDENTICAL`."""
    return any(_normalised(x) == _normalised(y) or _overlap(x, y) >= NEAR_IDENTICAL for x, y in zip(a, b))


def read_aligned() -> tuple[dict[str, dict[Ref, str]], dict[Ref, tuple[str, str]], dict[str, list[Ref]]]:
    """Both Bibles read (:data:`MODULES`), cleaned (:func:`clean_osis`) and aligned (:func:`align`).

    Returns ``(cleaned, aligned, dropped)``: ``cleaned`` maps ``"kjv"`` / ``"web"`` to every verse slot's
    text, ``aligned`` and ``dropped`` are :func:`align`'s. Raises if markup is left in an aligned verse.
    """
    raw = {name: read_module(module) for name, module in MODULES.items()}
    cleaned = {name: {ref: clean_osis(text) for ref, text in verses.items()} for name, verses in raw.items()}
    aligned, dropped = align(cleaned["kjv"], cleaned["web"])
    for ref, texts in aligned.items():
        for text in texts:
            if _MARKUP_LEFT.search(text):
                raise ValueError(f"{ref_name(ref)}: markup left after cleaning: {text!r}")
    return cleaned, aligned, dropped


def alignment_stats(cleaned: dict[str, dict[Ref, str]], aligned: dict[Ref, tuple[str, str]],
                    dropped: dict[str, list[Ref]]) -> dict:
    """The counts of :func:`read_aligned` for stats.json: verses per translation, aligned, dropped (why)."""
    kjv_books = dict.fromkeys(ref[0] for ref in cleaned["kjv"])
    return {
        "modules": MODULES,
        "verses": {name: sum(1 for text in verses.values() if text) for name, verses in cleaned.items()},
        "verse_slots": {name: len(verses) for name, verses in cleaned.items()},
        "aligned": len(aligned),
        "dropped": {reason: len(refs) for reason, refs in dropped.items()},
        "dropped_refs": {reason: [ref_name(r) for r in refs]
                         for reason, refs in dropped.items() if reason != "only_web"},
        "only_web_books": sorted({ref[0] for ref in dropped["only_web"] if ref[0] not in kjv_books}),
        "only_web_refs_in_kjv_books": [ref_name(r) for r in dropped["only_web"] if r[0] in kjv_books],
    }


def prepare(out_dir: Path) -> None:
    start = time.perf_counter()
    cleaned, aligned, dropped = read_aligned()
    pairs, counts = build_pairs(aligned)
    with open(out_dir / "pairs.jsonl", "w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")

    labels_per_chapter = defaultdict(set)
    for pair in pairs:
        labels_per_chapter[pair["chapter"]].add(pair["label"])
    stats = {
        **alignment_stats(cleaned, aligned, dropped),
        "pairs": dict(Counter(pair["label"] for pair in pairs)),
        "pair_counts": counts,
        "first": dict(Counter(pair["first"] for pair in pairs)),
        "chapters": len(labels_per_chapter),
        "books": len({pair["book"] for pair in pairs}),
        "chapters_without_negatives": sorted(chapter for chapter, labels in labels_per_chapter.items()
                                             if "different" not in labels),
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{NAME}: {len(aligned)} aligned verses, {len(pairs)} pairs {stats['pairs']}, dropped {stats['dropped']} "
          f"in {time.perf_counter() - start:.0f} s")
