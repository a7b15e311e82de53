"""Sources: read a table of texts and labels, dedupe it, split it deterministically by hash.

A reader yields raw rows; :func:`load_source` turns them into :class:`Example` lists per split. Everything
is keyed by the example id (a content hash unless the source names an id column; a webdataset sample's
``__key__``), so the same source gives the same splits, subsets and parts on every machine and every run:
that is what makes resume and distributed extraction safe.
"""

from __future__ import annotations

import csv
import ctypes
import hashlib
import json
import logging
import re
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

from . import _targets as targets
from ._resolve import resolve_path
from .config import SourceConfig

log = logging.getLogger(__name__)

_SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
                   ".tar": "webdataset"}
_SHARD_GLOB = "*.tar"  # the shards of a webdataset folder
# Text files are read with errors="surrogateescape": a byte that is not valid in the source's encoding
# becomes one lone surrogate, so one bad row can be named (or skipped) instead of failing the whole read.
_UNDECODABLE = re.compile("[\udc80-\udcff]")
_BAD = "__bad__"  # a reader's marker for a row it could not parse: {_BAD: reason, "__detail__": ...}
_READER_KEYS = ("__split__", "__key__", "__line__")  # keys a reader adds to a row besides the source's columns
# csv refuses a field longer than its limit (131,072 characters by default) with an error no policy can skip;
# a long text is truncated by the tokenizer like any other, so the limit goes to the largest a C long holds
# (sys.maxsize overflows it where a long has 32 bits, as on Windows).
_CSV_FIELD_LIMIT = 2 ** (8 * ctypes.sizeof(ctypes.c_long) - 1) - 1
_UNBALANCED_QUOTE = "unbalanced quote"


@dataclass(frozen=True, slots=True)  # slots: a streamed piece holds tens of thousands of these
class Example:
    id: str
    text: str  # tagging: the words joined by spaces (for messages and ids; the words are encoded)
    label: Any  # the task's target (_targets.encode_target): a class index (-1 = unlabelled), a tuple of label
    #             indices, a tuple of floats, or a tuple of tag indices (one per word)
    pair: str | None = None  # the second text of a pair (text_pair_column)
    words: tuple[str, ...] | None = None  # tagging: the words, tagged one by one
    group: str | None = None  # group_column's value: the split is drawn by it


@dataclass(frozen=True)
class Skipped:
    """A source row left out under ``bad_input = "skip"``, and why."""

    row: int  # 1-based position in the source's reading order
    id: str  # the example id it would have had; "row-<n>" when none can be formed (e.g. no text)
    reason: str  # a short category: empty text, non-text value, undecodable text, missing label, not JSON, ...


class BadInputError(ValueError):
    """A source row that cannot become an example, under ``bad_input = "error"``.

    ``problem`` names the row and what is wrong with it; ``advice`` says what to do, kept apart so that a
    caller whose user has other choices can give its own (``unipt predict`` has no ``source.bad_input``).
    """

    def __init__(self, problem: str, advice: str = ""):
        super().__init__(f"{problem}. {advice}" if advice else problem)
        self.problem, self.advice = problem, advice

    def __reduce__(self):  # picklable across processes (dask) despite the two-argument constructor
        return type(self), (self.problem, self.advice)


@dataclass
class SourceData:
    splits: dict[str, list[Example]]
    label_names: list[str]
    fingerprint: str  # sha256 of the source's content (not of its path)
    stats: dict[str, Any] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)  # rows left out under bad_input = "skip"


def text_id(text: str) -> str:
    """Stable content id of a text: 16 hex digits of its sha256."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def hash_unit(key: str, salt: str) -> float:
    """A deterministic uniform number in [0, 1) from ``key``; ``salt`` makes independent draws."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def source_format(config: SourceConfig, path: str) -> str:
    if config.format != "auto":
        return config.format
    if Path(path).is_dir():  # a folder of webdataset tars, of data files of one format, or a `datasets` folder
        if any(Path(path).glob(_SHARD_GLOB)):
            return "webdataset"
        kinds = {_SUFFIX_FORMATS[p.suffix.lower()] for p in Path(path).iterdir() if p.suffix.lower() in _SUFFIX_FORMATS}
        if len(kinds) > 1:
            raise ValueError(f"source folder {path!r} holds files of several formats ({', '.join(sorted(kinds))}); "
                             "keep one format per folder, or set source.format")
        return kinds.pop() if kinds and not (Path(path) / "dataset_dict.json").exists() and not (
            Path(path) / "state.json").exists() else "hf"
    fmt = _SUFFIX_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the format of {path!r} from its suffix; set source.format to one of "
                         f"csv, tsv, jsonl, parquet, hf, webdataset")
    return fmt


def read_rows(config: SourceConfig) -> tuple[Iterator[dict[str, Any]], str]:
    """Raw rows of the source as dicts (a ``__split__`` key where the source has its own splits; a
    webdataset sample's ``__key__``), and a fingerprint of its content."""
    rows, fingerprint, _ = _open_source(config)
    return rows, fingerprint


def _open_source(config: SourceConfig) -> tuple[Iterator[dict[str, Any]], str, str]:
    """:func:`read_rows`, and the resolved format."""
    path = resolve_path(config.path)
    fmt = source_format(config, path)
    if fmt == "hf":
        return (*_hf_rows(path), fmt)
    if fmt == "webdataset":
        shards = webdataset_shards(path)
        return _webdataset_rows(config, shards), _files_sha256(shards), fmt
    if not Path(path).is_file():
        raise FileNotFoundError(f"source file {path!r} does not exist")
    fingerprint = _files_sha256([path])
    if fmt in ("csv", "tsv"):
        return _csv_rows(path, config.encoding, "\t" if fmt == "tsv" else ","), fingerprint, fmt
    if fmt == "jsonl":
        return _jsonl_rows(path, config.encoding), fingerprint, fmt
    import pyarrow.parquet as pq

    return iter(pq.read_table(path).to_pylist()), fingerprint, fmt


def load_source(config: SourceConfig) -> SourceData:
    """Read, validate, dedupe and split the source; apply per-split caps (drawn by hash).

    A row that cannot become an example (empty or undecodable text, a missing label, an unparsable line or
    CSV record: see :func:`_csv_rows`) raises :class:`BadInputError` naming the row (a CSV/TSV row by the
    file line it starts on too), or with ``bad_input = "skip"`` is left out and listed in
    ``SourceData.skipped`` with its reason and its 1-based row number: never dropped silently.

    Everything is held in memory; extraction streams a source instead (:mod:`._stream`), with the same rules.
    """
    rows, fingerprint, fmt = _open_source(config)
    reader = RowReader(config, keyed=fmt == "webdataset")
    records: list[tuple[str, Example, Any, str | None]] = []  # (id, example without its target, raw target, split)
    skipped: list[Skipped] = []
    seen: dict[str, Any] = {}
    duplicates = conflicts = 0
    for number, row in enumerate(rows, start=1):
        record = reader.read(number, row)
        if isinstance(record, Skipped):
            skipped.append(record)
            continue
        if config.dedupe:
            if record.content in seen:
                duplicates += 1
                conflicts += seen[record.content] != record.target
                continue
            seen[record.content] = record.target
        records.append((record.example.id, record.example, record.target, record.split))
    report_kept(config.path, len(records), skipped, "rows")
    if conflicts:
        log.warning("%d duplicated texts carried different labels; the first occurrence was kept", conflicts)

    labelled = bool(config.label_column or config.target_columns)
    label_names = targets.target_names(config.task, [r[2] for r in records], _target_columns(config)) if labelled else []
    label_index = {name: i for i, name in enumerate(label_names)}
    splits = assign_splits(((split, replace(example, label=targets.encode_target(config.task, label, label_index)
                                            if labelled else -1))
                            for _, example, label, split in records), config.splits, config.max_examples)
    if config.task == targets.CLASSIFICATION:
        warn_if_one_class(config.path, splits, label_names, config.label_column)
    stats = {"rows": len(records) + duplicates + len(skipped), "duplicates_dropped": duplicates,
             "label_conflicts": conflicts, "skipped": _count_reasons(skipped),
             "examples": {name: len(ex) for name, ex in splits.items()}}
    return SourceData(splits=splits, label_names=label_names, fingerprint=fingerprint, stats=stats, skipped=skipped)


def row_where(path: str, number: int, row: dict[str, Any]) -> str:
    """How a message names source row ``number`` (1-based): with the file line it starts on where the reader
    knows it (CSV/TSV, whose quoted fields may span lines)."""
    if "__line__" in row:
        return f"{path} line {row['__line__']} (row {number})"
    return f"{path} row {number}"


@dataclass(frozen=True, slots=True)
class Record:
    """A source row that became an example (its target not yet encoded: label names come from every row)."""

    example: Example  # label=None until the label names are known
    target: Any  # the raw target in canonical form (None: unlabelled)
    split: str | None  # the source's own split for it, or None: drawn by hash
    content: str  # what makes two rows the same example (deduplication)


class RowReader:
    """Turns raw rows into :class:`Record` s one at a time: the column check on the first good row, the
    bad-input policy (raise :class:`BadInputError`, or return a :class:`Skipped`) and the example id.

    ``keyed``: the rows carry a stable source key (``__key__``, a webdataset sample's), the default id.
    ``path``: how messages name where the rows come from (a shard of a sharded source).
    """

    def __init__(self, config: SourceConfig, *, keyed: bool, path: str | None = None):
        self.config, self.keyed, self.path = config, keyed, path or config.path
        self._columns_checked = False

    def read(self, number: int, row: dict[str, Any]) -> "Record | Skipped":
        """Row ``number`` (1-based in the source's reading order) as a record, or as the skip it is."""
        config, keyed = self.config, self.keyed
        if not self._columns_checked and _BAD not in row:
            _check_columns(config, row)  # a misnamed column is a config error, not a bad row
            self._columns_checked = True
        problem = _row_problem(config, row)
        if problem is not None:
            reason, detail = problem
            if config.bad_input == "error":
                where = row_where(self.path, number, row) + (f" (sample {row['__key__']!r})" if keyed else "")
                raise BadInputError(f"{where}: {detail}", "Fix the source, or set source.bad_input = \"skip\" to "
                                    "leave such rows out (each is recorded in the store with its reason)")
            return Skipped(number, _fallback_id(config, row, number, keyed), reason)
        words = tuple(targets.words_of(row[config.text_column])) if config.task == targets.TAGGING else None
        text = " ".join(words) if words is not None else row[config.text_column]
        pair = row[config.text_pair_column] if config.text_pair_column else None
        content = text if pair is None else f"{text}\x00{pair}"
        if config.id_column:
            example_id = str(row[config.id_column])
        else:
            example_id = row["__key__"] if keyed else text_id(content)
        split = row.get("__split__") or (str(row[config.split_column]) if config.split_column else None)
        group = str(row[config.group_column]) if config.group_column else None
        return Record(Example(example_id, text, None, pair, words, group), _raw_target(config, row), split, content)


def _row_problem(config: SourceConfig, row: dict[str, Any]) -> tuple[str, str] | None:
    """Why ``row`` cannot become an example, as (reason category, detail), or None when it can."""
    if _BAD in row:
        return row[_BAD], row["__detail__"]
    if config.task == targets.TAGGING:
        problem = targets.words_problem(row.get(config.text_column), config.text_column)
        if problem is not None:
            return problem
        if not config.label_column:  # words to tag, no tags (predict's inputs)
            return None
        n_words = len(targets.words_of(row[config.text_column]))
        return targets.target_problem(config.task, row.get(config.label_column), config.label_column, n_words=n_words)
    problem = _text_problem(config, row, config.text_column)
    if problem is None and config.text_pair_column:
        problem = _text_problem(config, row, config.text_pair_column)
    if problem is not None:
        return problem
    for column in _target_columns(config):
        problem = targets.target_problem(config.task, row.get(column), column, delimiter=config.label_delimiter)
        if problem is not None:
            return problem
    return None


def _target_columns(config: SourceConfig) -> list[str]:
    """The columns the targets are read from: target_columns (regression), else label_column (or none)."""
    return list(config.target_columns or ([config.label_column] if config.label_column else []))


def _raw_target(config: SourceConfig, row: dict[str, Any]) -> Any:
    """A valid row's target in canonical form (regression: a tuple of its columns' values)."""
    columns = _target_columns(config)
    if not columns:
        return None
    if config.task == targets.REGRESSION:
        return tuple(targets.raw_target(config.task, row[c]) for c in columns)
    return targets.raw_target(config.task, row[columns[0]], delimiter=config.label_delimiter)


def _text_problem(config: SourceConfig, row: dict[str, Any], column: str) -> tuple[str, str] | None:
    """Why ``row[column]`` cannot be an input text, or None."""
    text = row.get(column)
    if text is None or (isinstance(text, str) and not text.strip()):
        return "empty text", f"empty {column!r} value {text!r}"
    if not isinstance(text, str):
        return "non-text value", f"{column!r} holds a {type(text).__name__} ({text!r}), not text"
    if _UNDECODABLE.search(text):
        return "undecodable text", (f"{column!r} has bytes that are not valid {config.encoding} "
                                    f"({_show_undecodable(text)}); set source.encoding if the file uses another one")
    return None


def _fallback_id(config: SourceConfig, row: dict[str, Any], number: int, keyed: bool) -> str:
    """The id a bad row would have had, so it can be found in the source; ``row-<n>`` when there is none."""
    if config.id_column and row.get(config.id_column) not in (None, ""):
        return str(row[config.id_column])
    if keyed and "__key__" in row:
        return str(row["__key__"])
    text = row.get(config.text_column)
    if isinstance(text, str) and text.strip() and not _UNDECODABLE.search(text) and not config.text_pair_column:
        return text_id(" ".join(text.split()) if config.task == targets.TAGGING else text)
    return f"row-{number}"


def _show_undecodable(text: str) -> str:
    match = _UNDECODABLE.search(text)
    start = max(0, match.start() - 20)
    return "near " + repr(text[start : match.start() + 20].encode("utf-8", "surrogateescape"))


def report_kept(path: str, kept: int, skipped: list[Skipped], noun: str) -> None:
    """Refuse a source that left nothing to extract (saying whether bad input took it all); warn of skips."""
    if not kept:
        if skipped:
            raise ValueError(f"source {path} has no usable {noun}: all {len(skipped)} were skipped as bad "
                             f"input ({_count_reasons(skipped)})")
        raise ValueError(f"source {path} has no {noun}")
    if skipped:
        log.warning("%d bad source %s skipped and recorded (%s)", len(skipped), noun, _count_reasons(skipped))


def warn_if_one_class(path: str, splits: dict[str, list[Any]], label_names: list[str],
                      label_column: str | None) -> None:
    """Warn when every example (after dedupe, skips and caps) has the same label: nothing to classify."""
    warn_if_one_label(path, {ex.label for examples in splits.values() for ex in examples}, label_names, label_column)


def warn_if_one_label(path: str, labels: set[int], label_names: list[str], label_column: str | None) -> None:
    """:func:`warn_if_one_class` given the distinct label indices the kept examples carry."""
    if label_column and len(labels) == 1:
        log.warning("every example of source %s has label %r, so a classifier learns nothing from it; check that "
                    "source.label_column (%r) names the label and that source.max_examples keeps more than one "
                    "class", path, label_names[next(iter(labels))], label_column)


def _count_reasons(skipped: list[Skipped]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in skipped:
        counts[s.reason] = counts.get(s.reason, 0) + 1
    return counts


def assign_splits(examples: Iterable[tuple[str | None, Any]], fractions: dict[str, float],
                  max_examples: dict[str, int], validation_from_train: float = 0.0) -> dict[str, list[Any]]:
    """Examples (each with an ``id``) grouped by split: the source's own split when it names one, else the
    split its id hashes to; then each split capped by a hash-drawn subset. Order within a split is kept.

    ``validation_from_train``: when the source's own splits have a train split and no validation split,
    this fraction of train (drawn by hash) becomes the validation split, before the caps.

    Split names become store paths: one that cannot be a path component is refused (:func:`_check_split_name`).
    """
    draw = SplitDraw(fractions)
    splits: dict[str, list[Any]] = {}
    for split, example in examples:
        splits.setdefault(draw(split, example), []).append(example)
    if validation_from_train > 0 and "train" in splits and "validation" not in splits:
        held = [hash_unit(getattr(ex, "group", None) or ex.id, "validation") < validation_from_train
                for ex in splits["train"]]
        splits["validation"] = [ex for ex, h in zip(splits["train"], held) if h]
        splits["train"] = [ex for ex, h in zip(splits["train"], held) if not h]
    for name, cap in max_examples.items():
        if name not in splits:
            raise ValueError(f"source.max_examples names split {name!r}; the source has {sorted(splits)}")
        splits[name] = _hash_subset(splits[name], cap)
    return splits


class SplitDraw:
    """The split of each example: the source's own split when it names one (checked to be a usable name),
    else the split that a hash of its group (group_column) or, without one, of its id falls in."""

    def __init__(self, fractions: dict[str, float]):
        for name in fractions:
            _check_split_name(name, "source.splits")
        self._cuts = _cumulative(fractions)
        self._own: set[str] = set()  # the source's own split names already checked

    def __call__(self, split: str | None, example: Any) -> str:
        if split is None:
            u = hash_unit(getattr(example, "group", None) or example.id, "split")
            return next((name for name, cut in self._cuts if u < cut), self._cuts[-1][0])
        if split not in self._own:
            _check_split_name(split, "the source's own splits (source.split_column, or the splits it comes with)")
            self._own.add(split)
        return split


def _check_split_name(name: str, origin: str) -> None:
    """Refuse a split name the store cannot keep: each split is a group at a /-separated path, so a name that
    is not a single path component would put its parts in nested groups no reader looks at."""
    if "/" in name or "\\" in name:
        why = ("holds a path separator ('/' or '\\'): the store keeps each split at a /-separated path, so a "
               "split name must be a single path component")
    elif not name.strip("."):
        why = "is empty" if not name else "is only dots, which a path reads as this folder or the one above"
    elif name.startswith("_"):
        why = "starts with '_', which the store reserves for its own records"
    else:
        return
    raise ValueError(f"split name {name!r} (from {origin}) {why}; rename the split")




def _hash_subset(examples: list[Example], cap: int) -> list[Example]:
    """The ``cap`` examples with the smallest subset-hash, kept in source order (a uniform random draw)."""
    if len(examples) <= cap:
        return examples
    keep = set(sorted(range(len(examples)), key=lambda i: hash_unit(examples[i].id, "subset"))[:cap])
    return [ex for i, ex in enumerate(examples) if i in keep]


def _cumulative(fractions: dict[str, float]) -> list[tuple[str, float]]:
    total, cuts = 0.0, []
    for name, fraction in fractions.items():
        total += fraction
        cuts.append((name, total))
    return cuts


def _check_columns(config: SourceConfig, row: dict[str, Any]) -> None:
    wanted = [c for c in (config.text_column, config.text_pair_column, *_target_columns(config), config.id_column,
                          config.split_column, config.group_column) if c]
    missing = [c for c in wanted if c not in row]
    if missing:
        raise KeyError(f"source {config.path} has no column(s) {missing}; its columns are "
                       f"{sorted(k for k in row if k not in _READER_KEYS)}")


def _csv_rows(path: str, encoding: str, delimiter: str) -> Iterator[dict[str, Any]]:
    """The records of a CSV/TSV file as dicts keyed by its header, each with ``__line__``: the file line it
    starts on (a quoted field may span lines). Blank lines are passed over.

    A record that cannot be a row is yielded as a bad-row marker, named by the line it starts on:

    * "wrong field count": more or fewer fields than the header (a value holding an unquoted delimiter, a
      missing value). Reading goes on after the record.
    * "unbalanced quote": broken quoting (a quote that never closes, or a closing quote followed by anything
      but a delimiter or the line's end). The record is taken to be its first line alone: reading starts
      again on the next line, so the rows the quote swallowed are read as rows. (Had the quote opened a real
      multi-line text whose quoting broke further down, its later lines come out as rows of their own, as a
      rule with a wrong field count.)

    Quoted fields holding delimiters, doubled quotes or line breaks are read as usual (RFC 4180). A stray
    quote that a second stray quote happens to close is valid CSV, indistinguishable from a multi-line text:
    records spanning several lines are therefore counted and logged with their first lines, to look at.
    """
    csv.field_size_limit(_CSV_FIELD_LIMIT)  # process-wide, and only ever raised: harmless to other readers
    with open(path, newline="", encoding=encoding, errors="surrogateescape") as f:
        lines = _LineFeed(f)
        reader = csv.reader(lines, delimiter=delimiter, strict=True)  # strict: broken quoting raises
        header: list[str] | None = None
        next_line = 1  # the file line the next record starts on
        spanning: list[int] = []  # first lines of records whose quoted fields hold line breaks
        while True:
            lines.taken = []
            try:
                fields: list[str] = next(reader)
                problem = None if header is None else _record_problem(fields, len(header), delimiter)
            except StopIteration:
                if spanning:
                    log.info("%s: %d records hold line breaks inside quoted fields (starting on lines %s); they are "
                             "read as multi-line texts (a stray quote closed by another would read the same)", path,
                             len(spanning), ", ".join(map(str, spanning[:5])) + (", ..." if len(spanning) > 5 else ""))
                return
            except csv.Error as exc:
                fields, problem = [], _quote_error(exc, len(lines.taken))
                # The record is its first line alone: the lines the broken quote swallowed are read again.
                lines.read_again(lines.taken[1:])
                lines.taken = lines.taken[:1]
                reader = csv.reader(lines, delimiter=delimiter, strict=True)  # a clean start on the next line
            line, next_line = next_line, next_line + len(lines.taken)
            if header is None:
                if problem is not None:
                    raise ValueError(f"{path} line {line}: the header cannot be read: {problem[1]}")
                header = fields or None  # a blank line before the header is passed over too
            elif problem is not None:
                yield {_BAD: problem[0], "__detail__": problem[1], "__line__": line}
            elif fields:
                if len(lines.taken) > 1:
                    spanning.append(line)
                yield {**dict(zip(header, fields)), "__line__": line}


class _LineFeed:
    """A text file's lines for ``csv.reader``, keeping those of the record being read (``taken``) so that
    lines a broken quote swallowed can be read again."""

    def __init__(self, file: Iterable[str]):
        self._file = iter(file)
        self._again: list[str] = []  # lines to give before the file's next, last first
        self.taken: list[str] = []

    def __iter__(self) -> "_LineFeed":
        return self

    def __next__(self) -> str:
        line = self._again.pop() if self._again else next(self._file)
        self.taken.append(line)
        return line

    def read_again(self, lines: list[str]) -> None:
        self._again.extend(reversed(lines))


def _record_problem(fields: list[str], width: int, delimiter: str) -> tuple[str, str] | None:
    """(reason, detail) when a record that csv read without error is still no row of ``width`` fields."""
    if fields and len(fields) != width:
        hint = (f"; a value holding {delimiter!r} must be quoted" if len(fields) > width else
                "; a value may be missing")
        return "wrong field count", f"{len(fields)} field(s) where the header has {width}{hint}"
    return None


def _quote_error(exc: csv.Error, span: int) -> tuple[str, str]:
    """(reason, detail) of a record of ``span`` lines that csv could not read: in strict mode, only broken
    quoting raises."""
    if "unexpected end of data" in str(exc):
        return _UNBALANCED_QUOTE, "a quoted field starts on this line and its quote never closes (the file ends in it)"
    where = "on this line" if span == 1 else f"{span - 1} lines further down"
    return _UNBALANCED_QUOTE, (f"broken quoting: {exc} {where}; a quoted field must end with its quote, and a "
                               "quote inside it is written twice (\"\")")


def _jsonl_rows(path: str, encoding: str) -> Iterator[dict[str, Any]]:
    with open(path, encoding=encoding, errors="surrogateescape") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield {_BAD: "not JSON", "__detail__": f"line {number} is not JSON ({exc})"}
                    continue
                if not isinstance(row, dict):
                    yield {_BAD: "not JSON", "__detail__": f"line {number} is a JSON {type(row).__name__}, not an object"}
                    continue
                yield row


def _hf_rows(path: str) -> tuple[Iterator[dict[str, Any]], str]:
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("Hugging Face dataset sources need `datasets`: pip install 'unipt[hf]'") from exc
    if Path(path).is_dir():
        data = datasets.load_from_disk(path)
    else:
        data = datasets.load_dataset(path)
    if isinstance(data, datasets.DatasetDict):
        fingerprint = hashlib.sha256("".join(data[s]._fingerprint for s in sorted(data)).encode()).hexdigest()

        def rows() -> Iterator[dict[str, Any]]:
            for split in data:
                for row in data[split]:
                    yield {**row, "__split__": split}

        return rows(), fingerprint
    return iter(data), hashlib.sha256(data._fingerprint.encode()).hexdigest()


def webdataset_shards(path: str) -> list[str]:
    """The shard files of a webdataset source in reading order: a folder's ``*.tar`` files in name order,
    the expansion of a brace pattern (``shards-{000000..000009}.tar``), or the one file named."""
    if Path(path).is_dir():
        shards = sorted(str(p) for p in Path(path).glob(_SHARD_GLOB))
        if not shards:
            raise FileNotFoundError(f"webdataset source folder {path!r} holds no {_SHARD_GLOB} shards")
        return shards
    _webdataset()  # braceexpand comes with it
    import braceexpand

    shards = list(braceexpand.braceexpand(path))
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"webdataset source {path!r}: {len(missing)} of {len(shards)} shard files do not "
                                f"exist, e.g. {missing[:3]}")
    return shards


def _webdataset_rows(config: SourceConfig, shards: list[str]) -> Iterator[dict[str, Any]]:
    """One row per sample (the files of a shard that share a key): the sample's ``__key__`` and each
    configured column, read from the member with that extension or else from that field of the sample's
    json member."""
    columns = [c for c in (config.text_column, config.text_pair_column, *_target_columns(config), config.id_column,
                           config.split_column, config.group_column) if c]
    first_seen: dict[str, str] = {}  # key -> shard, to refuse a key used twice (it is the example id)
    for shard in shards:
        for sample in _tar_samples(shard):
            key = sample["__key__"]
            if config.id_column is None:
                if key in first_seen:
                    raise ValueError(f"webdataset sample key {key!r} occurs twice (in {first_seen[key]} and "
                                     f"{shard}); keys are the example ids, so they must be unique. Set "
                                     "source.id_column to a member or json field holding a unique id instead.")
                first_seen[key] = shard
            row = {"__key__": key}
            try:
                fields = _json_fields(sample, config.encoding, shard)
                for column in columns:
                    row[column] = _sample_value(sample, fields, column, config.encoding, shard, config.label_column)
            except _BadSample as exc:
                row.update({_BAD: exc.reason, "__detail__": str(exc)})
            yield row


class _BadSample(ValueError):
    """One webdataset sample's member cannot be read (the others still can)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _tar_samples(shard: str) -> Iterator[dict[str, Any]]:
    """Samples of one tar shard, grouped by webdataset's tar iterators: ``{"__key__": ..., ext: bytes}``.

    The file is opened here, so a source path is only ever a file (never a ``pipe:`` command).
    """
    tariterators = _webdataset().tariterators
    with open(shard, "rb") as stream:
        samples = tariterators.group_by_keys(tariterators.tar_file_expander([{"url": shard, "stream": stream}]))
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                return
            except (tarfile.TarError, ValueError) as exc:  # webdataset appends stream objects to the args
                reason = str(exc.args[0]).split(" @ ")[0] if exc.args else type(exc).__name__
                raise ValueError(f"webdataset shard {shard} cannot be read: {reason}") from exc
            yield sample


def _json_fields(sample: dict[str, Any], encoding: str, shard: str) -> dict[str, Any] | None:
    if "json" not in sample:
        return None
    try:
        fields = json.loads(sample["json"].decode(encoding))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _BadSample("not JSON", f"webdataset sample {sample['__key__']!r} in {shard}: its json member is "
                         f"not JSON ({exc})") from exc
    if not isinstance(fields, dict):
        raise _BadSample("not JSON", f"webdataset sample {sample['__key__']!r} in {shard}: its json member is a "
                         f"{type(fields).__name__}, not an object with fields")
    return fields


def _sample_value(sample: dict[str, Any], fields: dict[str, Any] | None, column: str, encoding: str,
                  shard: str, label_column: str | None = None) -> Any:
    """``column`` of one sample: the member with that extension (decoded text), else the json field."""
    member = column.lower()  # webdataset lower-cases extensions
    if member in sample and not member.startswith("__"):
        try:
            return sample[member].decode(encoding)
        except UnicodeDecodeError as exc:
            raise _BadSample("undecodable text", f"webdataset sample {sample['__key__']!r} in {shard}: member "
                             f"{member!r} is not {encoding} text ({exc})") from exc
    if fields is not None and column in fields:
        return fields[column]
    members = sorted(k for k in sample if not k.startswith("__"))
    has_fields = f" and json fields {sorted(fields)}" if fields is not None else ""
    if column == label_column:  # one sample without its label: a missing value, not a misnamed column
        raise _BadSample("missing label", f"webdataset sample {sample['__key__']!r} in {shard} has no {column!r} "
                         f"member and no json field {column!r}; it has members {members}{has_fields}")
    raise KeyError(f"webdataset sample {sample['__key__']!r} in {shard} has no {column!r} member and no json "
                   f"field {column!r}; it has members {members}{has_fields}")


def _webdataset():
    try:
        import webdataset
    except ImportError as exc:
        raise ImportError("webdataset sources need the `webdataset` package: pip install webdataset") from exc
    return webdataset


def _files_sha256(paths: list[str]) -> str:
    """sha256 of the files' contents, one after another (for one file: the file's own sha256)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
