"""Retrieval benchmark: per retrieval recipe, two-tower UniPT against its baselines from the two stores, and the
online reference with both backbones in the loop.

For each recipe (its real data installed by ``scripts/install_data.sh``): extract both towers once (timed:
the one-time cost every cached run shares), then train each trained section (UniPT, LST, the linear
projection) once per seed, each run alone in its own pass (so its s/epoch and peak memory are its own), and
score its best epoch on the test gallery; the frozen line needs no training. The online reference trains the
recipe's UniPT section with both backbones run on raw inputs at every step (same init, same batches as the
cached run's memory-mode loader), ``--online-seeds`` seeds. Reported: R@1/5/10 both ways and rsum (mean ±
sample std over seeds), trainable parameters, peak memory of the training run above the process's memory when
it started (CPU: sampled RSS; the cached runs' figure includes both splits decoded in memory, the online
one's the backbones' activations), and s/epoch (training steps; evaluation not timed).

    python benchmarks/bench_retrieval.py --write docs/benchmarks.md
    python benchmarks/bench_retrieval.py --recipes openmoji-retrieval --seeds 1 --online-seeds 0   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

from unipt.extract import run_extraction
from unipt.pipelines import load_recipe
from unipt.pipelines._memory import PeakMemory
from unipt.pipelines._retrieval import open_towers, pair_index
from unipt.store import FeatureStore, describe
from unipt.train.retrieval import fit_retrieval, metric_names

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, publish  # noqa: E402

SECTION = "retrieval"
RECIPES = ("bible-retrieval-minilm", "openmoji-retrieval")
ONLINE_SEEDS = {"bible-retrieval-minilm": 3, "openmoji-retrieval": 2}
"""Seeds of the online reference per recipe (its image tower runs DINOv2 on every pair of every epoch: the
slowest row by far on a CPU); --online-seeds sets one number for all."""
METRICS = metric_names()


def extract(recipe) -> list[str]:
    """Both towers extracted (resuming: a store already complete costs ~nothing); a note per tower."""
    notes = []
    for name, tower in recipe.towers.items():
        start = time.perf_counter()
        summary = run_extraction(tower.source, tower.backbone, tower.extract, tower.store, progress=False)
        seconds = time.perf_counter() - start
        info = describe(FeatureStore.open(tower.store))
        examples = sum(row["examples"] for row in info["splits"].values())
        fresh = "" if summary.examples else " (store already complete: time of a check, not an extraction)"
        notes.append(f"{name} tower: {examples:,} examples, {info['bytes'] / 2**20:.0f} MiB, extracted in "
                     f"{seconds:.0f} s ({summary.examples_per_s:.0f} examples/s){fresh}")
    return notes


def cached_rows(recipe, stores, index, seeds: int) -> list[str]:
    rows = []
    for section, config in recipe.train.items():
        trained = config.method != "frozen"
        results, peaks = [], []
        for seed in range(seeds if trained else 1):
            run = dataclasses.replace(config, seed=seed, data_seed=None)
            with PeakMemory("cpu") as peak:
                (result,) = fit_retrieval({f"{section}-seed{seed}": run}, *stores, index,
                                          Path(recipe.workdir) / "bench-checkpoints", loader_config=recipe.loader,
                                          progress=False)
            results.append(result)
            peaks.append(peak.bytes)
            print(f"  {section} seed {seed}: test rsum {result.test_metrics['rsum']:.1f}", flush=True)
        epochs = [h["epoch_seconds"] for r in results for h in r.history] if trained else []
        rows.append(_row(recipe.name, f"{section} ({results[0].method})", [r.test_metrics for r in results],
                         results[0].trainable_params, max(peaks) if trained else None,
                         statistics.fmean(epochs) if epochs else None))
    return rows


def online_rows(recipe, stores, index, seeds: int) -> list[str]:
    from unipt.pipelines._online_retrieval import train_online_retrieval

    if not seeds:
        return []
    section, config = next((s, c) for s, c in recipe.train.items() if c.method == "unipt")
    towers = {name: (tower.source, tower.backbone) for name, tower in recipe.towers.items()}
    results = []
    for seed in range(seeds):
        run = dataclasses.replace(config, seed=seed, data_seed=None, device="cpu")
        result = train_online_retrieval(f"online-{section}-seed{seed}", run, towers, index, query_store=stores[0],
                                        document_store=stores[1], loader_config=recipe.loader, progress=False)
        results.append(result)
        print(f"  online seed {seed}: test rsum {result.test_metrics['rsum']:.1f}", flush=True)
    return [_row(recipe.name, f"online UniPT reference (both backbones in the loop, {seeds} seed"
                              f"{'s' if seeds > 1 else ''})", [r.test_metrics for r in results],
                 results[0].trainable_params, max(r.peak_memory_bytes for r in results),
                 statistics.fmean(s for r in results for s in r.epoch_seconds))]


def _row(recipe: str, run: str, metrics: list[dict], params: int, peak: int | None, per_epoch: float | None) -> str:
    cells = [_mean_std([m[k] for m in metrics]) for k in METRICS]
    return (f"| {recipe} | {run} | {' | '.join(cells)} | {params:,} | "
            f"{'-' if peak is None else f'{peak / 2**20:.0f} MiB'} | {'-' if per_epoch is None else f'{per_epoch:.1f}'} |")


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--online-seeds", type=int, help="online reference seeds for every recipe (default: "
                                                          f"{ONLINE_SEEDS})")
    parser.add_argument("--workdir", default="runs/bench-retrieval")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="passed to every recipe")
    parser.add_argument("--write", metavar="MARKDOWN", help="replace this benchmark's section in that file")
    args = parser.parse_args()
    rows, notes, online_seeds = [], [], {}
    for name in args.recipes:
        recipe = load_recipe(name, [f"workdir='{Path(args.workdir) / name}'", *args.override])
        print(name, flush=True)
        notes += [f"- {name}: " + "; ".join(extract(recipe))]
        stores = open_towers(recipe)
        index = pair_index(recipe, *stores)
        notes[-1] += f"; pairs: {index.describe()}"
        rows += cached_rows(recipe, stores, index, args.seeds)
        online = ONLINE_SEEDS.get(name, 1) if args.online_seeds is None else args.online_seeds
        online_seeds[name] = online
        rows += online_rows(recipe, stores, index, online)
        print("\n".join(rows[-len(recipe.train) - (1 if online else 0):]), flush=True)
    command = " ".join(["python benchmarks/bench_retrieval.py", f"--seeds {args.seeds}",
                        *([f"--online-seeds {args.online_seeds}"] if args.online_seeds is not None else []),
                        *(f"--override {o}" for o in args.override)])
    header = " | ".join(f"test {'q→d' if m.startswith('q2d') else 'd→q'} R@{m.rsplit('r', 1)[1]}" if m != "rsum"
                        else "test rsum" for m in METRICS)
    lines = [
        "## Retrieval",
        "",
        "Two-tower retrieval on real data (`scripts/install_data.sh bible-retrieval openmoji-retrieval`): each tower "
        "extracted once into its own store, every cached run trained from the two stores alone; R@K in percent over "
        f"the whole test gallery, mean ± std over {args.seeds} seeds (cached rows) and "
        f"{', '.join(f'{n} for {r}' for r, n in online_seeds.items())} seeds (online rows). Peak memory: the "
        "training run's, above the process's memory at its start (CPU RSS, sampled); "
        f"s/epoch: training steps only. `{command}`.",
        "",
        f"Machine: {machine()}.",
        "",
        f"| recipe | run (method) | {header} | trainable params | peak train memory | s/epoch |",
        "|---|---|" + "---|" * len(METRICS) + "---|---|---|",
        *rows,
        "",
        "One-time extraction of both towers (shared by every run above):",
        "",
        *notes,
    ]
    publish(SECTION, lines, args.write)


if __name__ == "__main__":
    main()
