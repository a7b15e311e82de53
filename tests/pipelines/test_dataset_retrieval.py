"""The retrieval datasets (bible-retrieval, openmoji-retrieval): dropping repeated texts and building the two
towers on small in-memory inputs, openmoji-retrieval's prepare on a fake npm package, then counts on the real
prepared data (skipped unless ``scripts/install_data.sh bible-retrieval`` / ``openmoji-retrieval`` has run)."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter

import pytest

from conftest import write_fake_openmoji

from unipt.pipelines.datasets import bible, bible_retrieval, dataset_dir, get_dataset, openmoji, openmoji_retrieval

SPAKE = ("And the LORD spake unto Moses, saying,", "Yahweh spoke to Moses, saying,")
ALIGNED = {
    ("Exod", 6, 1): SPAKE,
    ("Exod", 6, 2): (SPAKE[0], "Yahweh said to Moses,"),                # the KJV text repeats
    ("Exod", 6, 3): ("And Moses spake before the LORD, saying,", SPAKE[1]),  # the WEB text repeats
    ("Exod", 6, 4): SPAKE,                                                # both repeat
    ("Exod", 6, 5): ("And God spake unto Moses,", "God spoke to Moses,"),
    # The WEB text first appeared in 6:2, itself dropped: still a repeat (occurrences count over every verse).
    ("Lev", 1, 1): ("And the LORD called unto Moses,", "Yahweh said to Moses,"),
    # Equal up to punctuation only: not the same text, kept.
    ("Lev", 1, 2): ("And the LORD spake unto Moses, saying:", "Yahweh spoke to Moses, saying:"),
}


def test_drop_repeats_keeps_a_verse_only_when_both_texts_are_first_occurrences():
    kept, repeats = bible_retrieval.drop_repeats(ALIGNED)
    assert kept == {("Exod", 6, 1): SPAKE, ("Exod", 6, 5): ALIGNED[("Exod", 6, 5)],
                    ("Lev", 1, 2): ALIGNED[("Lev", 1, 2)]}
    assert list(kept) == [("Exod", 6, 1), ("Exod", 6, 5), ("Lev", 1, 2)]  # the order of aligned
    assert repeats == {"kjv": [("Exod", 6, 2)], "web": [("Exod", 6, 3), ("Lev", 1, 1)], "both": [("Exod", 6, 4)]}
    assert bible_retrieval.drop_repeats({}) == ({}, {"kjv": [], "web": [], "both": []})


def test_tower_rows_share_ids_chapters_and_books():
    kept, _ = bible_retrieval.drop_repeats(ALIGNED)
    kjv, web, pairs = bible_retrieval.tower_rows(kept)
    assert kjv == [
        {"id": "Exod.6.1", "text": SPAKE[0], "chapter": "Exod.6", "book": "Exod"},
        {"id": "Exod.6.5", "text": "And God spake unto Moses,", "chapter": "Exod.6", "book": "Exod"},
        {"id": "Lev.1.2", "text": "And the LORD spake unto Moses, saying:", "chapter": "Lev.1", "book": "Lev"},
    ]
    assert web == [
        {"id": "Exod.6.1", "text": SPAKE[1], "chapter": "Exod.6", "book": "Exod"},
        {"id": "Exod.6.5", "text": "God spoke to Moses,", "chapter": "Exod.6", "book": "Exod"},
        {"id": "Lev.1.2", "text": "Yahweh spoke to Moses, saying:", "chapter": "Lev.1", "book": "Lev"},
    ]
    assert pairs == [{"query_id": "Exod.6.1", "document_id": "Exod.6.1"},
                     {"query_id": "Exod.6.5", "document_id": "Exod.6.5"},
                     {"query_id": "Lev.1.2", "document_id": "Lev.1.2"}]


HEADER = ("emoji,hexcode,group,subgroups,annotation,tags,openmoji_tags,openmoji_author,openmoji_date,skintone,"
          "skintone_combination,skintone_base_emoji,skintone_base_hexcode,unicode,order\n")
OPENMOJI_CSV = HEADER + (
    '😀,1F600,smileys-emotion,face-smiling,grinning face,"face, grin",smile,A,2018,,,,,1,1\n'
    '👍,1F44D,people-body,hand-fingers-closed,thumbs up,"hand, thumb, up",,A,2018,,single,👍,1F44D,0.6,2\n'
    '👍🏻,1F44D-1F3FB,people-body,hand-fingers-closed,thumbs up: light skin tone,"hand, thumb, up",,A,2018,1,'
    'single,👍,1F44D,1,3\n'
    '⛰,26F0,travel-places,place-geographic,mountain ,Mountain,,A,2018,,,,,0.7,4\n'  # tags = the annotation
    '🏘,1F3D8,travel-places,place-building,houses,house,,A,2018,,,,,0.7,5\n'
    '🏠,1F3E0,travel-places,place-building,house,"building, home, house",,A,2018,,,,,0.6,6\n'  # k=0 repeats
    '👎,1F44E,people-body,hand-fingers-closed,thumbs down,"Hand, Thumb, Up",,A,2018,,single,👎,1F44E,0.6,7\n'
    '👎🏿,1F44E-1F3FF,people-body,hand-fingers-closed,thumbs down: dark skin tone,,,A,2018,5,single,👎,1F44E,1,'
    '8\n'
    ',E001,extras-openmoji,animal-mammal,Houses,,,A,2020,,,,,,9\n'  # its only caption repeats: image dropped
    ',E002,extras-openmoji,animal-mammal,donkey,,,A,2020,,,,,,10\n'
)


def om_rows():
    return list(csv.DictReader(io.StringIO(OPENMOJI_CSV)))


def test_emoji_captions_annotation_then_tags_unless_the_same():
    rows = {row["hexcode"]: row for row in om_rows()}
    assert openmoji_retrieval.emoji_captions(rows["1F600"]) == [(0, "grinning face"), (1, "face, grin")]
    assert openmoji_retrieval.emoji_captions(rows["26F0"]) == [(0, "mountain")]  # "Mountain": the same, stripped
    assert openmoji_retrieval.emoji_captions(rows["E002"]) == [(0, "donkey")]  # no tags
    assert openmoji_retrieval.emoji_captions({"annotation": " ", "tags": "x, y"}) == [(1, "x, y")]


def test_build_tables_drops_later_duplicate_texts_and_images_left_without_captions():
    images, captions, counts = openmoji_retrieval.build_tables(openmoji.base_designs(om_rows()))
    assert images == [
        {"id": "1F600", "image": "images/1F600.png", "group": "smileys-emotion"},
        {"id": "1F44D", "image": "images/1F44D.png", "group": "people-body"},
        {"id": "26F0", "image": "images/26F0.png", "group": "travel-places"},
        {"id": "1F3D8", "image": "images/1F3D8.png", "group": "travel-places"},
        {"id": "1F3E0", "image": "images/1F3E0.png", "group": "travel-places"},
        {"id": "1F44E", "image": "images/1F44E.png", "group": "people-body"},
        {"id": "E002", "image": "images/E002.png", "group": "extras-openmoji"},
    ]
    assert captions == [
        {"id": "1F600#0", "text": "grinning face", "image_id": "1F600"},
        {"id": "1F600#1", "text": "face, grin", "image_id": "1F600"},
        {"id": "1F44D#0", "text": "thumbs up", "image_id": "1F44D"},
        {"id": "1F44D#1", "text": "hand, thumb, up", "image_id": "1F44D"},
        {"id": "26F0#0", "text": "mountain", "image_id": "26F0"},
        {"id": "1F3D8#0", "text": "houses", "image_id": "1F3D8"},
        {"id": "1F3D8#1", "text": "house", "image_id": "1F3D8"},
        # 1F3E0's annotation "house" is 1F3D8's tags, which come first
        {"id": "1F3E0#1", "text": "building, home, house", "image_id": "1F3E0"},
        {"id": "1F44E#0", "text": "thumbs down", "image_id": "1F44E"},  # its tags repeat 1F44D's, case aside
        {"id": "E002#0", "text": "donkey", "image_id": "E002"},
    ]
    assert counts == {"duplicate_k0": 2, "duplicate_k1": 1, "images_without_caption": 1}  # E001: "Houses"
    assert openmoji_retrieval.pair_rows(captions[:3]) == [{"query_id": "1F600#0", "document_id": "1F600"},
                                                         {"query_id": "1F600#1", "document_id": "1F600"},
                                                         {"query_id": "1F44D#0", "document_id": "1F44D"}]


def test_skin_tone_variants_are_not_images_nor_captions():
    images, captions, _ = openmoji_retrieval.build_tables(openmoji.base_designs(om_rows()))
    assert not any("-1F3F" in image["id"] for image in images)
    assert not any("skin tone" in caption["text"] for caption in captions)
    # Counted, the thumbs-up variant's annotation would be a caption of its own image.
    everything, _, _ = openmoji_retrieval.build_tables(om_rows())
    assert "1F44D-1F3FB" in [image["id"] for image in everything]


SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 10 10" width="10" height="10">'
       b'<rect x="0" y="0" width="5" height="10" fill="#ff0000"/></svg>')
OTHER_SVG = SVG.replace(b"#ff0000", b"#0000ff")
BROKEN_SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 10 10"><line x1="1" y1="1" x2="9" y2="9" '
              b'stroke="#000" marker-end="url(#Dot)"/></svg>')  # a marker it never defines: cairosvg fails


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """The npm package's layout under a temporary $UNIPT_CACHE: data/openmoji.csv and color/svg/*.svg."""
    monkeypatch.setenv("UNIPT_CACHE", str(tmp_path / "cache"))
    svgs = {row["hexcode"]: {"1F44D": OTHER_SVG, "26F0": BROKEN_SVG}.get(row["hexcode"], SVG) for row in om_rows()}
    return write_fake_openmoji(tmp_path / "cache", OPENMOJI_CSV, svgs)


def read_csv(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_openmoji_prepare_writes_the_tables_and_drops_an_unrenderable_svg(fake_package, tmp_path):
    pytest.importorskip("cairosvg", reason="needs cairosvg: scripts/install_data.sh openmoji-retrieval")
    out = tmp_path / "out"
    out.mkdir()
    openmoji_retrieval.prepare(out)
    images, captions, pairs = (read_csv(out / name) for name in ("images.csv", "captions.csv", "pairs.csv"))
    assert [image["id"] for image in images] == ["1F600", "1F44D", "1F3D8", "1F3E0", "1F44E", "E002"]  # no 26F0
    assert (out / "images.csv").read_text(encoding="utf-8").splitlines()[:2] == [
        "id,image,group", "1F600,images/1F600.png,smileys-emotion"]
    assert (out / "captions.csv").read_text(encoding="utf-8").splitlines()[:3] == [
        "id,text,image_id", "1F600#0,grinning face,1F600", '1F600#1,"face, grin",1F600']
    assert [c["id"] for c in captions] == ["1F600#0", "1F600#1", "1F44D#0", "1F44D#1", "1F3D8#0", "1F3D8#1",
                                           "1F3E0#1", "1F44E#0", "E002#0"]
    assert pairs == [{"query_id": c["id"], "document_id": c["image_id"]} for c in captions]
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{i['id']}.png" for i in images)
    assert (out / "images" / "1F600.png").read_bytes() == openmoji.rasterise(SVG)
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert stats["unrenderable_ids"][0][0] == "26F0"
    assert {k: stats[k] for k in ("emojis", "skin_tone_variants", "base_designs", "unrenderable", "images",
                                  "captions", "captions_by_k", "duplicate_k0", "duplicate_k1",
                                  "images_without_caption", "identical_png")} == {
        "emojis": 10, "skin_tone_variants": 2, "base_designs": 8, "unrenderable": 1, "images": 6, "captions": 9,
        "captions_by_k": {"k0": 5, "k1": 4}, "duplicate_k0": 2, "duplicate_k1": 1, "images_without_caption": 1,
        "identical_png": 4}
    assert stats["identical_png_ids"] == [["1F3D8", "1F600"], ["1F3E0", "1F600"], ["1F44E", "1F600"],
                                          ["E002", "1F600"]]  # all but 1F44D share one drawing here


def test_openmoji_prepare_stops_when_many_svgs_fail(fake_package, tmp_path, monkeypatch):
    pytest.importorskip("cairosvg", reason="needs cairosvg: scripts/install_data.sh openmoji-retrieval")
    monkeypatch.setattr(openmoji_retrieval, "MAX_UNRENDERABLE", 0)
    with pytest.raises(RuntimeError, match="could not draw 1 of 8 emojis"):
        openmoji_retrieval.prepare(tmp_path)


def test_the_datasets_are_registered():
    assert get_dataset("bible-retrieval") is bible_retrieval and bible_retrieval.INSTALL == bible.INSTALL
    assert get_dataset("openmoji-retrieval") is openmoji_retrieval
    assert openmoji_retrieval.INSTALL == openmoji.INSTALL
    for module in (bible_retrieval, openmoji_retrieval):
        assert module.__doc__.strip().splitlines()[0]


def prepared(name):
    folder = dataset_dir(name)
    if not (folder / ".prepared").is_file():
        pytest.skip(f"{name} is not prepared: run scripts/install_data.sh {name}")
    return folder


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_real_bible_retrieval():
    folder = prepared("bible-retrieval")
    kjv, web, pairs = (read_jsonl(folder / f"{name}.jsonl") for name in ("kjv", "web", "pairs"))
    stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
    assert stats["aligned"] == 31_087 and stats["repeats"] == {"kjv": 63, "web": 94, "both": 204}
    assert len(kjv) == len(web) == len(pairs) == stats["kept"] == 31_087 - 361 == 30_726
    assert stats["chapters"] == 1_189 and stats["books"] == 66
    assert kjv[0] == {"id": "Gen.1.1", "text": "In the beginning God created the heaven and the earth.",
                      "chapter": "Gen.1", "book": "Gen"}
    assert web[0] == {**kjv[0], "text": "In the beginning, God created the heavens and the earth."}
    # the same ids, chapters and books in both towers, in the same order; ids and texts unique in each
    assert [{**row, "text": None} for row in kjv] == [{**row, "text": None} for row in web]
    for tower in (kjv, web):
        assert len({row["id"] for row in tower}) == len(tower)
        assert len({row["text"] for row in tower}) == len(tower)
        assert all(row["chapter"] == row["id"].rsplit(".", 1)[0] and row["book"] == row["id"].split(".")[0]
                   for row in tower)
    ids = {row["id"] for row in kjv}
    assert all(p["query_id"] in ids and p["document_id"] == p["query_id"] for p in pairs)
    assert len({p["query_id"] for p in pairs}) == len(pairs)
    assert {"Lev.18.1", "Exod.35.8"} <= set(stats["repeat_refs"]["kjv"] + stats["repeat_refs"]["web"])
    texts = {row["text"] for row in kjv}
    assert "And the LORD spake unto Moses, saying," in texts  # its first occurrence stays


def test_real_openmoji_retrieval():
    from PIL import Image

    folder = prepared("openmoji-retrieval")
    images, captions, pairs = (read_csv(folder / name) for name in ("images.csv", "captions.csv", "pairs.csv"))
    stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
    assert list(images[0]) == ["id", "image", "group"] and list(captions[0]) == ["id", "text", "image_id"]
    assert list(pairs[0]) == ["query_id", "document_id"]
    assert (stats["emojis"], stats["skin_tone_variants"], stats["base_designs"], stats["unrenderable"]) == (
        4_495, 2_030, 2_465, 1)
    assert len(images) == stats["images"] == 2_451 and len(captions) == len(pairs) == stats["captions"] == 4_302
    assert stats["captions_by_k"] == {"k0": 2_447, "k1": 1_855}
    assert (stats["duplicate_k0"], stats["duplicate_k1"], stats["images_without_caption"]) == (17, 57, 13)
    assert stats["identical_png"] == 35
    assert images[0] == {"id": "1F600", "image": "images/1F600.png", "group": "smileys-emotion"}
    assert captions[0] == {"id": "1F600#0", "text": "grinning face", "image_id": "1F600"}

    image_ids = [image["id"] for image in images]
    caption_ids = [caption["id"] for caption in captions]
    assert len(set(image_ids)) == len(images) and len(set(caption_ids)) == len(captions)
    assert len({caption["text"].strip().lower() for caption in captions}) == len(captions)  # no query repeats
    assert all(caption["text"] == caption["text"].strip() and caption["text"] for caption in captions)
    assert [(p["query_id"], p["document_id"]) for p in pairs] == [(c["id"], c["image_id"]) for c in captions]
    assert set(image_ids) == {c["image_id"] for c in captions}  # every image has a caption, every caption an image
    assert all(c["id"].split("#") in ([c["image_id"], "0"], [c["image_id"], "1"]) for c in captions)
    assert max(Counter(c["image_id"] for c in captions).values()) == 2
    assert not any(c["text"].endswith(" skin tone") and ": " in c["text"] for c in captions)  # no variant
    assert sorted(p.name for p in (folder / "images").iterdir()) == sorted(f"{i}.png" for i in image_ids)
    assert all((folder / image["image"]).is_file() for image in images)
    for image in images[::400]:
        with Image.open(folder / image["image"]) as png:
            assert (png.mode, png.size) == ("RGB", (72, 72))


def test_real_openmoji_retrieval_is_reproducible():
    """A prepared image is what rasterising its SVG again gives, byte for byte."""
    pytest.importorskip("cairosvg", reason="needs cairosvg: scripts/install_data.sh openmoji-retrieval")
    from unipt.pipelines.datasets import npm_package_dir

    folder = prepared("openmoji-retrieval")
    svg = openmoji.emoji_svg(npm_package_dir("openmoji"), "1F600")
    assert openmoji.rasterise(svg) == (folder / "images" / "1F600.png").read_bytes()
