"""Comparing provenance records: which field differs, and both values."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
"""A backbone folder's weight files: hashed with its ``config.json`` into provenance's ``weights_sha256``."""


def files_sha256(folder: str | Path, names: Sequence[str]) -> str:
    """sha256 over (name, content) of the given files, in name order; the folder's location is left out."""
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(name.encode())
        with open(Path(folder) / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def weight_files(folder: str | Path) -> list[str]:
    """The files of a backbone folder that its ``weights_sha256`` covers: weights and ``config.json``."""
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.is_file() and (p.name.endswith(WEIGHT_SUFFIXES) or p.name == "config.json"))

# Fields that describe the software, not the data: they may differ between the writer of a store and
# a later reader or resumer without changing a single stored value ("location" is where a file was
# found on one machine; its content hash is what identifies it).
VOLATILE_FIELDS = ("versions", "created", "location")


class ProvenanceMismatch(ValueError):
    """A store or checkpoint was made from a different backbone, source or extraction config."""


def provenance_diff(
    expected: Mapping[str, Any],
    actual: Mapping[str, Any],
    ignore: Iterable[str] = VOLATILE_FIELDS,
    _prefix: str = "",
) -> list[tuple[str, Any, Any]]:
    """Return ``(dotted.field, expected_value, actual_value)`` for every leaf that differs."""
    ignore = tuple(ignore)
    diffs: list[tuple[str, Any, Any]] = []
    for key in sorted(set(expected) | set(actual)):
        if key in ignore:
            continue
        path = f"{_prefix}{key}"
        a, b = expected.get(key), actual.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs.extend(provenance_diff(a, b, ignore, _prefix=path + "."))
        elif _normalise(a) != _normalise(b):
            diffs.append((path, a, b))
    return diffs


def check_provenance(expected: Mapping[str, Any], actual: Mapping[str, Any], *, what: str, hint: str) -> None:
    """Raise :class:`ProvenanceMismatch` listing every differing field of ``expected`` vs ``actual``."""
    diffs = provenance_diff(expected, actual)
    if diffs:
        lines = "\n".join(f"  {path}: expected {a!r}, found {b!r}" for path, a, b in diffs)
        raise ProvenanceMismatch(f"{what}: provenance differs in {len(diffs)} field(s):\n{lines}\n{hint}")


def _normalise(value: Any) -> Any:
    # JSON round trips turn tuples into lists; compare them as equal.
    if isinstance(value, tuple):
        return [_normalise(v) for v in value]
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    return value
