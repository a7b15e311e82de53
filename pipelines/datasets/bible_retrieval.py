"""Verse retrieval across two English Bibles: a KJV verse retrieves its World English Bible rendering.

The aligned verses of the ``bible`` dataset (the same SWORD modules, cleaning and alignment:
:func:`bible.read_aligned`, 31,087 verses; its docstring says what alignment drops), made into two towers:
the KJV texts are the queries, the WEB texts the documents, and a verse's KJV text has one relevant document,
its WEB text.

Repeated texts are dropped so that retrieval is well-posed: identical documents cannot be told apart, and a
query that repeats has several answers. A verse is kept only if its KJV text is the first occurrence of that
exact text among the aligned KJV texts and its WEB text the first among the WEB texts (:func:`drop_repeats`).
117 KJV and 133 WEB texts repeat ("And the LORD spake unto Moses, saying," 72 times, the WEB's "Yahweh spoke
to Moses, saying," 71; the princes' offerings of Numbers 7, 12 times each), and 361 verses go: 204 repeat
both texts, 63 only the KJV's (Leviticus 18:1, where the WEB has "Yahweh said to Moses,"), 94 only the WEB's
(Exodus 35:8-9 repeat 25:6-7 in the WEB, not in the KJV, which words them differently). Counting first
occurrences among the kept verses only would keep 2 more. Texts equal only up to case and punctuation stay:
29 kept KJV texts and 51 kept WEB texts repeat an earlier kept one's that way, in parallel passages (Exodus
20:7 / Deuteronomy 5:11, 2 Samuel 22 / Psalm 18, Genesis 36 / 1 Chronicles 1): near-duplicates that a model
may mix up, and that can sit in two splits, as they are in different chapters.

30,726 verses are left, in 1,189 chapters of 66 books. MiniLM word pieces per verse: KJV mean 32.5, p99 72,
max 110; WEB mean 31.7, p99 71, max 109 (``max_length = 128`` truncates none).

Files:

    kjv.jsonl      {"id": "Gen.1.1", "text": <KJV text>, "chapter": "Gen.1", "book": "Gen"}, canonical order
    web.jsonl      the same ids, chapters and books in the same order; "text" is the WEB text
    pairs.jsonl    {"query_id": "Gen.1.1", "document_id": "Gen.1.1"}, one per verse
    stats.json     the alignment's counts (as the bible dataset's), "repeats" by which text repeats (kjv, web,
                   both) with "repeat_refs", "kept", "chapters", "books"

Read both towers with ``id_column = "id"`` and ``group_column = "chapter"``: the split is drawn by a hash of
the chapter, which a verse has in both tables, so its query and its document land in the same split and no
chapter straddles two.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable

from . import bible
from .bible import INSTALL, Ref, ref_name  # noqa: F401  (INSTALL: the same packages as the bible dataset)

NAME = "bible-retrieval"
TOWERS = ("kjv", "web")
"""The two towers, in the order of :func:`bible.align`'s text pairs: queries (KJV), documents (WEB)."""


def drop_repeats(aligned: dict[Ref, tuple[str, str]]) -> tuple[dict[Ref, tuple[str, str]], dict[str, list[Ref]]]:
    """The verses whose KJV text is the first occurrence of that exact text among all KJV texts of ``aligned``
    and whose WEB text is the first among all WEB texts, in the order of ``aligned``.

    Returns ``(kept, repeats)``; ``repeats`` maps ``"kjv"`` / ``"web"`` / ``"both"`` (which text repeats an
    earlier verse's) to the references left out. Occurrences count over every aligned verse, kept or not: a
    verse whose KJV text first appeared in a verse dropped for its WEB text is dropped too.
    """
    seen: dict[str, set[str]] = {tower: set() for tower in TOWERS}
    kept: dict[Ref, tuple[str, str]] = {}
    repeats: dict[str, list[Ref]] = {"kjv": [], "web": [], "both": []}
    for ref, texts in aligned.items():
        repeated = [tower for tower, text in zip(TOWERS, texts) if text in seen[tower]]
        for tower, text in zip(TOWERS, texts):
            seen[tower].add(text)
        if not repeated:
            kept[ref] = texts
        else:
            repeats["both" if len(repeated) == 2 else repeated[0]].append(ref)
    return kept, repeats


def tower_rows(kept: dict[Ref, tuple[str, str]]) -> tuple[list[dict], list[dict], list[dict]]:
    """``(kjv_rows, web_rows, pairs)``: one row per verse in each tower, ``{"id", "text", "chapter", "book"}``
    (the same id, chapter and book in both), and one ``{"query_id", "document_id"}`` pair per verse."""
    kjv_rows, web_rows, pairs = [], [], []
    for ref, (kjv_text, web_text) in kept.items():
        book, chapter, _ = ref
        where = {"chapter": f"{book}.{chapter}", "book": book}
        kjv_rows.append({"id": ref_name(ref), "text": kjv_text, **where})
        web_rows.append({"id": ref_name(ref), "text": web_text, **where})
        pairs.append({"query_id": ref_name(ref), "document_id": ref_name(ref)})
    return kjv_rows, web_rows, pairs


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def prepare(out_dir: Path) -> None:
    start = time.perf_counter()
    cleaned, aligned, dropped = bible.read_aligned()
    kept, repeats = drop_repeats(aligned)
    kjv_rows, web_rows, pairs = tower_rows(kept)
    write_jsonl(out_dir / "kjv.jsonl", kjv_rows)
    write_jsonl(out_dir / "web.jsonl", web_rows)
    write_jsonl(out_dir / "pairs.jsonl", pairs)
    stats = {
        **bible.alignment_stats(cleaned, aligned, dropped),
        "repeats": {which: len(refs) for which, refs in repeats.items()},
        "repeat_refs": {which: [ref_name(r) for r in refs] for which, refs in repeats.items()},
        "kept": len(kept),
        "chapters": len({row["chapter"] for row in kjv_rows}),
        "books": len({row["book"] for row in kjv_rows}),
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{NAME}: {len(kept)} of {len(aligned)} aligned verses kept, repeated texts dropped {stats['repeats']} "
          f"in {time.perf_counter() - start:.0f} s")
