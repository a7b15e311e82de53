"""Image sources: folder / table / IDX / webdataset readers, hash splits and caps, bad images, preprocessing."""

from __future__ import annotations

import csv
import gzip
import io
import random
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unipt.extract import hash_unit
from unipt.extract._image_sources import (
    FASHION_MNIST_CLASSES,
    BadImage,
    ImageExample,
    ImagePreprocessor,
    ImageSourceConfig,
    decode_image,
    image_source_format,
    load_image_source,
    read_idx,
)
from unipt.extract._sources import BadInputError, Skipped

CLASSES = ("bird", "cat", "dog")
COLORS = {"bird": (250, 10, 10), "cat": (10, 250, 10), "dog": (10, 10, 250)}
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist puts it


def image_bytes(color, fmt: str = "PNG", size=(12, 9)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def folder_files(n_per_class: int = 4, splits=("train", "test")) -> dict[str, bytes]:
    """relative path -> image bytes: split/class/name, PNG and JPEG alternating, each image distinct."""
    files = {}
    for split in splits:
        for cls in CLASSES:
            for i in range(n_per_class):
                color = tuple(min(255, c + i + 20 * (split == "test")) for c in COLORS[cls])
                ext, fmt = ("png", "PNG") if i % 2 == 0 else ("jpg", "JPEG")
                files[f"{split}/{cls}/img{i}.{ext}".lstrip("/")] = image_bytes(color, fmt)
    return files


def write_files(root: Path, files: dict[str, bytes], seed: int | None = None) -> Path:
    names = list(files)
    if seed is not None:
        random.Random(seed).shuffle(names)  # creation order must not matter
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(files[name])
    return root


def triples(data) -> dict[str, set[tuple[str, str]]]:
    """split -> {(id, label name)}"""
    return {split: {(ex.id, data.label_names[ex.label] if ex.label >= 0 else None) for ex in examples}
            for split, examples in data.splits.items()}


def write_idx(path: Path, array: np.ndarray) -> Path:
    """An IDX file written independently of the reader: magic 0 0 <type> <ndim>, big-endian dims, data."""
    codes = {np.dtype("uint8"): 0x08, np.dtype("int8"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
             np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    raw = bytes([0, 0, codes[big.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + big.tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


class Shrink:
    """A fake image processor: 4x4 thumbnails as (n, 3, 4, 4) float32 in [0, 1], plus the images' widths."""

    def __call__(self, images):
        arrays = [np.asarray(im.resize((4, 4)), dtype=np.float32).transpose(2, 0, 1) / 255 for im in images]
        return {"pixel_values": np.stack(arrays), "widths": [im.size[0] for im in images]}


# --------------------------------------------------------------------------- folder
def test_folder_with_split_folders_is_stable_under_reordering(tmp_path):
    files = folder_files()
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = load_image_source(ImageSourceConfig(path=str(write_files(tmp_path / "a", files, seed=1))))
    b = load_image_source(ImageSourceConfig(path=str(write_files(tmp_path / "b", files, seed=2))))
    assert a.label_names == list(CLASSES)
    assert triples(a) == triples(b)
    assert [ex.id for ex in a.splits["train"]] == [ex.id for ex in b.splits["train"]]  # reading order: sorted paths
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64  # content, not location
    assert triples(a) == {split: {(f"{split}/{c}/img{i}.{'png' if i % 2 == 0 else 'jpg'}", c)
                                  for c in CLASSES for i in range(4)} for split in ("train", "test")}
    assert a.stats["examples"] == {"train": 12, "test": 12} and a.stats["format"] == "folder"
    # the content is part of the fingerprint
    (tmp_path / "b" / "test/cat/img0.png").write_bytes(image_bytes((1, 2, 3)))
    assert load_image_source(ImageSourceConfig(path=str(tmp_path / "b"))).fingerprint != a.fingerprint


def test_flat_folder_is_hash_split_and_capped_by_hash(tmp_path):
    files = {name.split("/", 1)[1]: data for name, data in folder_files(n_per_class=20, splits=("x",)).items()}
    write_files(tmp_path, files)
    (tmp_path / "notes.txt").write_text("not an image")  # ignored, counted
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\0")
    data = load_image_source(ImageSourceConfig(path=str(tmp_path), splits={"train": 0.7, "test": 0.3}))
    expected: dict[str, set] = {}
    for name in files:
        split = "train" if hash_unit(name, "split") < 0.7 else "test"
        expected.setdefault(split, set()).add((name, name.split("/")[0]))
    assert triples(data) == expected
    assert data.stats["ignored_files"] == 1

    capped = load_image_source(ImageSourceConfig(path=str(tmp_path), splits={"train": 0.7, "test": 0.3},
                                                 max_examples={"train": 10}))
    train_ids = [ex.id for ex in data.splits["train"]]
    chosen = set(sorted(train_ids, key=lambda i: hash_unit(i, "subset"))[:10])
    assert [ex.id for ex in capped.splits["train"]] == [i for i in train_ids if i in chosen]
    assert len(capped.splits["test"]) == len(data.splits["test"])

    unlabelled = load_image_source(ImageSourceConfig(path=str(tmp_path), label_column=None))
    assert unlabelled.label_names == [] and {ex.label for v in unlabelled.splits.values() for ex in v} == {-1}


def test_folder_with_mixed_layouts_is_refused(tmp_path):
    write_files(tmp_path, {"cat/a.png": image_bytes((1, 1, 1)), "train/dog/b.png": image_bytes((2, 2, 2))})
    with pytest.raises(ValueError, match="one layout throughout"):
        load_image_source(ImageSourceConfig(path=str(tmp_path)))


# --------------------------------------------------------------------------- table
def test_table_of_paths_matches_the_folder_and_ignores_row_order(tmp_path):
    files = {n.split("/", 1)[1]: d for n, d in folder_files(n_per_class=6, splits=("x",)).items()}
    write_files(tmp_path / "images", files)
    rows = [{"path": f"images/{name}", "label": name.split("/")[0]} for name in files]
    tables = []
    for seed, (suffix, delimiter) in enumerate([(".csv", ","), (".tsv", "\t")]):
        random.Random(seed).shuffle(rows)
        with open(tmp_path / f"t{suffix}", "w", newline="") as f:
            writer = csv.DictWriter(f, ["path", "label"], delimiter=delimiter)
            writer.writeheader(), writer.writerows(rows)
        tables.append(tmp_path / f"t{suffix}")
    loaded = [load_image_source(ImageSourceConfig(path=str(t), image_column="path")) for t in tables]
    assert image_source_format(ImageSourceConfig(path=str(tables[0])), str(tables[0])) == "table"
    assert triples(loaded[0]) == triples(loaded[1])
    ids = {ex.id for v in loaded[0].splits.values() for ex in v}
    assert ids == {f"images/{name}" for name in files}  # the path as written: a stable source key
    assert loaded[0].label_names == list(CLASSES)
    # the same images as an image folder: same labels per image
    folder = load_image_source(ImageSourceConfig(path=str(tmp_path / "images")))
    by_id = {ex.id: folder.label_names[ex.label] for v in folder.splits.values() for ex in v}
    assert {(i[len("images/"):], lab) for v in triples(loaded[0]).values() for i, lab in v} == set(by_id.items())


def test_table_missing_file_follows_the_bad_input_policy(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes((5, 5, 5)))
    (tmp_path / "t.jsonl").write_text('{"image": "a.png", "label": 1}\n{"image": "gone.png", "label": 2}\n'
                                      '{"image": "a.png"}\n')
    with pytest.raises(BadInputError, match=r"row 2 .*gone\.png does not exist"):
        load_image_source(ImageSourceConfig(path=str(tmp_path / "t.jsonl")))
    (tmp_path / "t.jsonl").write_text('{"image": "a.png", "label": 1}\n{"image": "gone.png", "label": 2}\n'
                                      '{"image": "b.png", "label": 1, "x": 0}\n{"image": "", "label": 1}\n'
                                      '{"image": "a.png"}\n')
    (tmp_path / "b.png").write_bytes(image_bytes((6, 6, 6)))
    data = load_image_source(ImageSourceConfig(path=str(tmp_path / "t.jsonl"), bad_input="skip"))
    assert [(s.row, s.id, s.reason) for s in data.skipped] == [
        (2, "gone.png", "missing file"), (4, "row-4", "missing image"), (5, "a.png", "missing label")]
    assert data.label_names == ["1"]
    with pytest.raises(KeyError, match="no column"):
        load_image_source(ImageSourceConfig(path=str(tmp_path / "t.jsonl"), image_column="file"))


def test_csv_table_rows_are_named_by_their_file_line(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes((5, 5, 5)))
    (tmp_path / "t.csv").write_text('image,label,note\na.png,1,"two\nlines"\ngone.png,2,\na.png,1,,extra\n')
    with pytest.raises(BadInputError, match=r"t\.csv line 4 \(row 2\) .*gone\.png does not exist"):
        load_image_source(ImageSourceConfig(path=str(tmp_path / "t.csv")))
    data = load_image_source(ImageSourceConfig(path=str(tmp_path / "t.csv"), bad_input="skip"))
    assert [(s.row, s.reason) for s in data.skipped] == [(2, "missing file"), (3, "wrong field count")]


def test_an_image_split_name_that_cannot_be_a_store_path_component_is_refused(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes((5, 5, 5)))
    (tmp_path / "t.csv").write_text("image,label,split\na.png,1,tr/ain\n")
    with pytest.raises(ValueError, match=r"split name 'tr/ain' \(from the source's own splits.*path separator"):
        load_image_source(ImageSourceConfig(path=str(tmp_path / "t.csv"), split_column="split"))
    write_files(tmp_path / "folder", {"cat/a.png": image_bytes((1, 1, 1)), "dog/b.png": image_bytes((2, 2, 2))})
    with pytest.raises(ValueError, match=r"split name 'tr/ain' \(from source.splits\)"):
        load_image_source(ImageSourceConfig(path=str(tmp_path / "folder"), splits={"tr/ain": 0.8, "test": 0.2}))


def test_an_image_source_with_one_class_warns(tmp_path, caplog):
    write_files(tmp_path, {"cat/a.png": image_bytes((1, 1, 1)), "cat/b.png": image_bytes((2, 2, 2))})
    with caplog.at_level("WARNING", logger="unipt.extract"):
        load_image_source(ImageSourceConfig(path=str(tmp_path)))
    assert "has label 'cat', so a classifier learns nothing" in caplog.text


# --------------------------------------------------------------------------- webdataset
def test_webdataset_shards_with_image_members(tmp_path):
    wds = pytest.importorskip("webdataset")
    samples = [(f"s{i:04d}", image_bytes((i, 2 * i, 3), "PNG" if i % 2 else "JPEG"), i % 3) for i in range(30)]
    (tmp_path / "shards").mkdir()
    for shard, start in enumerate(range(0, 30, 12)):
        with wds.TarWriter(str(tmp_path / "shards" / f"shard-{shard:06d}.tar"), mtime=0) as writer:
            for key, data, cls in samples[start : start + 12]:
                ext = "png" if data.startswith(b"\x89PNG") else "jpg"
                split = "test" if cls == 0 else "train"
                writer.write({"__key__": key, ext: data, "cls": cls, "json": {"split": split}})
    config = ImageSourceConfig(path=str(tmp_path / "shards"), label_column="cls")
    data = load_image_source(config)
    assert data.stats["format"] == "webdataset" and data.label_names == ["0", "1", "2"]
    expected: dict[str, set] = {}
    for key, _, cls in samples:
        u = hash_unit(key, "split")
        expected.setdefault("train" if u < 0.8 else "validation" if u < 0.9 else "test", set()).add((key, str(cls)))
    assert triples(data) == expected
    first = next(ex for v in data.splits.values() for ex in v if ex.id == "s0001")
    assert decode_image(first.image).getpixel((0, 0)) == (1, 2, 3)
    by_column = load_image_source(ImageSourceConfig(path=str(tmp_path / "shards"), label_column="cls",
                                                    split_column="split"))
    assert {k: len(v) for k, v in by_column.splits.items()} == {"train": 20, "test": 10}
    # a brace pattern names the same shards
    pattern = str(tmp_path / "shards" / "shard-{000000..000002}.tar")
    assert load_image_source(ImageSourceConfig(path=pattern, label_column="cls")).fingerprint == data.fingerprint


# --------------------------------------------------------------------------- IDX
def test_idx_pairs_plain_and_gzipped(tmp_path):
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8), rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    test[7] = train[3]  # a duplicate image: ids stay unique
    train_labels, test_labels = rng.integers(0, 3, 50, dtype=np.uint8), rng.integers(0, 3, 20, dtype=np.uint8)
    for folder, suffix in (("plain", ""), ("gz", ".gz")):
        (tmp_path / folder).mkdir()
        write_idx(tmp_path / folder / f"train-images-idx3-ubyte{suffix}", train)
        write_idx(tmp_path / folder / f"train-labels-idx1-ubyte{suffix}", train_labels)
        write_idx(tmp_path / folder / f"t10k-images-idx3-ubyte{suffix}", test)
        write_idx(tmp_path / folder / f"t10k-labels-idx1-ubyte{suffix}", test_labels)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "gz" / "train-images-idx3-ubyte.gz")), train)
    plain, gz = (load_image_source(ImageSourceConfig(path=str(tmp_path / f))) for f in ("plain", "gz"))
    assert plain.stats["format"] == "idx" and plain.label_names == ["0", "1", "2"]
    assert triples(plain) == triples(gz) and plain.fingerprint == gz.fingerprint  # content, not compression
    assert [ex.id for ex in plain.splits["test"]] == [f"t10k/{i}" for i in range(20)]
    assert [ex.label for ex in plain.splits["train"]] == train_labels.tolist()
    np.testing.assert_array_equal(plain.splits["test"][7].image, train[3])
    assert plain.stats["duplicate_images"] == 1
    assert np.asarray(decode_image(plain.splits["train"][0].image)).shape == (28, 28, 3)
    deduped = load_image_source(ImageSourceConfig(path=str(tmp_path / "plain"), dedupe=True))
    # t10k is read first (file name order): the training copy goes, the published test set stays whole
    assert len(deduped.splits["test"]) == 20 and deduped.stats["duplicates_dropped"] == 1
    assert "train/3" not in {ex.id for ex in deduped.splits["train"]} and len(deduped.splits["train"]) == 49
    # one images file alone: no split in its name is needed; ids name the file prefix
    single = load_image_source(ImageSourceConfig(path=str(tmp_path / "gz" / "train-images-idx3-ubyte.gz"),
                                                 max_examples={"train": 10}))
    assert set(single.splits) == {"train"} and len(single.splits["train"]) == 10


def test_idx_header_errors_name_the_file(tmp_path):
    bad = tmp_path / "x-images-idx3-ubyte"
    bad.write_bytes(b"\x01\x02\x08\x03" + bytes(20))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(str(bad))
    write_idx(bad, np.zeros((3, 4, 4), np.uint8))
    bad.write_bytes(bad.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"x-images-idx3-ubyte: the header declares \(3, 4, 4\) uint8 values"):
        read_idx(str(bad))
    write_idx(tmp_path / "v.idx", np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(read_idx(str(tmp_path / "v.idx")), np.arange(6, dtype=np.float32).reshape(2, 3))
    write_idx(bad, np.zeros((3, 4, 4), np.uint8))  # no labels file beside it
    with pytest.raises(FileNotFoundError, match="label_column = None"):
        load_image_source(ImageSourceConfig(path=str(bad)))
    unlabelled = load_image_source(ImageSourceConfig(path=str(bad), label_column=None))
    assert sorted(ex.id for v in unlabelled.splits.values() for ex in v) == ["x/0", "x/1", "x/2"]


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_debian_fashion_mnist():
    data = load_image_source(ImageSourceConfig(path=str(FASHION_MNIST_DIR)))
    assert data.label_names == list(FASHION_MNIST_CLASSES) and data.stats["dataset"] == "fashion-mnist"
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 60000, "test": 10000}
    assert Counter(ex.label for ex in data.splits["train"]) == {i: 6000 for i in range(10)}
    assert Counter(ex.label for ex in data.splits["test"]) == {i: 1000 for i in range(10)}
    assert len({ex.id for v in data.splits.values() for ex in v}) == 70000
    assert data.splits["train"][0].image.shape == (28, 28)
    assert data.label_names[data.splits["train"][0].label] == "Ankle boot"  # the first training image


# --------------------------------------------------------------------------- bad images
def test_decode_image_errors_name_the_file(tmp_path):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, "JPEG")
    (tmp_path / "t.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # header whole, data cut
    (tmp_path / "h.jpg").write_bytes(buf.getvalue()[:200])  # cut inside the header
    (tmp_path / "junk.png").write_bytes(b"hello")
    for name, pattern in (("t.jpg", "is truncated or corrupt"), ("h.jpg", "is truncated or corrupt"),
                          ("junk.png", "is not an image"),
                          ("gone.png", "cannot be read")):
        with pytest.raises(BadImage, match=f"{name}: {pattern}"):
            decode_image(str(tmp_path / name))
    with pytest.raises(BadImage, match="sample 'k': is empty"):
        decode_image(b"", "sample 'k'")
    grey = decode_image(np.full((5, 6), 7, np.uint8))
    assert grey.mode == "RGB" and grey.size == (6, 5) and grey.getpixel((0, 0)) == (7, 7, 7)
    rebuild, args = BadImage("f.png", "is truncated").__reduce__()  # what pickling across processes (dask) uses
    err = rebuild(*args)
    assert isinstance(err, BadInputError) and str(err) == "f.png: is truncated"


def test_broken_images_follow_the_bad_input_policy(tmp_path):
    files = {f"{c}/{i}.png": image_bytes(tuple(min(255, v + i) for v in COLORS[c])) for c in CLASSES for i in range(3)}
    files["cat/1.png"] = image_bytes((9, 9, 9), "PNG", size=(64, 64))[:-40]  # truncated: header fine, data cut
    files["dog/2.png"] = b"GIF? no, plain text"  # not an image at all: found when loading
    write_files(tmp_path, files)
    with pytest.raises(BadInputError, match=r"row 9 \(.*dog/2\.png\): its data is not an image"):
        load_image_source(ImageSourceConfig(path=str(tmp_path)))
    data = load_image_source(ImageSourceConfig(path=str(tmp_path), bad_input="skip", splits={"train": 1.0}))
    assert data.skipped == [Skipped(9, "dog/2.png", "broken image")]
    examples = data.splits["train"]
    with ImagePreprocessor(Shrink(), workers=2) as pre:
        with pytest.raises(BadImage, match=r"cat/1\.png: is truncated.*skip"):
            pre(examples)
    with ImagePreprocessor(Shrink(), workers=2, bad_input="skip") as pre:
        batch = pre(examples)
    assert batch.skipped == [Skipped(5, "cat/1.png", "broken image")]
    assert [ex.id for ex in batch.examples] == [ex.id for ex in examples if ex.id != "cat/1.png"]
    assert batch.inputs["pixel_values"].shape == (7, 3, 4, 4)


# --------------------------------------------------------------------------- preprocessing
def test_preprocessor_keeps_order_across_threads_and_batches(tmp_path):
    import torch

    rng = random.Random(0)
    examples = [ImageExample(f"e{i}", image_bytes((rng.randrange(256), 0, i), "PNG", size=(8 + i % 5, 6)), i % 3,
                             i + 1, f"e{i}") for i in range(23)]
    batches = [examples[i : i + 5] for i in range(0, 23, 5)]
    with ImagePreprocessor(Shrink(), workers=3) as pre:
        out = list(pre.map(batches, prefetch=2))
    inline = [ImagePreprocessor(Shrink(), workers=0)(b) for b in batches]
    assert [[ex.id for ex in b.examples] for b in out] == [[ex.id for ex in b] for b in batches]
    for threaded, single, batch in zip(out, inline, batches):
        assert isinstance(threaded.inputs["pixel_values"], torch.Tensor)
        assert threaded.inputs["pixel_values"].shape == (len(batch), 3, 4, 4)
        torch.testing.assert_close(threaded.inputs["pixel_values"], single.inputs["pixel_values"])
        assert threaded.inputs["widths"] == [8 + int(ex.id[1:]) % 5 for ex in batch]
        blue = threaded.inputs["pixel_values"][:, 2, 0, 0] * 255
        assert blue.round().tolist() == [float(int(ex.id[1:])) for ex in batch]


def test_preprocessor_with_a_transformers_image_processor(tmp_path):
    from transformers import ViTImageProcessor

    examples = [ImageExample(f"e{i}", image_bytes((40 * i, 0, 0), "JPEG", size=(30 + i, 20)), 0, i + 1, f"e{i}")
                for i in range(3)]
    examples.append(ImageExample("idx", np.zeros((28, 28), np.uint8), 0, 4, "idx"))
    processor = ViTImageProcessor()
    with ImagePreprocessor(processor, workers=2) as pre:
        batch = pre(examples)
    assert tuple(batch.inputs["pixel_values"].shape) == (4, 3, 224, 224)
    assert len(pre.fingerprint) == 64
    assert ImagePreprocessor(ViTImageProcessor(size={"height": 32, "width": 32})).fingerprint != pre.fingerprint
    # from a local model folder, through AutoImageProcessor
    processor.save_pretrained(tmp_path)
    with ImagePreprocessor.from_pretrained(str(tmp_path), workers=1) as loaded:
        assert loaded.fingerprint == pre.fingerprint
        assert tuple(loaded(examples[:2]).inputs["pixel_values"].shape) == (2, 3, 224, 224)
