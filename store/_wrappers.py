"""Zarr store wrappers: one records the sha256 of every object written through it, one refuses to read a
missing object as fill values."""

from __future__ import annotations

import hashlib
import re

from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore


class RecordingStore(WrapperStore[Store]):
    """Delegates everything to the wrapped store; ``digests`` maps each key written to its sha256.

    Hashing the bytes on their way to storage costs one pass over compressed data (a fraction of the
    compression work) and no read-back, which matters for remote stores.
    """

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.digests: dict[str, str] = {}
        self.sizes: dict[str, int] = {}  # bytes of each key written (what each stochastic view costs)

    def _with_store(self, store: Store) -> "RecordingStore":
        clone = type(self)(store)
        clone.digests, clone.sizes = self.digests, self.sizes  # one record, whichever view of the store wrote
        return clone

    async def set(self, key: str, value: Buffer) -> None:
        data = value.as_numpy_array().tobytes()
        self.digests[key] = hashlib.sha256(data).hexdigest()
        self.sizes[key] = len(data)
        await self._store.set(key, value)

    async def delete(self, key: str) -> None:
        self.digests.pop(key, None)
        self.sizes.pop(key, None)
        await self._store.delete(key)


class MissingObject(KeyError):
    """A chunk (or shard) object that a committed array must have is not in the store."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


class StrictReads(WrapperStore[Store]):
    """Reads through the wrapped store, raising :class:`MissingObject` where Zarr would get "no such key"
    for a chunk and decode the array's fill value instead.

    unipt writes every chunk, even one equal to the fill value, so a missing chunk object is always damage
    (a deleted file, a lost upload); Zarr itself cannot tell it from a chunk never written. Only reads of
    chunk keys (``<array>/c/...``) are strict: metadata documents may be looked up and legitimately absent.
    Costs nothing per read (no listing). Used for reading only: Zarr's own writes read a shard before
    replacing it and expect "no such key" for a new one.
    """

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        value = await self._store.get(key, prototype, byte_range)
        if value is None and _is_chunk_key(key):
            raise MissingObject(key)
        return value

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        values = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), value in zip(key_ranges, values):
            if value is None and _is_chunk_key(key):
                raise MissingObject(key)
        return values


# Zarr v3's default chunk key encoding: "<array path>/c/<i>/<j>...", the "c" fixed, the indices decimal.
_CHUNK_KEY = re.compile(r"(?:^|/)c(?:/\d+)+$")


def _is_chunk_key(key: str) -> bool:
    return _CHUNK_KEY.search(key) is not None
