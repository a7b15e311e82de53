"""Targets: a source row's raw label value read as the task's target, or the reason it cannot be one.

One module for every source (text and image), so the same value means the same target everywhere:

* ``classification``: any value; the classes are the sorted distinct values (numerically when all are
  integers). Stored as one class index per example.
* ``multilabel``: a list of labels, or a string split on ``label_delimiter``; an empty list or string is an
  example with no label (a real, all-zero row). Stored as a multi-hot row per example.
* ``regression``: one number per target column (an int, a float, or a string that reads as one); NaN,
  infinities, text and missing values are bad targets. Stored as float32 rows.
* ``tagging``: one tag per word: a list, or a string split on whitespace, as long as the row's words.
  Stored per sub-word token (first sub-word of each word; the others, and special tokens, are ignored).

A problem is ``(reason, detail)``: the short category recorded for a skipped row, and what to tell the user.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import numpy as np

from unipt.store import CLASSIFICATION, IGNORE_INDEX, MULTILABEL, REGRESSION, TAGGING, TASK_KINDS

_UNDECODABLE = re.compile("[\udc80-\udcff]")
Problem = tuple[str, str]


def check_task_options(task: str, label_column: str | None, label_delimiter: str | None,
                       target_columns: Sequence[str] | None, text_pair_column: str | None = None) -> None:
    """Refuse source options that do not fit the task (called from the source configs)."""
    if task not in TASK_KINDS:
        raise ValueError(f"source.task must be one of {TASK_KINDS}, got {task!r}")
    if label_delimiter is not None and task != MULTILABEL:
        raise ValueError(f"source.label_delimiter splits a multilabel column; source.task is {task!r}: leave it unset")
    if label_delimiter == "":
        raise ValueError("source.label_delimiter must be a non-empty string (e.g. \"|\"), or unset for list values")
    if target_columns is not None:
        if task != REGRESSION:
            raise ValueError(f"source.target_columns names regression targets; source.task is {task!r}: use "
                             "label_column")
        if isinstance(target_columns, str) or not target_columns or len(set(target_columns)) != len(target_columns):
            raise ValueError(f"source.target_columns must be a list of distinct column names, got {target_columns!r}")
    # Unlabelled sources are classification's and tagging's (words to tag); the others need targets.
    if task in (MULTILABEL, REGRESSION) and label_column is None and target_columns is None:
        raise ValueError(f"a {task} source needs its targets: set source.label_column"
                         + (" (or target_columns)" if task == REGRESSION else ""))
    if task == TAGGING and text_pair_column is not None:
        raise ValueError("source.text_pair_column does not apply to tagging (one sequence of words per row)")


def words_of(value: Any) -> list[str] | None:
    """A tagging row's words: a list of strings, or a string split on whitespace; None if it is neither."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, (list, tuple)) and all(isinstance(w, str) for w in value):
        return list(value)
    return None


def words_problem(value: Any, column: str) -> Problem | None:
    words = words_of(value)
    if words is None:
        return "non-text value", f"{column!r} holds a {type(value).__name__} ({value!r}), not a list of words"
    if not words or any(not w.strip() for w in words):
        return "empty text", f"{column!r} has {'no words' if not words else 'an empty word'} ({value!r})"
    if any(_UNDECODABLE.search(w) for w in words):
        return "undecodable text", f"{column!r} has bytes that are not valid in the source's encoding"
    return None


def target_problem(task: str, value: Any, column: str, *, delimiter: str | None = None,
                   n_words: int | None = None) -> Problem | None:
    """Why ``value`` (from ``column``) cannot be a ``task`` target, or None."""
    if task == CLASSIFICATION or task == MULTILABEL and isinstance(value, str):
        if value is None or (task == CLASSIFICATION and value == ""):
            return "missing label", f"missing {column!r} value"
        if isinstance(value, str) and _UNDECODABLE.search(value):
            return "undecodable label", f"{column!r} has bytes that are not valid in the source's encoding"
        if task == MULTILABEL and delimiter is None and value != "":
            return "bad target", (f"{column!r} holds the string {value!r}; a multilabel column holds a list of labels, "
                                  "or set source.label_delimiter to split strings")
        return None
    if task == MULTILABEL:
        if value is None:
            return "missing label", f"missing {column!r} value"
        if not isinstance(value, (list, tuple)) or not all(_is_label(v) for v in value):
            return "bad target", f"{column!r} holds {value!r}; a multilabel value is a list of labels (or a string)"
        return None
    if task == REGRESSION:
        if value is None or value == "":
            return "missing target", f"missing {column!r} value"
        number = as_number(value)
        if number is None:
            return "bad target", f"{column!r} holds {value!r}, not a number"
        if not math.isfinite(number):
            return "bad target", f"{column!r} holds {value!r}; a regression target must be a finite number"
        return None
    if task == TAGGING:
        tags = words_of(value) if value is not None else None
        if tags is None:
            return "missing label" if value is None else "bad target", (
                f"{column!r} holds {value!r}; tags are a list of strings (or one string of space-separated tags)")
        if n_words is not None and len(tags) != n_words:
            return "bad target", f"{column!r} has {len(tags)} tags for {n_words} words; give one tag per word"
        return None
    raise ValueError(f"unknown task {task!r}")


def raw_target(task: str, value: Any, *, delimiter: str | None = None) -> Any:
    """A valid raw value (see :func:`target_problem`) in canonical form: a class name (str), a tuple of label
    names, a float, or a tuple of tags."""
    if task == CLASSIFICATION:
        return value
    if task == MULTILABEL:
        parts = value.split(delimiter) if isinstance(value, str) else value
        return tuple(dict.fromkeys(str(p).strip() for p in parts if str(p).strip()))  # order kept, repeats dropped
    if task == REGRESSION:
        return float(as_number(value))
    return tuple(words_of(value))


def target_names(task: str, raw: Sequence[Any], columns: Sequence[str]) -> list[str]:
    """The store's ``label_names`` for these raw targets: classes, labels, the target columns, or tags."""
    if task == REGRESSION:
        return list(columns)
    if task == CLASSIFICATION:
        return sorted_names(list(raw))
    return sorted_names([name for value in raw for name in value])


def encode_target(task: str, raw: Any, index: dict[str, int]) -> Any:
    """A canonical raw target as an example carries it: a class index, a tuple of label indices, a tuple of
    floats (regression: ``raw`` is already the tuple of a row's values), or a tuple of tag indices."""
    if task == CLASSIFICATION:
        return index[str(raw)]
    if task == REGRESSION:
        return tuple(float(v) for v in raw)
    return tuple(index[str(name)] for name in raw)


def target_rows(task: str, targets: Sequence[Any], n_names: int) -> np.ndarray:
    """Example targets (as :func:`encode_target` gives them; tagging: per-token tag arrays) as the store's
    column for one part."""
    if task == CLASSIFICATION:
        return np.asarray(targets, dtype=np.int64)
    if task == MULTILABEL:
        hot = np.zeros((len(targets), n_names), dtype=np.uint8)
        for row, labels in enumerate(targets):
            hot[row, list(labels)] = 1
        return hot
    if task == REGRESSION:
        return np.asarray(targets, dtype=np.float32).reshape(len(targets), n_names)
    return (np.concatenate([np.asarray(t, dtype=np.int32) for t in targets]) if len(targets)
            else np.zeros(0, dtype=np.int32))


def align_tags(word_ids: Sequence[int | None], tags: Sequence[int] | None) -> list[int]:
    """One target per token from one tag per word: the first sub-word token of a word carries its tag; the
    word's other sub-words and special tokens (word id None) carry IGNORE_INDEX. Words cut off by truncation
    simply have no token (their tags are not scored). ``tags`` None (unlabelled): every token IGNORE_INDEX."""
    out, previous = [], None
    for word in word_ids:
        first = word is not None and word != previous
        out.append(int(tags[word]) if first and tags is not None else IGNORE_INDEX)
        previous = word
    return out


def as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def sorted_names(labels: Sequence[Any]) -> list[str]:
    """Class names in a stable order: numerically when every label is a number (0, 1, 2, ..., 10), else as text."""
    distinct = set(labels)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct):
        return [str(v) for v in sorted(distinct)]
    numeric = {str(v) for v in distinct}
    if all(v.lstrip("-").isdigit() for v in numeric):  # integer labels read from CSV text
        return sorted(numeric, key=int)
    return sorted(numeric)


def _is_label(value: Any) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip() != ""
