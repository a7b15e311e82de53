"""Opening a split over S3: the split index against listing the split, for 10^2 .. 10^5 parts.

Times ``FeatureStore.open(url)`` + ``store.parts("train")`` on a store at an ``s3://`` URL served by moto's
S3 server on loopback (the same server the S3 tests use, in this process), once while the split has no
index (readers list the split and read every part's ``zarr.json``) and once with a complete index.

The parts are made cheaply but honestly: one real part is written with ``PartWriter`` (one float16 layer of
width 8, three examples); every other part is a copy of only what opening reads, its ``zarr.json`` (the
group metadata holding the declared counts and the commit record), renamed, with its source range moved
and its commit record's sha256 recomputed so each copy is a valid committed part of its own range (no
arrays behind it: nothing here reads a part's data). The copies are stored in bulk straight into the moto
server's backend (the objects a PUT makes, without 10^5 HTTP round trips); the plan says the split has N parts, and the index base is written directly from the same entries
a compaction would write.

    python benchmarks/bench_index.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from unipt.store import FeatureStore, PartInfo, _index
from unipt.store._store import _commit_digest

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, publish  # noqa: E402

SECTION = "index"
BUCKET = "unipt-bench-index"


def start_s3(scratch: str):
    """moto's S3 server on 127.0.0.1, the AWS environment pointed at it, the bucket created."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_EC2_METADATA_DISABLED="true",
                      AWS_CONFIG_FILE=f"{scratch}/none", AWS_SHARED_CREDENTIALS_FILE=f"{scratch}/none",
                      NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return server


def build(url: str, n: int) -> tuple[FeatureStore, dict]:
    """A store at ``url`` whose train split has ``n`` committed parts (see the module docstring)."""
    import s3fs

    store = FeatureStore.create(url, layers=[0], layer_widths=[8], dtype="float16", label_names=["a", "b"],
                                provenance={"backbone": {"location": "bench"}},
                                plan={"train": {"examples": 3 * n, "parts": n}})
    writer = store.part_writer("train", 0, n_examples=3, n_tokens=6, source_start=0)
    writer.append({0: torch.from_numpy(np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32))})
    writer.finish(["a", "b", "c"], [0, 1, 0], [3, 2, 1])
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    prefix = url[len("s3://"):]
    document = json.loads(fs.cat_file(f"{prefix}/train/part-000000/zarr.json"))
    fs.rm(f"{prefix}/_index", recursive=True)  # part 0's journal entry: the base below holds every part
    attrs = document["attributes"]
    files, entries = {}, {}
    for i in range(n):
        part = {**attrs["unipt_part"], "source_start": 3 * i, "source_stop": 3 * i + 3}
        commit = {**attrs["unipt_commit"], "source_start": 3 * i, "source_stop": 3 * i + 3}
        commit["record_sha256"] = _commit_digest(part, commit)
        name = f"part-{i:06d}"
        if i:
            files[f"{prefix}/train/{name}/zarr.json"] = json.dumps(
                {**document, "attributes": {"unipt_part": part, "unipt_commit": commit}}).encode()
        info = PartInfo("train", name, 3, 6, 3 * i, 3 * i + 3)
        entries[name] = _index.entry_of(info, commit, writer="bench")
    t0 = time.perf_counter()
    put_objects(files)
    upload_s = time.perf_counter() - t0
    return store, {"entries": entries, "upload_s": upload_s}


def put_objects(files: dict[str, bytes]) -> None:
    """Store ``files`` ("bucket/key" -> bytes) on the moto server: straight into its in-process backend (the
    same objects a PUT makes; through HTTP, moto takes ~100 puts/s here, 10^5 parts would take 20 minutes)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    for path, data in files.items():
        bucket, key = path.split("/", 1)
        backend.put_object(bucket, key, data)


def open_seconds(url: str, repeats: int) -> tuple[float, int]:
    """Best time of ``repeats`` opens + parts("train"), and the parts found."""
    import s3fs

    best, found = float("inf"), 0
    for _ in range(repeats):
        s3fs.S3FileSystem.clear_instance_cache()  # a new client, as a new reader process has: no listing cache
        t0 = time.perf_counter()
        found = len(FeatureStore.open(url).parts("train"))
        best = min(best, time.perf_counter() - t0)
    return best, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="100,1000,10000,100000", help="comma-separated part counts")
    parser.add_argument("--list-up-to", type=int, default=1000,
                        help="time the listing fallback only up to this many parts (it reads one object per part)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", metavar="MARKDOWN", help="replace this benchmark's section in that file")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        server = start_s3(scratch)
        try:
            for n in (int(v) for v in args.parts.split(",")):
                url = f"s3://{BUCKET}/parts-{n}.zarr"
                store, made = build(url, n)
                listing = open_seconds(url, 1) if n <= args.list_up_to else (None, None)
                zarr_store, root = store._root.store, store._root.path.strip("/")
                assert _index._publish(zarr_store, root, "train", 1, made["entries"], exclusive=True)
                indexed, found = open_seconds(url, args.repeats)
                assert found == n and (listing[1] in (None, n)), (found, listing)
                base = _index._key(root, "train", "base-00000001.json.zst")
                from zarr.core.buffer import default_buffer_prototype
                from zarr.core.sync import sync

                raw = sync(zarr_store.get(base, default_buffer_prototype())).to_bytes()
                t0 = time.perf_counter()
                _index._decode_base(raw, "train", base)
                decode_s = time.perf_counter() - t0
                rows.append((n, indexed, listing[0], len(raw), decode_s, made["upload_s"]))
                print(rows[-1], flush=True)
        finally:
            server.stop()
    largest, listed_s = max(((n, l) for n, _, l, *_ in rows if l is not None), default=(0, 0.0))
    per_part_ms = 1000 * listed_s / max(largest, 1)
    lines = [
        "## Opening a split: index vs listing",
        "",
        f"Machine: {machine()}. S3: moto's server mode on loopback, in the benchmark's own process (its request "
        "handling shares the CPU and the GIL with the client, so absolute times are pessimistic for requests and "
        "optimistic for bandwidth).",
        "Time = `FeatureStore.open(url)` + `store.parts(\"train\")` for an `s3://` store, best of "
        f"{args.repeats}. One real part is written with `PartWriter`; the other N - 1 are copies of only what "
        "opening reads (each part's `zarr.json` with its commit record, source range moved and `record_sha256` "
        "recomputed; no arrays), stored in bulk into moto's backend; the plan says N parts; the index is one base written as a "
        "compaction writes it (zstd-compressed JSON). Listing = the same store before its index existed (one "
        f"LIST of the split, then each part's metadata), timed once, and not above {args.list_up_to:,} parts (it "
        f"grows linearly: {per_part_ms:.0f} ms per part at {largest:,} parts). Command: "
        "`python benchmarks/bench_index.py --write docs/benchmarks.md`.",
        "",
        "| parts | with the index (s) | listing (s) | index base (bytes) | base decode + check (s) |",
        "|---|---|---|---|---|",
        *(f"| {n:,} | {i:.3f} | {'not run' if l is None else f'{l:.2f}'} | {b:,} | {d:.3f} |"
          for n, i, l, b, d, _ in rows),
    ]
    publish(SECTION, lines, args.write)


if __name__ == "__main__":
    main()
