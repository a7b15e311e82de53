"""Blosc codecs on real stored activations: bytes per value and single-thread encode/decode speed.

    python benchmarks/bench_codecs.py runs/tweets-minilm/features.zarr [--write docs/benchmarks.md]

Takes the float16 values of the first train part (every stored layer), cut into ~2 MiB chunks as the
store does, and compresses them with each candidate codec on one thread (best of 3).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numcodecs
import numpy as np
from numcodecs import Blosc

from unipt.store import FeatureStore

sys.path.insert(0, str(Path(__file__).parent))
from _report import publish  # noqa: E402

SECTION = "codecs"
CANDIDATES = [("lz4", 5, Blosc.SHUFFLE), ("lz4", 5, Blosc.BITSHUFFLE), ("zstd", 3, Blosc.SHUFFLE),
              ("zstd", 3, Blosc.BITSHUFFLE), ("zstd", 5, Blosc.BITSHUFFLE), ("lz4hc", 3, Blosc.SHUFFLE)]


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", help="a float16 feature store (e.g. the demo's)")
    parser.add_argument("--write", metavar="MARKDOWN", help="replace this benchmark's section in that file")
    args = parser.parse_args()

    store = FeatureStore.open(args.store)
    part = store.read_part(store.parts("train")[0])
    # Every layer of one part, cut into the store's own ~2 MiB chunks: what the codec really sees.
    chunks = []
    for layer in store.layers:
        values = part.layers[layer].numpy()
        rows = max(1, (2 << 20) // (values.shape[1] * values.itemsize))
        chunks += [np.ascontiguousarray(values[s : s + rows]) for s in range(0, values.shape[0], rows)]
    n_values = sum(c.size for c in chunks)
    n_bytes = sum(c.nbytes for c in chunks)
    numcodecs.blosc.set_nthreads(1)
    rows = []
    for cname, level, shuffle in CANDIDATES:
        codec = Blosc(cname=cname, clevel=level, shuffle=shuffle)
        encoded = [codec.encode(c) for c in chunks]
        encode_s = best_of(lambda: [codec.encode(c) for c in chunks], 3)
        decode_s = best_of(lambda: [codec.decode(e) for e in encoded], 3)
        rows.append(f"| {cname} level {level}, {'bit' if shuffle == Blosc.BITSHUFFLE else 'byte'} shuffle | "
                    f"{sum(len(e) for e in encoded) / n_values:.3f} | {n_bytes / encode_s / 1e6:.0f} | "
                    f"{n_bytes / decode_s / 1e6:.0f} |")
    publish(SECTION, [
        "## Blosc codecs on real float16 activations",
        "",
        f"Every float16 value of the first train part of a {store.provenance['backbone']['architecture']} store "
        f"({len(store.layers)} layers, {n_bytes / 2**20:.0f} MiB in ~2 MiB chunks as stored), one Blosc thread, "
        "best of 3. Command: "
        "`python benchmarks/bench_codecs.py runs/tweets-minilm/features.zarr --write docs/benchmarks.md`.",
        "",
        "| codec | bytes/value | encode MB/s | decode MB/s |",
        "|---|---|---|---|",
        *rows,
    ], args.write)


if __name__ == "__main__":
    main()
