"""Sweep benchmark: 8 side networks from one pass over the store versus 8 separate runs.

On the demo store (all-MiniLM-L6-v2 activations of tweets, float16), side by side in one process:

* ``fit_many`` with 8 UniPT runs (learning rate x reduction factor) sharing one pass per epoch;
* the same 8 runs with ``fit``, one after another (8 passes per epoch);
* the cost of one read: a pass of the loader alone (decode + shuffle + pad, no model) over the splits a run
  reads per epoch (train and validation) plus the final test pass.

Target: the sweep saves at least 7 reads' worth of time over the separate runs. Both loader modes are
measured: ``stream`` re-reads and decodes the store every epoch (a store bigger than RAM); ``memory`` decodes
it once per loader.

    python benchmarks/bench_sweep.py --store runs/tweets-minilm/features.zarr --repeats 2 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from unipt.store import FeatureStore
from unipt.train import ActivationLoader, LoaderConfig, TrainConfig, fit, fit_many

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, publish  # noqa: E402

SECTION = "sweep"


def runs(epochs: int) -> dict[str, TrainConfig]:
    grid = [(lr, r) for lr in (2e-4, 5e-4) for r in (2, 4, 8, 16)]
    return {f"unipt@lr={lr},r={r}": TrainConfig(method="unipt", model={"reduction": r}, lr=lr, epochs=epochs,
                                               batch_size=32, seed=0) for lr, r in grid}


def read_seconds(store: FeatureStore, loader: LoaderConfig, epochs: int) -> float:
    """One run's reads with no model: train + validation every epoch, then test once."""
    t0 = time.perf_counter()
    for split, passes in (("train", epochs), ("validation", epochs), ("test", 1)):
        train = split == "train"  # evaluation passes as the trainer makes them: in order, sorted by length
        batches = ActivationLoader(store, split, store.layers, batch_size=32, shuffle=train,
                                   length_sorted=not train, config=loader)
        for epoch in range(passes):
            batches.set_epoch(epoch)
            for _ in batches:
                pass
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="a feature store with train/validation/test splits")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure everything this many times, interleaved, and keep each one's fastest")
    parser.add_argument("--write", metavar="MARKDOWN", help="replace this benchmark's section in that file")
    args = parser.parse_args()

    store = FeatureStore.open(args.store)
    times: dict[str, list[tuple[float, float, float]]] = {"stream": [], "memory": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for mode in times:
                loader = LoaderConfig(mode=mode)
                read = read_seconds(store, loader, args.epochs)
                t0 = time.perf_counter()
                fit_many(runs(args.epochs), store, f"{tmp}/{mode}-sweep", loader_config=loader, progress=False)
                sweep = time.perf_counter() - t0
                t0 = time.perf_counter()
                for name, config in runs(args.epochs).items():
                    fit(name, store, config, f"{tmp}/{mode}-separate", loader_config=loader, progress=False)
                separate = time.perf_counter() - t0
                times[mode].append((read, sweep, separate))
                print(f"repeat {repeat + 1} {mode}: read {read:.1f}s sweep {sweep:.1f}s separate {separate:.1f}s",
                      file=sys.stderr)
    rows = {mode: tuple(min(column) for column in zip(*measured)) for mode, measured in times.items()}

    n = store.num_examples("train")
    lines = [
        "## Sweeps: 8 side networks from one pass over the store",
        "",
        f"Machine: {machine()}.",
        f"Store: {args.store} ({n} training examples, {store.dtype}, layers {store.layers}). Eight UniPT runs "
        f"(lr 2e-4 / 5e-4 × r = 2, 4, 8, 16), {args.epochs} epochs, batch size 32, evaluation every epoch and "
        "a final test pass. Command: `python benchmarks/bench_sweep.py --store STORE "
        f"{f'--repeats {args.repeats} ' if args.repeats > 1 else ''}--write docs/benchmarks.md`"
        f"{f' (fastest of {args.repeats} interleaved repeats of each measurement)' if args.repeats > 1 else ''}.",
        "",
        "| loader mode | one run's reads alone (s) | 8 separate runs (s) | one sweep of 8 (s) | saved (s) | "
        "saved / 7 reads |",
        "|---|---|---|---|---|---|",
    ]
    for mode, (read, sweep, separate) in rows.items():
        lines.append(f"| {mode} | {read:.1f} | {separate:.1f} | {sweep:.1f} | {separate - sweep:.1f} | "
                     f"{(separate - sweep) / (7 * read):.2f} |")
    lines += ["", "The target is met where the last column is at least 1.00."]
    publish(SECTION, lines, args.write)


if __name__ == "__main__":
    main()
