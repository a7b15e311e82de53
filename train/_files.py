"""Files of a run folder (checkpoints, epoch state, records) on a local disk or at an fsspec URL.

Every write is whole or absent: locally a temporary file in the same folder is renamed over the target (a
rename within one file system is atomic), and on object storage one PUT replaces the object (S3, GCS and
Azure make a single-object write visible all at once). A process killed mid-write leaves the previous
version, never a torn file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import fsspec

TEMPORARY_PREFIX = ".tmp-"
"""Names of files being written; one left behind was cut short by a kill and may be deleted."""


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def join(location: str | Path, *names: str) -> str:
    """``location/name/...`` for a local path or a URL (pathlib would turn ``s3://b`` into ``s3:/b``)."""
    if is_url(location):
        return "/".join([str(location).rstrip("/"), *names])
    return str(Path(location, *names))


def write_atomic(location: str | Path, data: bytes) -> None:
    location = str(location)
    if is_url(location):
        fs, path = fsspec.core.url_to_fs(location)
        fs.pipe_file(path, data)
        return
    folder = os.path.dirname(os.path.abspath(location))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMPORARY_PREFIX, suffix="-" + os.path.basename(location))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes reach the disk before the name points at them
        os.replace(tmp, location)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_bytes(location: str | Path) -> bytes:
    """The file's bytes; FileNotFoundError when it is absent (locally or remotely)."""
    location = str(location)
    if is_url(location):
        fs, path = fsspec.core.url_to_fs(location)
        return fs.cat_file(path)
    return Path(location).read_bytes()


def exists(location: str | Path) -> bool:
    location = str(location)
    if is_url(location):
        fs, path = fsspec.core.url_to_fs(location)
        return fs.exists(path)
    return os.path.exists(location)


def remove(location: str | Path) -> None:
    """Delete the file if it is there."""
    location = str(location)
    if is_url(location):
        fs, path = fsspec.core.url_to_fs(location)
        if fs.exists(path):
            fs.rm_file(path)
    elif os.path.exists(location):
        os.unlink(location)


def listdir(location: str | Path) -> list[str]:
    """Names of the files directly in a folder (empty when it does not exist)."""
    location = str(location)
    if is_url(location):
        fs, path = fsspec.core.url_to_fs(location)
        if not fs.exists(path):
            return []
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    return sorted(os.listdir(location)) if os.path.isdir(location) else []
