"""Image sources: read images and labels, split them deterministically by hash, decode and preprocess them.

The same conventions as the text sources (:mod:`._sources`): a reader yields raw rows, and
:func:`load_image_source` turns them into :class:`ImageExample` lists per split, keyed by a stable example id
(a source key: the image's relative path, a table's path or id column, a webdataset ``__key__``, an IDX file's
split + index). Splits are drawn by ``hash_unit(id, "split")``, caps by the same hash subset, labels are
ordered as for texts, and a row that cannot become an example follows ``bad_input``.

Decoding happens late, in :class:`ImagePreprocessor` (thread pool, overlapping the forward pass): loading
only reads each file once, to fingerprint it and to check that it starts like an image. An image whose data
is truncated or corrupt further in is found when it is decoded and follows the same policy there.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import io
import logging
import math
import os
import posixpath
import re
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import _targets as targets
from ._resolve import resolve_path
from ._targets import check_task_options
from ._sources import (
    _BAD,
    _READER_KEYS,
    BadInputError,
    Skipped,
    SourceData,
    _BadSample,
    _count_reasons,
    _csv_rows,
    _json_fields,
    _jsonl_rows,
    _sample_value,
    _tar_samples,
    assign_splits,
    report_kept,
    row_where,
    warn_if_one_class,
    webdataset_shards,
)
from .config import BAD_INPUT_POLICIES, check_split_rules

log = logging.getLogger(__name__)

IMAGE_SOURCE_FORMATS = ("auto", "folder", "table", "idx", "webdataset")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # files an image folder's reader picks up
_TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".ndjson": None}  # None = JSON lines
_WDS_IMAGE_MEMBERS = tuple(s[1:] for s in IMAGE_SUFFIXES)  # webdataset members tried for image_column "image"
BROKEN_IMAGE = "broken image"  # the Skipped reason of an image that cannot be decoded

# IDX (the MNIST format): <prefix>-images-idx3-ubyte[.gz] with <prefix>-labels-idx1-ubyte[.gz] beside it.
_IDX_IMAGES = re.compile(r"^(?P<prefix>.+?)-images[.-]idx(?P<ndim>[34])-ubyte(?P<gz>\.gz)?$")
_IDX_LABELS = "{prefix}-labels[.-]idx1-ubyte(\\.gz)?"
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}  # type code -> dtype
_IDX_SPLITS = {"train": "train", "t10k": "test", "test": "test", "val": "validation", "valid": "validation",
               "validation": "validation"}  # last token of a file prefix -> split name
# Fashion-MNIST is recognised by the sha256 of its (decompressed) label files, so the name of the folder
# does not matter and MNIST (same file names, other labels) is not mistaken for it.
_FASHION_MNIST_LABELS_SHA256 = {
    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",  # train-labels-idx1-ubyte
    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",  # t10k-labels-idx1-ubyte
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")

ImageData = Union[bytes, str, np.ndarray]  # encoded bytes, a file path, or an (H, W) / (H, W, C) uint8 array


# --------------------------------------------------------------------------- config and records
@dataclass
class ImageSourceConfig:
    path: str = ""
    """An image folder (class_name/*.jpg, or train/class_name/*.jpg with split folders), a CSV/TSV/JSONL table
    of image paths, IDX files (a folder of <prefix>-images-idx3-ubyte[.gz] + <prefix>-labels-idx1-ubyte[.gz],
    or one images file), webdataset tar shards (one .tar, a brace pattern, or a folder of *.tar), or
    pkg://<package>/<path>."""
    format: str = "auto"
    """folder, table, idx or webdataset; auto = a folder holding IDX files is idx, one holding *.tar is
    webdataset, any other folder is an image folder; a file by its name (.csv/.tsv/.jsonl = table, .tar =
    webdataset, *-images-idx3-ubyte[.gz] = idx)."""
    image_column: str = "image"
    """table: the column holding image paths (relative to the table's folder). webdataset: the member
    extension (jpg, png, ...); "image" = the sample's one member with an image extension."""
    label_column: str | None = "label"
    """table: the label column; webdataset: a member (cls) or a json field. folder and idx take their labels
    from class folders / label files: set None there for an unlabelled source."""
    id_column: str | None = None
    """table/webdataset: a column or json field holding a stable example id; None = the image path as written
    in the table / the sample's __key__. folder ids are relative paths, idx ids <file prefix>/<index>."""
    splits: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "validation": 0.1, "test": 0.1})
    """Split fractions, assigned by a hash of the example id, for sources without their own splits (split
    folders and IDX train/t10k files win)."""
    split_column: str | None = None
    """table/webdataset: use this column's values as split names instead of hashing."""
    max_examples: dict[str, int] = field(default_factory=dict)
    """Cap per split, e.g. {train = 4000}; the subset is drawn by hash, never the first N images."""
    bad_input: str = "error"
    """An image that cannot become an example (missing or unreadable file, not an image, truncated data,
    missing label): "error" stops and names it; "skip" leaves it out and records its id and reason."""
    validation_from_train: float = 0.0
    """For a source with its own train/test splits and no validation split (IDX files, split folders): hold
    out this fraction of train, drawn by hash, as the validation split (e.g. 0.1)."""
    dedupe: bool = False
    """Drop images whose content repeats an earlier one (first kept). Off by default: published image splits
    keep their duplicates, and their counts should match; stats["duplicate_images"] counts them either way."""
    task: str = "classification"
    """"classification" (one class per image) or "multilabel" (table/webdataset: label_column holds a list of
    labels, or a string split on label_delimiter)."""
    label_delimiter: str | None = None
    """multilabel: split a string label on this (e.g. "|"); list values are taken as they are."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("source.path is required: an image folder, a table, IDX files, webdataset shards "
                             "or pkg://package/path")
        if self.bad_input not in BAD_INPUT_POLICIES:
            raise ValueError(f"source.bad_input must be one of {BAD_INPUT_POLICIES}, got {self.bad_input!r}")
        if self.format not in IMAGE_SOURCE_FORMATS:
            raise ValueError(f"source.format must be one of {IMAGE_SOURCE_FORMATS}, got {self.format!r}")
        check_split_rules(self.splits, self.split_column, self.max_examples)
        if self.task not in ("classification", "multilabel"):
            raise ValueError(f"an image source's task is \"classification\" or \"multilabel\", got {self.task!r}")
        check_task_options(self.task, self.label_column, self.label_delimiter, None)
        if not 0.0 <= self.validation_from_train < 1.0:
            raise ValueError(f"source.validation_from_train must be in [0, 1), got {self.validation_from_train}")


@dataclass(frozen=True, eq=False)
class ImageExample:
    id: str
    image: ImageData = field(repr=False)  # decoded late, by decode_image / ImagePreprocessor
    label: Any  # index into SourceData.label_names (-1 = unlabelled); multilabel: a tuple of indices
    row: int  # 1-based position in the source's reading order (the Skipped record of a broken image)
    origin: str  # where the image is, for messages: a file path, "sample 'k' in shard.tar", "file image 7"


class BadImage(BadInputError):
    """Image data that cannot be decoded: names the file or sample and the reason."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason

    def __reduce__(self):  # picklable across processes (dask) despite the two-argument constructor
        return type(self), (self.where, self.reason)


# --------------------------------------------------------------------------- loading
def image_source_format(config: ImageSourceConfig, path: str) -> str:
    if config.format != "auto":
        return config.format
    p = Path(path)
    if p.is_dir():
        names = [c.name for c in p.iterdir()]
        if any(_IDX_IMAGES.match(n) for n in names):
            return "idx"
        return "webdataset" if any(n.endswith(".tar") for n in names) else "folder"
    if _IDX_IMAGES.match(p.name):
        return "idx"
    if p.suffix.lower() in _TABLE_SUFFIXES:
        return "table"
    if p.suffix.lower() == ".tar":
        return "webdataset"
    raise ValueError(f"cannot tell the image source format of {path!r}; set source.format to one of "
                     f"{IMAGE_SOURCE_FORMATS[1:]} (tables need one of the suffixes {sorted(_TABLE_SUFFIXES)})")


@dataclass
class _Opened:
    rows: Iterator[dict[str, Any]]  # {"__key__", "image", "label", "__origin__", "__split__"?} or a bad row
    format: str
    class_names: tuple[str, ...] | None = None  # label names by index, for a recognised dataset (IDX labels)
    stats: dict[str, Any] = field(default_factory=dict)


def read_image_rows(config: ImageSourceConfig) -> tuple[Iterator[dict[str, Any]], str]:
    """Raw rows of the source, as ``{"__key__": id, "image": bytes | path | array, "label": ..., "__origin__":
    where, "__split__": optional}`` (a bad row carries ``__bad__`` and ``__detail__`` instead), and the format."""
    opened = _open_image_source(config)
    return opened.rows, opened.format


def _open_image_source(config: ImageSourceConfig) -> _Opened:
    path = resolve_path(config.path)
    fmt = image_source_format(config, path)
    if fmt in ("folder", "idx") and (config.id_column or config.split_column):
        raise ValueError(f"source.id_column / source.split_column do not apply to {fmt} sources ({config.path}): "
                         "their ids and splits come from file names; leave them unset")
    if fmt in ("folder", "idx") and config.task != "classification":
        raise ValueError(f"a {fmt} source has one class per image (its folder or label file); a {config.task} "
                         "source is a table or webdataset whose label column lists each image's labels")
    if fmt == "folder":
        return _folder_rows(path, labelled=config.label_column is not None)
    if fmt == "idx":
        return _idx_rows(path, labelled=config.label_column is not None)
    if fmt == "webdataset":
        return _Opened(_webdataset_image_rows(config, webdataset_shards(path)), fmt)
    if fmt == "table":
        return _Opened(_table_rows(config, path), fmt)
    raise ValueError(f"unknown image source format {fmt!r}; valid: {IMAGE_SOURCE_FORMATS}")


def load_image_source(config: ImageSourceConfig) -> SourceData:
    """Read, validate and split an image source; apply per-split caps (drawn by hash).

    Returns a :class:`SourceData` whose splits hold :class:`ImageExample`. Each image is read once here: its
    content goes into the fingerprint (sha256 over id, split, label and image content, in the source's
    stable reading order), and its header must be an image's. A row that cannot become an example raises
    :class:`BadInputError` naming it, or with ``bad_input = "skip"`` is listed in ``SourceData.skipped``.
    """
    opened = _open_image_source(config)
    fingerprint = hashlib.sha256()
    records: list[tuple[str, ImageData, Any, str | None, int, str]] = []  # (id, image, label, split, row, origin)
    skipped: list[Skipped] = []
    first_row: dict[str, int] = {}  # example id -> row, to refuse an id used twice
    seen_content: set[str] = set()
    duplicates = dropped = 0
    for number, row in enumerate(opened.rows, start=1):
        key = str(row.get("__key__", f"row-{number}"))
        problem = _row_problem(config, row)
        digest = None
        if problem is None:
            digest, problem = _check_image(row["image"], row["__origin__"])
        if problem is not None:
            reason, detail = problem
            fingerprint.update(f"bad\x00{key}\x00{reason}\x00".encode("utf-8", "surrogateescape"))
            if config.bad_input == "error":
                where = f"{row_where(config.path, number, row)} ({row.get('__origin__', key)})"
                raise BadInputError(f"{where}: {detail}", "Fix the source, or set source.bad_input = \"skip\" to "
                                    "leave such images out (each is recorded in the store with its reason)")
            skipped.append(Skipped(number, key, reason))
            continue
        label = (targets.raw_target(config.task, row.get("label"), delimiter=config.label_delimiter)
                 if config.label_column else None)
        split = row.get("__split__")
        fingerprint.update(f"{key}\x00{split}\x00{label}\x00{digest}\x00".encode("utf-8", "surrogateescape"))
        if digest in seen_content:
            duplicates += 1
            if config.dedupe:
                dropped += 1
                continue
        seen_content.add(digest)
        if key in first_row:
            raise ValueError(f"{config.path}: example id {key!r} occurs twice (rows {first_row[key]} and {number}); "
                             "ids must be unique. Set source.id_column to a column holding a unique id.")
        first_row[key] = number
        records.append((key, row["image"], label, split, number, row["__origin__"]))
    report_kept(config.path, len(records), skipped, "images")
    if duplicates:
        log.info("%d images repeat an earlier image's content (%s)", duplicates,
                 "dropped" if config.dedupe else "kept: source.dedupe is off")

    labelled = config.label_column is not None
    if labelled and opened.class_names is not None:
        label_names = list(opened.class_names)
        label_index = {str(i): i for i in range(len(label_names))}
    else:
        label_names = targets.target_names(config.task, [r[2] for r in records], ()) if labelled else []
        label_index = {name: i for i, name in enumerate(label_names)}
    splits = assign_splits(((split, ImageExample(example_id, image, targets.encode_target(config.task, label, label_index)
                                                 if labelled else -1, number, origin))
                            for example_id, image, label, split, number, origin in records),
                           config.splits, config.max_examples, config.validation_from_train)
    if config.task == targets.CLASSIFICATION:
        warn_if_one_class(config.path, splits, label_names, config.label_column)
    stats = {"rows": len(records) + dropped + len(skipped), "duplicate_images": duplicates,
             "duplicates_dropped": dropped, "skipped": _count_reasons(skipped),
             "examples": {name: len(ex) for name, ex in splits.items()}, "format": opened.format, **opened.stats}
    return SourceData(splits=splits, label_names=label_names, fingerprint=fingerprint.hexdigest(), stats=stats,
                      skipped=skipped)


def _row_problem(config: ImageSourceConfig, row: dict[str, Any]) -> tuple[str, str] | None:
    """Why ``row`` cannot become an example, as (reason category, detail), or None when it can (so far)."""
    if _BAD in row:
        return row[_BAD], row["__detail__"]
    if config.label_column:
        return targets.target_problem(config.task, row.get("label"), config.label_column,
                                      delimiter=config.label_delimiter)
    return None


def _check_image(image: ImageData, origin: str) -> tuple[str | None, tuple[str, str] | None]:
    """(sha256 of the image's content, None), or (None, (reason, detail)) when it is not an image at all.

    Reads a file once; only the header is parsed (a full decode is the preprocessor's job).
    """
    if isinstance(image, np.ndarray):
        return hashlib.sha256(repr(image.shape).encode() + image.tobytes()).hexdigest(), None
    if isinstance(image, str):
        try:
            data = Path(image).read_bytes()
        except FileNotFoundError:
            return None, ("missing file", f"image file {image} does not exist")
        except OSError as exc:
            return None, ("unreadable file", f"image file {image} cannot be read ({exc.strerror or exc})")
    else:
        data = image
    try:
        _open_header(data)
    except BadImage as exc:
        return None, (BROKEN_IMAGE, f"its data {exc.reason}")
    return hashlib.sha256(data).hexdigest(), None


# --------------------------------------------------------------------------- readers
def _folder_rows(root: str, *, labelled: bool) -> _Opened:
    """class_name/*.jpg (depth 2) or split/class_name/*.jpg (depth 3), in relative-path order."""
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    files = sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
    files = [f for f in files if not any(part.startswith(".") for part in f.split("/"))]  # .DS_Store, .git, ...
    images = [f for f in files if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
    if not images:
        raise FileNotFoundError(f"image folder {root!r} holds no images ({', '.join(IMAGE_SUFFIXES)}) in class "
                                "folders")
    by_depth: dict[int, str] = {}
    for f in images:
        by_depth.setdefault(f.count("/") + 1, f)
    if len(by_depth) > 1 or not set(by_depth) <= {2, 3}:
        examples = ", ".join(f"{by_depth[d]!r}" for d in sorted(by_depth))
        raise ValueError(f"image folder {root!r} must hold class_name/<image> or split/class_name/<image> files, "
                         f"one layout throughout; found {examples}")
    ignored = len(files) - len(images)
    if ignored:
        log.info("image folder %s: %d files without an image suffix ignored", root, ignored)

    def rows() -> Iterator[dict[str, Any]]:
        for rel in images:
            parts = rel.split("/")
            path = str(base / rel)
            row = {"__key__": rel, "image": path, "label": parts[-2] if labelled else None, "__origin__": path}
            if len(parts) == 3:
                row["__split__"] = parts[0]
            yield row

    return _Opened(rows(), "folder", stats={"ignored_files": ignored})


def _table_rows(config: ImageSourceConfig, path: str) -> Iterator[dict[str, Any]]:
    """One row per table line: the image path (relative to the table's folder), label, id, split."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"image table {path!r} does not exist")
    suffix = Path(path).suffix.lower()
    if suffix not in _TABLE_SUFFIXES:
        raise ValueError(f"image table {path!r}: suffix must be one of {sorted(_TABLE_SUFFIXES)}")
    delimiter = _TABLE_SUFFIXES[suffix]
    raw = _jsonl_rows(path, "utf-8") if delimiter is None else _csv_rows(path, "utf-8", delimiter)
    folder = Path(path).parent
    wanted = [c for c in (config.image_column, config.label_column, config.id_column, config.split_column) if c]
    checked = False
    for number, source_row in enumerate(raw, start=1):
        if _BAD in source_row:
            yield {**source_row, "__key__": f"row-{number}"}
            continue
        if not checked:  # a misnamed column is a config error, not a bad row
            missing = [c for c in wanted if c not in source_row]
            if missing:
                raise KeyError(f"image table {path} has no column(s) {missing}; its columns are "
                               f"{sorted(k for k in source_row if k not in _READER_KEYS)}")
            checked = True
        value = source_row.get(config.image_column)
        written = value.replace("\\", "/").strip() if isinstance(value, str) else ""
        key = str(source_row[config.id_column]) if config.id_column else posixpath.normpath(written or f"row-{number}")
        label = source_row.get(config.label_column) if config.label_column else None
        row: dict[str, Any] = {"__key__": key, "label": label}
        if "__line__" in source_row:  # a CSV/TSV table: messages name the file line
            row["__line__"] = source_row["__line__"]
        if config.split_column:
            row["__split__"] = str(source_row[config.split_column])
        if not written:
            row.update({_BAD: "missing image", "__detail__": f"empty {config.image_column!r} value {value!r}"})
        else:
            image = str(folder / written)  # an absolute path stays itself
            row.update({"image": image, "__origin__": image})
        yield row


def _webdataset_image_rows(config: ImageSourceConfig, shards: list[str]) -> Iterator[dict[str, Any]]:
    """One row per sample: its image member's bytes, its label (member or json field), its ``__key__``."""
    for shard in shards:
        for sample in _tar_samples(shard):
            key = sample["__key__"]
            row: dict[str, Any] = {"__key__": key, "__origin__": f"webdataset sample {key!r} in {shard}", "label": None}
            try:
                fields = _json_fields(sample, "utf-8", shard)
                if config.id_column:
                    row["__key__"] = str(_sample_value(sample, fields, config.id_column, "utf-8", shard))
                if config.split_column:
                    row["__split__"] = str(_sample_value(sample, fields, config.split_column, "utf-8", shard))
                if config.label_column:
                    row["label"] = _sample_value(sample, fields, config.label_column, "utf-8", shard,
                                                 config.label_column)
                row["image"] = _sample_image(sample, config.image_column, shard)
            except _BadSample as exc:
                row.update({_BAD: exc.reason, "__detail__": str(exc)})
            yield row


def _sample_image(sample: dict[str, Any], column: str, shard: str) -> bytes:
    member = column.lower()  # webdataset lower-cases extensions
    if member in sample and not member.startswith("__"):
        return sample[member]
    if column == "image":
        for ext in _WDS_IMAGE_MEMBERS:
            if ext in sample:
                return sample[ext]
    members = sorted(k for k in sample if not k.startswith("__"))
    wanted = f"an image member ({', '.join(_WDS_IMAGE_MEMBERS)})" if column == "image" else f"a {member!r} member"
    raise _BadSample("missing image", f"webdataset sample {sample['__key__']!r} in {shard} has no {wanted}; it has "
                     f"members {members}")


# --------------------------------------------------------------------------- IDX files
def read_idx(path: str) -> np.ndarray:
    """An IDX file (plain or gzipped) as an array of its declared dtype and dims (native byte order)."""
    array, _ = _read_idx(path)
    return array


def _read_idx(path: str) -> tuple[np.ndarray, str]:
    """The array and the sha256 of the file's decompressed bytes."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"IDX file {path} is a damaged gzip file ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file: its magic number {raw[:4].hex() or '(empty)'} does not start "
                         "with two zero bytes")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"IDX file {path}: unknown type code 0x{code:02x}; valid: "
                         f"{', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)}")
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"IDX file {path}: header declares {ndim} dimensions but the file ends after {len(raw)} bytes")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"IDX file {path}: the header declares {dims} {dtype.name} values ({expected} bytes) but "
                         f"{len(raw) - header} bytes follow it (truncated or not an IDX file)")
    array = np.frombuffer(raw, dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False), hashlib.sha256(raw).hexdigest()


def idx_pairs(path: str) -> list[tuple[str, str | None, str]]:
    """(images file, labels file or None, prefix) for a folder of IDX files or one images file, in name order."""
    p = Path(path)
    if p.is_dir():
        images = sorted(c for c in p.iterdir() if _IDX_IMAGES.match(c.name))
        folder = p
    else:
        if not p.is_file():
            raise FileNotFoundError(f"IDX source {path!r} does not exist")
        if not _IDX_IMAGES.match(p.name):
            raise ValueError(f"IDX source {path!r}: name the images file (<prefix>-images-idx3-ubyte[.gz]) or the "
                             "folder that holds the files")
        images, folder = [p], p.parent
    if not images:
        raise FileNotFoundError(f"IDX source folder {path!r} holds no <prefix>-images-idx3-ubyte[.gz] files")
    prefixes: dict[str, Path] = {}
    pairs = []
    for image_file in images:
        prefix = _IDX_IMAGES.match(image_file.name)["prefix"]
        if prefix in prefixes:
            raise ValueError(f"IDX source {path!r} holds both {prefixes[prefix].name} and {image_file.name}; "
                             "keep one of them")
        prefixes[prefix] = image_file
        pattern = re.compile(f"^{_IDX_LABELS.format(prefix=re.escape(prefix))}$")
        labels = sorted(c for c in folder.iterdir() if pattern.match(c.name))
        if len(labels) > 1:
            raise ValueError(f"IDX source {path!r} holds several label files for {prefix!r}: "
                             f"{[c.name for c in labels]}; keep one of them")
        pairs.append((str(image_file), str(labels[0]) if labels else None, prefix))
    return pairs


def _idx_rows(path: str, *, labelled: bool) -> _Opened:
    """Rows of every images/labels pair; train / t10k (test) prefixes name the split, others are hashed."""
    loaded, label_hashes = [], set()
    for image_file, label_file, prefix in idx_pairs(path):
        images, _ = _read_idx(image_file)
        channels = images.shape[3] if images.ndim == 4 else 1
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or channels not in (1, 3):
            raise ValueError(f"IDX file {image_file} holds {images.dtype.name} values of shape {images.shape}; images "
                             "must be uint8, (n, height, width) or (n, height, width, 1 or 3)")
        labels = None
        if labelled:
            if label_file is None:
                raise FileNotFoundError(f"IDX images {image_file} have no {prefix}-labels-idx1-ubyte[.gz] beside "
                                        "them; add it, or set source.label_column = None for an unlabelled source")
            labels, digest = _read_idx(label_file)
            label_hashes.add(digest)
            if labels.ndim != 1 or labels.shape[0] != images.shape[0] or labels.dtype.kind not in "iu":
                raise ValueError(f"IDX labels {label_file} ({labels.dtype.name}, shape {labels.shape}) do not match "
                                 f"the {images.shape[0]} images of {image_file}: need one integer label per image")
        split = _IDX_SPLITS.get(re.split(r"[-_.]", prefix)[-1].lower())
        loaded.append((image_file, prefix, split, images, labels))
    known = label_hashes and label_hashes <= _FASHION_MNIST_LABELS_SHA256

    def rows() -> Iterator[dict[str, Any]]:
        for image_file, prefix, split, images, labels in loaded:
            for i in range(images.shape[0]):
                row = {"__key__": f"{prefix}/{i}", "image": images[i],
                       "label": None if labels is None else int(labels[i]), "__origin__": f"{image_file} image {i}"}
                if split is not None:
                    row["__split__"] = split
                yield row

    return _Opened(rows(), "idx", FASHION_MNIST_CLASSES if known else None,
                   stats={"dataset": "fashion-mnist"} if known else {})


# --------------------------------------------------------------------------- decoding
def _open_header(data: bytes) -> Image.Image:
    """Parse only the header (cheap); BadImage when the data is not an image PIL knows."""
    if not data:
        raise BadImage("image", "is empty (0 bytes)")
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("image", "is not an image (no known image format)") from None
    except Image.DecompressionBombError as exc:
        raise BadImage("image", f"is too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage("image", f"is truncated or corrupt ({exc})") from None


def decode_image(data: ImageData, name: str | None = None) -> Image.Image:
    """Decode encoded bytes, an image file, or a uint8 array to an RGB PIL image.

    Raises :class:`BadImage` naming ``name`` (default: the file path) for a missing file, empty, non-image,
    truncated or corrupt data.
    """
    where = name or (str(data) if isinstance(data, (str, os.PathLike)) else "image data")
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim not in (2, 3):
            raise BadImage(where, f"is a {data.dtype.name} array of shape {data.shape}, not a uint8 (H, W[, C]) image")
        image = Image.fromarray(data[..., 0] if data.ndim == 3 and data.shape[2] == 1 else data)
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(data, (str, os.PathLike)):
        try:
            data = Path(data).read_bytes()
        except OSError as exc:
            raise BadImage(where, f"cannot be read ({exc.strerror or exc})") from None
    try:
        image = _open_header(data)
        image.load()  # the full decode: truncated or corrupt data fails here
    except BadImage as exc:
        raise BadImage(where, exc.reason) from None
    except Image.DecompressionBombError as exc:
        raise BadImage(where, f"is too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImage(where, f"is truncated or corrupt ({exc})") from None
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # palette transparency must go through RGBA (PIL warns otherwise)
    elif image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))  # 16-bit grey -> 8 bits
    return image if image.mode == "RGB" else image.convert("RGB")


# --------------------------------------------------------------------------- preprocessing
@dataclass
class PreparedBatch:
    examples: list[ImageExample]  # the examples that decoded, in input order
    inputs: dict[str, Any]  # the processor's output for them, e.g. pixel_values (B, C, H, W) torch tensor
    skipped: list[Skipped]  # images that did not decode (bad_input = "skip"), reason "broken image"
    seconds: float  # thread time spent decoding and processing (all chunks together)
    view_inputs: list[dict[str, Any]] = field(default_factory=list)  # views 1 .. K-1: the processor's output for
    #                                                                  the augmented images (stochastic views)


def prepare_images(processor: Callable, examples: Sequence[ImageExample], bad_input: str = "error", *,
                   views: int = 1, augment: Callable[[Image.Image, str, int], Image.Image] | None = None,
                   ) -> PreparedBatch:
    """Decode ``examples`` and run ``processor`` on the images that decode; one thread's share of a batch.

    ``views`` > 1: also run ``processor`` on ``augment(image, example id, view)`` for views 1 .. views-1 (the
    augmentation goes before the processor, as a training pipeline's does; it is seeded per example and
    view, so which thread or batch prepares an image does not matter)."""
    if views > 1 and augment is None:
        raise ValueError(f"{views} views of images need an augmentation for views >= 1; none was given")
    t0 = time.perf_counter()
    kept, images, skipped = [], [], []
    for ex in examples:
        try:
            images.append(decode_image(ex.image, ex.origin))
        except BadImage as exc:
            if bad_input == "error":
                raise BadImage(exc.where, f"{exc.reason}. Fix or remove it, or set source.bad_input = \"skip\" to "
                               "leave such images out (each is recorded in the store with its reason)") from None
            log.warning("skipped broken image %s (example %s): %s", exc.where, ex.id, exc.reason)
            skipped.append(Skipped(ex.row, ex.id, BROKEN_IMAGE))
            continue
        kept.append(ex)
    inputs = _run_processor(processor, images) if images else {}
    view_inputs = [_run_processor(processor, [augment(image, ex.id, view) for image, ex in zip(images, kept)])
                   if images else {} for view in range(1, views)]
    return PreparedBatch(kept, inputs, skipped, time.perf_counter() - t0, view_inputs)


class ImagePreprocessor:
    """Decode + preprocess batches of images on a thread pool, ahead of the forward pass.

    ``processor``: a transformers image processor (called with ``return_tensors="pt"``) or any callable
    taking a list of RGB PIL images and returning a tensor/array (= pixel_values) or a mapping of them, one
    row per image. Each batch is cut into ``workers`` chunks processed in parallel (PIL decoding and resizing
    release the GIL); :meth:`map` keeps ``prefetch`` batches in flight so they overlap the caller's work.
    ``workers = 0`` runs everything on the calling thread. Not picklable: build one per worker process.
    ``augment``: the augmentation of stochastic views >= 1 (``map(..., views=K)``), see ``_augment``.
    """

    def __init__(self, processor: Callable, *, workers: int = 2, bad_input: str = "error",
                 augment: Callable[[Image.Image, str, int], Image.Image] | None = None):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if bad_input not in BAD_INPUT_POLICIES:
            raise ValueError(f"bad_input must be one of {BAD_INPUT_POLICIES}, got {bad_input!r}")
        self.processor, self.workers, self.bad_input, self.augment = processor, workers, bad_input, augment
        self._pool = (concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="unipt-images")
                      if workers else None)

    @classmethod
    def from_pretrained(cls, model: str, *, workers: int = 2, bad_input: str = "error",
                        revision: str | None = None) -> "ImagePreprocessor":
        """The image processor of a local transformers folder (or pkg://, or a cached hub id)."""
        from transformers import AutoImageProcessor

        from ._backbone import resolve_model_dir

        return cls(AutoImageProcessor.from_pretrained(resolve_model_dir(model, revision)), workers=workers,
                   bad_input=bad_input)

    @property
    def fingerprint(self) -> str:
        """sha256 of the processor's settings (its JSON form; a plain callable: its qualified name)."""
        to_json = getattr(self.processor, "to_json_string", None)
        if callable(to_json):
            text = to_json()
        else:
            fn = self.processor
            text = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
        return hashlib.sha256(text.encode()).hexdigest()

    def __call__(self, examples: Sequence[ImageExample]) -> PreparedBatch:
        return next(self.map([examples], prefetch=0))

    def map(self, batches: Iterable[Sequence[ImageExample]], prefetch: int = 2, views: int = 1,
            ) -> Iterator[PreparedBatch]:
        """Prepared batches in input order; up to ``prefetch`` later batches are prepared meanwhile.
        ``views`` > 1: each also carries the augmented views 1 .. views-1 (``PreparedBatch.view_inputs``)."""
        pending: deque[list[concurrent.futures.Future]] = deque()
        try:
            for batch in batches:
                pending.append(self._submit(list(batch), views))
                if len(pending) > prefetch:
                    yield _merge([f.result() for f in pending.popleft()])
            while pending:
                yield _merge([f.result() for f in pending.popleft()])
        finally:
            for futures in pending:  # the caller stopped early or a batch failed: drop the work not started
                for f in futures:
                    f.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "ImagePreprocessor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _submit(self, batch: list[ImageExample], views: int = 1) -> list[concurrent.futures.Future]:
        options = dict(views=views, augment=self.augment)
        if self._pool is None:
            future: concurrent.futures.Future = concurrent.futures.Future()
            try:
                future.set_result(prepare_images(self.processor, batch, self.bad_input, **options))
            except Exception as exc:
                future.set_exception(exc)
            return [future]
        size = max(1, math.ceil(len(batch) / self.workers))
        return [self._pool.submit(prepare_images, self.processor, batch[i : i + size], self.bad_input, **options)
                for i in range(0, max(len(batch), 1), size)]


def _run_processor(processor: Callable, images: list[Image.Image]) -> dict[str, Any]:
    from transformers.image_processing_base import ImageProcessingMixin

    if isinstance(processor, ImageProcessingMixin):
        out = processor(images, return_tensors="pt")
    else:
        out = processor(images)
    items = dict(out) if isinstance(out, Mapping) else {"pixel_values": out}
    inputs = {key: _as_tensor(value) for key, value in items.items()}
    for key, value in inputs.items():
        if len(value) != len(images):
            raise ValueError(f"the image processor returned {len(value)} rows of {key!r} for {len(images)} images; "
                             "it must return one per image")
    return inputs


def _as_tensor(value: Any) -> Any:
    import torch

    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (np.ndarray, torch.Tensor)) for v in value):
        return torch.stack([torch.as_tensor(v) for v in value])
    return value


def _merge(chunks: list[PreparedBatch]) -> PreparedBatch:
    """One batch from its chunks, in order: tensors concatenated along the first dim, lists joined."""
    import torch

    filled = [c for c in chunks if c.examples]

    def joined(parts: list[dict[str, Any]]) -> dict[str, Any]:
        inputs: dict[str, Any] = {}
        for key in parts[0] if parts else ():
            values = [p[key] for p in parts]
            if isinstance(values[0], torch.Tensor):
                inputs[key] = values[0] if len(values) == 1 else torch.cat(values)
            else:
                inputs[key] = [v for value in values for v in value]
        return inputs

    n_views = len(chunks[0].view_inputs) if chunks else 0
    return PreparedBatch([ex for c in chunks for ex in c.examples], joined([c.inputs for c in filled]),
                         [s for c in chunks for s in c.skipped], sum(c.seconds for c in chunks),
                         [joined([c.view_inputs[v] for c in filled]) for v in range(n_views)])
