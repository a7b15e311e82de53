"""Blosc codecs on real stored activations: bytes per value and single-thread encode/decode speed.

    python benchmarks/bench_codecs.py runs/tweets-minilm/features.zarr [--write docs/benchmarks.md]

Takes the float16 values of the first train part (every stored layer), and compresses one 8 MiB slice of
them with each candidate codec on one thread (best of 5).
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
from _report import section, write_section  # noqa: E402

SECTION = "codecs"
CANDIDATES = [("lz4", 5, Blosc.SHUFFLE), ("zstd", 1, Blosc.SHUFFLE), ("zstd", 3, Blosc.SHUFFLE),
              ("zstd", 1, Blosc.BITSHUFFLE), ("lz4hc", 3, Blosc.SHUFFLE)]


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
    values = np.concatenate([part.layers[l].numpy() for l in store.layers])
    sample = np.ascontiguousarray(values.reshape(-1)[: (8 << 20) // values.itemsize])
    numcodecs.blosc.set_nthreads(1)
    rows = []
    for cname, level, shuffle in CANDIDATES:
        codec = Blosc(cname=cname, clevel=level, shuffle=shuffle)
        encoded = codec.encode(sample)
        encode_s = best_of(lambda: codec.encode(sample))
        decode_s = best_of(lambda: codec.decode(encoded))
        rows.append(f"| {cname} level {level}, {'bit' if shuffle == Blosc.BITSHUFFLE else 'byte'} shuffle | "
                    f"{len(encoded) / sample.size:.3f} | {sample.nbytes / encode_s / 1e6:.0f} | "
                    f"{sample.nbytes / decode_s / 1e6:.0f} |")
    text = section(SECTION, [
        "## Blosc codecs on real float16 activations",
        "",
        f"8 MiB of float16 values from the first train part of a {store.provenance['backbone']['architecture']} "
        f"store ({len(store.layers)} layers), one Blosc thread, best of 5. Command: "
        "`python benchmarks/bench_codecs.py runs/tweets-minilm/features.zarr --write docs/benchmarks.md`.",
        "",
        "| codec | bytes/value | encode MB/s | decode MB/s |",
        "|---|---|---|---|",
        *rows,
    ])
    print(text)
    if args.write:
        write_section(args.write, SECTION, text)


if __name__ == "__main__":
    main()
