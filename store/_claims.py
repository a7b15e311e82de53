"""Claims: which extraction run is writing which part, so two runs on one store never write the same part.

A claim is a small JSON object at ``_claims/<split>/<part>.json`` beside the Zarr hierarchy (not a Zarr
node, so readers never see it). A run creates it *exclusively* before writing a part, refreshes its
heartbeat while it works, checks it still holds it just before committing, and deletes it after the
commit. Another run skips a claimed part and comes back to it later; it may take the claim over when the
claim is stale:

* no heartbeat for ``ttl`` seconds (its holder hung, or its machine died), or
* its holder ran on this host and that process no longer exists (a killed run: resume takes over at once,
  without waiting out the ttl).

A claim names its run: a task of the same run re-run elsewhere (a dask retry after a worker died) owns it.

Exclusive creation is atomic on local folders (an exclusive rename) and in memory; on S3 it is a
conditional put (``If-None-Match: *``), which AWS S3 and S3-compatible servers that implement it honour.
Elsewhere the claim is written, then read back: that narrows the race between two runs to the time of one
round trip, and the commit-time check plus ``unipt store verify`` catch what slips through.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

CLAIMS_PREFIX = "_claims"
DEFAULT_TTL = 120.0  # seconds without a heartbeat before another run may take a claim over


class ClaimLost(RuntimeError):
    """This run's claim on a part was taken over (it looked stale to another run): the part is not committed."""


@dataclass(frozen=True)
class Owner:
    """Who holds a claim: the run, and the process and host doing the work."""

    run: str  # one id per extraction run; every task of that run (on any worker) shares it
    host: str
    pid: int
    process_started: float  # the process's start time: tells a reused pid from the original

    @classmethod
    def current(cls, run: str) -> "Owner":
        import psutil

        return cls(run, socket.gethostname(), os.getpid(), psutil.Process().create_time())

    def describe(self) -> str:
        return f"run {self.run[:8]} (pid {self.pid} on {self.host})"


def new_run_id() -> str:
    return uuid.uuid4().hex


class Claims:
    """The claims one process holds in one store, kept fresh by a heartbeat thread while any are held."""

    def __init__(self, zarr_store, root_path: str, owner: Owner, ttl: float = DEFAULT_TTL):
        if ttl <= 0:
            raise ValueError(f"claim ttl must be > 0 seconds, got {ttl}")
        self._store, self._root, self.owner, self.ttl = zarr_store, root_path.strip("/"), owner, ttl
        self._held: dict[str, str] = {}  # key -> token of our claim document
        self._lock = threading.Lock()
        # Held by the heartbeat from its check that a claim is still ours to its refreshed write, and by
        # release from dropping the claim to deleting it: a refresh landing after the delete would leave a
        # claim on a committed part behind.
        self._refreshing = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- the protocol
    def acquire(self, split: str, part: str) -> bool:
        """Claim ``split/part`` for this run. False when another live run holds it."""
        key = self._key(split, part)
        for _ in range(3):  # a claim released or taken over between our steps: look again
            token = uuid.uuid4().hex
            if self._create(key, self._document(token)):
                current = self._read(key)
                if current is not None and current.get("token") == token:
                    return self._hold(key, token)
                continue
            current = self._read(key)
            if current is None:
                continue
            if current.get("owner", {}).get("run") == self.owner.run or self.is_stale(current):
                # Ours from an earlier attempt (a retried task), or abandoned: replace it and check we won.
                self._put(key, self._document(token))
                time.sleep(0.05)  # let a competing take-over land first, then see who holds it
                current = self._read(key)
                if current is not None and current.get("token") == token:
                    return self._hold(key, token)
            return False
        return False

    def check(self, split: str, part: str) -> None:
        """Raise :class:`ClaimLost` unless this run still holds the claim (called just before a commit)."""
        key = self._key(split, part)
        current = self._read(key)
        with self._lock:
            token = self._held.get(key)
        if token is None or current is None or current.get("token") != token:
            holder = "nobody" if current is None else Owner(**current["owner"]).describe()
            raise ClaimLost(f"the claim on {split}/{part} is now held by {holder}: this run stops writing it "
                            "(it looked stale; raise extract.claim_ttl if runs are being slow, not dead)")

    def release(self, split: str, part: str) -> None:
        key = self._key(split, part)
        with self._refreshing:
            with self._lock:
                token = self._held.pop(key, None)
            if token is not None:
                current = self._read(key)
                if current is not None and current.get("token") == token:
                    sync(self._store.delete(self._path(key)))

    def holder(self, split: str, part: str) -> dict[str, Any] | None:
        """The claim document on ``split/part`` (owner, claimed, heartbeat, token), or None."""
        return self._read(self._key(split, part))

    def is_stale(self, document: dict[str, Any]) -> bool:
        return stale_reason(document, self.ttl) is not None

    def close(self) -> None:
        """Stop the heartbeat and release every claim still held (a run that failed gives its parts back)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            held = list(self._held)
        for key in held:
            split, part = key.split("/")[-2:]
            self.release(split, part.removesuffix(".json"))

    def __enter__(self) -> "Claims":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------- internals
    def _hold(self, key: str, token: str) -> bool:
        with self._lock:
            self._held[key] = token
            if self._thread is None:
                self._thread = threading.Thread(target=self._heartbeat, name="unipt-claims", daemon=True)
                self._thread.start()
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            with self._lock:
                held = dict(self._held)
            for key, token in held.items():
                with self._refreshing:
                    with self._lock:
                        if self._held.get(key) != token:
                            continue  # released since: never write it back
                    current = self._read(key)
                    if current is not None and current.get("token") == token:  # never revive a lost claim
                        self._put(key, self._document(token, claimed=current.get("claimed")))

    def _document(self, token: str, claimed: float | None = None) -> bytes:
        now = time.time()
        return json.dumps({"owner": asdict(self.owner), "token": token, "claimed": claimed or now,
                           "heartbeat": now, "ttl": self.ttl}).encode()

    def _key(self, split: str, part: str) -> str:
        return f"{CLAIMS_PREFIX}/{split}/{part}.json"

    def _path(self, key: str) -> str:
        return f"{self._root}/{key}" if self._root else key

    def _read(self, key: str) -> dict[str, Any] | None:
        buffer = sync(self._store.get(self._path(key), default_buffer_prototype()))
        if buffer is None:
            return None
        try:
            return json.loads(buffer.to_bytes())
        except ValueError:
            return {"heartbeat": 0}  # a claim document cut short by a crash: stale

    def _put(self, key: str, data: bytes) -> None:
        sync(self._store.set(self._path(key), default_buffer_prototype().buffer.from_bytes(data)))

    def _create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist; True when this call created it."""
        return create_exclusive(self._store, self._path(key), data)


def stale_reason(document: dict[str, Any], ttl: float) -> str | None:
    """Why a claim may be taken over, or None while its holder looks alive: no heartbeat for ``ttl``
    seconds, or its holder ran on this host and that process is gone."""
    silent = time.time() - float(document.get("heartbeat", 0))
    if silent > ttl:
        return f"no heartbeat for {silent:.0f}s"
    owner = document.get("owner", {})
    if owner.get("host") == socket.gethostname() and owner.get("pid") is not None:
        if not _process_alive(int(owner["pid"]), float(owner.get("process_started", 0))):
            return "its process is gone"
    return None


def claim_stale_reason(document: dict[str, Any]) -> str | None:
    """:func:`stale_reason` judged by the ttl the claim was made with (older claims: the default)."""
    return stale_reason(document, float(document.get("ttl", DEFAULT_TTL)))


def claim_state(document: dict[str, Any]) -> str:
    """"writing" while the claim's holder looks alive, else "stale (why)"."""
    reason = claim_stale_reason(document)
    return "writing" if reason is None else f"stale ({reason})"


def list_claims(zarr_store, root_path: str) -> list[tuple[str, str, dict[str, Any]]]:
    """Every claim in a store: (split, part, claim document)."""
    prefix = f"{root_path.strip('/')}/{CLAIMS_PREFIX}/" if root_path.strip("/") else f"{CLAIMS_PREFIX}/"

    async def keys() -> list[str]:
        return sorted([k async for k in zarr_store.list_prefix(prefix)])

    out = []
    for key in sync(keys()):
        split, name = key[len(prefix):].split("/", 1)
        if not name.endswith(".json"):
            continue  # an interrupted write's temporary file
        buffer = sync(zarr_store.get(key, default_buffer_prototype()))
        try:
            document = json.loads(buffer.to_bytes()) if buffer is not None else None
        except ValueError:
            document = {"heartbeat": 0}
        if document is not None:
            out.append((split, name.removesuffix(".json"), document))
    return out


def create_exclusive(zarr_store, path: str, data: bytes) -> bool:
    """Write the object ``path`` of ``zarr_store`` only if it does not exist; True when this call created it.

    Atomic where :func:`creates_exclusively` says so; elsewhere the object is written when absent, then
    read back (a race between two writers then narrows to one round trip).
    """
    fs = getattr(zarr_store, "fs", None)
    if fs is not None and getattr(fs, "async_impl", False) and "s3" in _protocols(fs):
        try:
            sync(fs._pipe_file(f"{zarr_store.path.rstrip('/')}/{path}", data, mode="create"))
            return True
        except (FileExistsError, OSError) as exc:
            if isinstance(exc, FileExistsError) or "PreconditionFailed" in str(exc) or "412" in str(exc):
                return False
            raise
    # LocalStore (exclusive rename) and MemoryStore (setdefault) are atomic; other stores check first.
    sync(zarr_store.set_if_not_exists(path, default_buffer_prototype().buffer.from_bytes(data)))
    current = sync(zarr_store.get(path, default_buffer_prototype()))
    return current is not None and current.to_bytes() == data


def creates_exclusively(zarr_store) -> bool:
    """Whether :func:`create_exclusive` is atomic on ``zarr_store``: local folders, memory, S3."""
    from zarr.storage import LocalStore, MemoryStore

    if isinstance(zarr_store, (LocalStore, MemoryStore)):
        return True
    fs = getattr(zarr_store, "fs", None)
    return fs is not None and getattr(fs, "async_impl", False) and "s3" in _protocols(fs)


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _process_alive(pid: int, started: float) -> bool:
    """Whether the process ``pid`` that started at ``started`` still runs on this host (a pid reused by a
    later process does not count; one we may not inspect does, to be safe)."""
    import psutil

    try:
        process = psutil.Process(pid)
        # A killed child its parent has not reaped yet is a zombie: it does nothing any more.
        return abs(process.create_time() - started) < 1.0 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.AccessDenied:
        return True
    except (psutil.NoSuchProcess, ValueError):
        return False
