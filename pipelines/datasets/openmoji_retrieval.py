"""OpenMoji image-caption retrieval: an emoji drawing retrieves its captions, a caption its drawing.

Source: npm ``openmoji`` 17.0.0 (CC BY-SA 4.0), as for the ``openmoji`` dataset: ``data/openmoji.csv`` and
``color/svg/<hexcode>.svg``, rasterised the same way (:func:`openmoji.rasterise`: 72 x 72 px RGB PNG on white).

Of the CSV's 4,495 emojis, the 2,030 skin-tone variants (a non-empty ``skintone``) are left out and the
2,465 base designs kept. A variant is its base drawing recoloured, annotated "<base>: medium skin tone" and
so on: as near-duplicate documents they would make a caption's top-1 a coin toss between recolourings that
the caption never names. One base design, 1F3F4-E0065-E0073-E0063-E006D-E007F (castile-la mancha flag), is
left out too: its SVG points at a marker it does not define, and cairosvg fails on it (``unrenderable``).

Captions, several per image as in COCO (:func:`emoji_captions`): k=0 the ``annotation`` ("grinning face";
mean 2.8 MiniLM word pieces, max 12), k=1 the CLDR ``tags`` keyword list as written ("cheerful, cheery, face,
grin, ..."; mean 11.0, p99 35, max 44) when not empty (542 base designs have none: the 405 extras-openmoji
and 137 extras-unicode) and not the annotation again (11, e.g. "mountain"). A caption whose text (stripped,
lower-cased) an earlier caption in CSV order already has, of another image, is dropped, since as a query it
would have several right answers (:func:`build_tables`): 17 annotations (11 repeat another emoji's
annotation, 6 an earlier emoji's tag list: "house" is the tag list of "houses", which comes first) and 57 tag
lists (53 repeat another's tag list, mostly families and gendered variants: "boy, child, family, man" is the
tags of four designs; 4 an earlier annotation). An image left without a caption is dropped: 13, 11 of them
OpenMoji's own drawings of emojis that Unicode added later (extras-openmoji "donkey", "brain", "axe", ...,
annotated like the Unicode emoji, without tags) and 2 whose annotation is an earlier emoji's tag list ("c":
copyright, "mark": bookmark).

2,451 images are left, with 4,302 captions (2,447 k=0, 1,855 k=1; 1,851 images have two, 600 one): 4,302
text-to-image queries with one relevant image each, 2,451 image-to-text queries with one or two relevant
captions. By group: 392 extras-openmoji, 388 people-body, 270 flags, 266 objects, 224 symbols, 219
travel-places, 171 smileys-emotion, 160 animals-nature, 136 extras-unicode, 131 food-drink, 85 activities, 9
component. 35 kept images have the same PNG bytes as an earlier one and stay in the gallery (stats.json names
them): 26 people designs drawn alike for man / person or man / woman / neutral ("man student" / "student",
"men wrestling" / "people wrestling"), 7 flags that two places share ("flag: France" / "flag: Clipperton
Island", "flag: Monaco" / "flag: Indonesia"), "dj" / "dj man" and "combining enclosing keycap" /
"blue square". Their captions name which one is meant, but no image can tell them apart.

Files:

    images.csv     id,image,group: hexcode, images/<hexcode>.png (relative to the CSV), the CSV's group
    captions.csv   id,text,image_id: <hexcode>#<k>, the caption, its image's hexcode
    pairs.csv      query_id,document_id: one row per caption (caption id, its image's hexcode)
    stats.json     counts of everything above, the unrenderable and identical-PNG hexcodes
    images/        <hexcode>.png

For splits that agree, read images.csv with ``id_column = "id"`` and captions.csv with ``id_column = "id"``
and ``group_column = "image_id"``: both draw the split by a hash of the hexcode, so an image and its
captions land in the same split.
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from . import npm_package_dir, openmoji
from .openmoji import INSTALL, base_designs, rasterise  # noqa: F401  (INSTALL: the openmoji dataset's packages)

NAME = "openmoji-retrieval"
IMAGE_COLUMNS = ("id", "image", "group")
CAPTION_COLUMNS = ("id", "text", "image_id")
PAIR_COLUMNS = ("query_id", "document_id")
WORKERS = 2
"""Processes rasterising the SVGs (1 = in this process)."""
MAX_UNRENDERABLE = 5
"""More SVGs than this that cairosvg cannot draw stop prepare: a broken install, not a few broken drawings
(openmoji 17.0.0 has one)."""


def caption_key(text: str) -> str:
    """What makes two captions the same text: equal once stripped and lower-cased."""
    return text.strip().lower()


def emoji_captions(row: Mapping[str, str]) -> list[tuple[int, str]]:
    """An emoji's captions as ``(k, text)``: k=0 its ``annotation``, k=1 its CLDR ``tags`` keyword list as
    written (e.g. "face, grin"), when not empty and not the annotation again (:func:`caption_key`). Stripped;
    an empty annotation gives no k=0."""
    captions = []
    annotation, tags = row["annotation"].strip(), row["tags"].strip()
    if annotation:
        captions.append((0, annotation))
    if tags and caption_key(tags) != caption_key(annotation):
        captions.append((1, tags))
    return captions


def build_tables(rows: Iterable[Mapping[str, str]]) -> tuple[list[dict], list[dict], dict[str, int]]:
    """images.csv and captions.csv rows from base designs, in their order, with counts of what was dropped.

    A caption whose text (:func:`caption_key`) an earlier caption already has, of another image, is dropped
    (``duplicate_k0`` / ``duplicate_k1``): as a query it would have several right answers. An image left with
    no caption is dropped (``images_without_caption``). Returns ``(images, captions, counts)``.
    """
    images, captions = [], []
    seen: set[str] = set()
    counts = Counter({"duplicate_k0": 0, "duplicate_k1": 0, "images_without_caption": 0})
    for row in rows:
        hexcode = row["hexcode"]
        kept = []
        for k, text in emoji_captions(row):
            if caption_key(text) in seen:
                counts[f"duplicate_k{k}"] += 1
                continue
            seen.add(caption_key(text))
            kept.append({"id": f"{hexcode}#{k}", "text": text, "image_id": hexcode})
        if not kept:
            counts["images_without_caption"] += 1
            continue
        images.append({"id": hexcode, "image": f"images/{hexcode}.png", "group": row["group"]})
        captions.extend(kept)
    return images, captions, dict(counts)


def pair_rows(captions: Iterable[Mapping[str, str]]) -> list[dict]:
    """pairs.csv rows: each caption (query) with its image (document)."""
    return [{"query_id": caption["id"], "document_id": caption["image_id"]} for caption in captions]


def try_rasterise(svg: bytes) -> tuple[bytes | None, str | None]:
    """``(png, None)`` from :func:`rasterise`, or ``(None, why)`` for an SVG that cairosvg cannot draw."""
    try:
        return rasterise(svg), None
    except Exception as exc:  # cairosvg fails on malformed drawings with whatever its code meets (AttributeError)
        return None, f"{type(exc).__name__}: {exc}"


def rasterise_all(svgs: Sequence[bytes], workers: int = WORKERS) -> list[tuple[bytes | None, str | None]]:
    """:func:`try_rasterise` over ``svgs``, in their order, in ``workers`` processes."""
    if workers <= 1 or len(svgs) < 64:
        return [try_rasterise(svg) for svg in svgs]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        return list(pool.map(try_rasterise, svgs, chunksize=32))


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def prepare(out_dir: Path) -> None:
    package = npm_package_dir("openmoji")
    emojis = openmoji.read_emojis(package)
    rows = base_designs(emojis)
    rendered = rasterise_all([openmoji.emoji_svg(package, row["hexcode"]) for row in rows])
    unrenderable = [[row["hexcode"], why] for row, (png, why) in zip(rows, rendered) if png is None]
    if len(unrenderable) > MAX_UNRENDERABLE:
        raise RuntimeError(f"cairosvg could not draw {len(unrenderable)} of {len(rows)} emojis, e.g. "
                           f"{unrenderable[:3]}: is cairosvg (and libcairo) installed and working?")
    pngs = {row["hexcode"]: png for row, (png, _) in zip(rows, rendered) if png is not None}
    images, captions, counts = build_tables(row for row in rows if row["hexcode"] in pngs)
    (out_dir / "images").mkdir()
    first_with_png: dict[bytes, str] = {}
    identical = []
    for image in images:
        png = pngs[image["id"]]
        (out_dir / image["image"]).write_bytes(png)
        if png in first_with_png:
            identical.append([image["id"], first_with_png[png]])
        else:
            first_with_png[png] = image["id"]
    write_csv(out_dir / "images.csv", IMAGE_COLUMNS, images)
    write_csv(out_dir / "captions.csv", CAPTION_COLUMNS, captions)
    write_csv(out_dir / "pairs.csv", PAIR_COLUMNS, pair_rows(captions))
    stats = {
        "emojis": len(emojis),
        "skin_tone_variants": len(emojis) - len(rows),
        "base_designs": len(rows),
        "unrenderable": len(unrenderable),
        "unrenderable_ids": unrenderable,
        "images": len(images),
        "captions": len(captions),
        "captions_by_k": {f"k{k}": n for k, n in sorted(Counter(c["id"].rsplit("#", 1)[1] for c in captions).items())},
        **counts,
        "images_by_group": dict(sorted(Counter(image["group"] for image in images).items())),
        "identical_png": len(identical),
        "identical_png_ids": identical,
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{NAME}: {len(images)} images, {len(captions)} captions {stats['captions_by_k']} of {len(rows)} base "
          f"designs; dropped {counts}; {len(identical)} images repeat an earlier one's PNG")
