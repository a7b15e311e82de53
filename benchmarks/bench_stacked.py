"""Stacked training benchmark: K UniPT runs of one shape stepped as one batched model versus in turn.

For r = 8 and r = 2 (the mapped width m = E // r), K runs differing in learning rate and seed train from one
pass over the store, each way (``TrainConfig.stack``): "off" steps them in turn, "on" stacks them, "auto"
measures the first batches and keeps the faster way. The throughput is run-steps per second of the training
pass alone (``RunResult.train_seconds``: no evaluation, no checkpoints), over ``--steps`` steps per run; each
way is measured ``--repeats`` times, interleaved, keeping its fastest.

    python benchmarks/bench_stacked.py --store runs/tweets-minilm/features.zarr --runs 16 --steps 60
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from unipt.store import FeatureStore
from unipt.train import LoaderConfig, TrainConfig, fit_many

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, publish  # noqa: E402

SECTION = "stacked"
WAYS = ("off", "on", "auto")


def runs(k: int, reduction: int, stack: str, steps: int, batch_size: int, device: str) -> dict[str, TrainConfig]:
    return {f"unipt@r={reduction},run={i}": TrainConfig(
        method="unipt", model={"reduction": reduction}, lr=1e-4 * (1 + i), seed=i, data_seed=0, epochs=1,
        max_steps=steps, batch_size=batch_size, eval_split="", test_split="", stack=stack, device=device)
        for i in range(k)}


def measure(store: FeatureStore, k: int, reduction: int, stack: str, args, out: str) -> tuple[float, bool]:
    """(run-steps per second of the training pass, whether the runs trained stacked)."""
    results = fit_many(runs(k, reduction, stack, args.steps, args.batch_size, args.device), store, out,
                       loader_config=LoaderConfig(mode=args.loader), progress=False)
    seconds = max(r.train_seconds for r in results)
    steps = sum(r.history[-1]["step"] for r in results)
    return steps / seconds, all(r.stacked for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="a feature store with a train split")
    parser.add_argument("--runs", type=int, default=16, help="K: runs per stack")
    parser.add_argument("--reductions", type=int, nargs="+", default=[8, 2])
    parser.add_argument("--steps", type=int, default=60,
                        help="optimiser steps per run (auto decides after 14 batches: leave it well above)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--loader", default="memory", choices=["memory", "stream", "auto"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--write", metavar="MARKDOWN", help="replace this benchmark's section in that file")
    args = parser.parse_args()

    store = FeatureStore.open(args.store)
    best: dict[tuple[int, str], float] = {}
    stacked: dict[int, bool] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for r in args.reductions:
                for way in WAYS:
                    rate, was_stacked = measure(store, args.runs, r, way, args, f"{tmp}/{r}-{way}-{repeat}")
                    best[r, way] = max(best.get((r, way), 0.0), rate)
                    if way == "auto":
                        stacked[r] = was_stacked
                    print(f"repeat {repeat + 1} r={r} stack={way}: {rate:.1f} run-steps/s", file=sys.stderr)

    lines = [
        f"## Stacked training: {args.runs} UniPT runs of one shape as one batched model",
        "",
        f"Machine: {machine()}.",
        f"Store: {args.store} ({store.num_examples('train')} training examples, {store.dtype}, layers "
        f"{store.layers}). {args.runs} runs (lr and seed differ), {args.steps} steps each, batch size "
        f"{args.batch_size}, device {args.device}, loader {args.loader}; run-steps per second of the training pass "
        f"(fastest of {args.repeats}). Command: `python benchmarks/bench_stacked.py --store STORE --runs "
        f"{args.runs} --steps {args.steps}`.",
        "",
        "| r | in turn (run-steps/s) | stacked (run-steps/s) | stacked / in turn | auto (run-steps/s) | auto chose |",
        "|---|---|---|---|---|---|",
    ]
    for r in args.reductions:
        off, on, auto = (best[r, way] for way in WAYS)
        lines.append(f"| {r} | {off:.1f} | {on:.1f} | {on / off:.2f} | {auto:.1f} | "
                     f"{'stacked' if stacked[r] else 'in turn'} |")
    publish(SECTION, lines, args.write)


if __name__ == "__main__":
    main()
