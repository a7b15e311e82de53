"""A Zarr store wrapper that records the sha256 of every object written through it."""

from __future__ import annotations

import hashlib

from zarr.abc.store import Store
from zarr.core.buffer import Buffer
from zarr.storage import WrapperStore


class RecordingStore(WrapperStore[Store]):
    """Delegates everything to the wrapped store; ``digests`` maps each key written to its sha256.

    Hashing the bytes on their way to storage costs one pass over compressed data (a fraction of the
    compression work) and no read-back, which matters for remote stores.
    """

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.digests: dict[str, str] = {}

    def _with_store(self, store: Store) -> "RecordingStore":
        clone = type(self)(store)
        clone.digests = self.digests  # one record, whichever view of the store wrote
        return clone

    async def set(self, key: str, value: Buffer) -> None:
        self.digests[key] = hashlib.sha256(value.as_numpy_array().tobytes()).hexdigest()
        await self._store.set(key, value)

    async def delete(self, key: str) -> None:
        self.digests.pop(key, None)
        await self._store.delete(key)
