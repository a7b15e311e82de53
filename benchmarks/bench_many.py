"""Many side networks: a 16-run sweep in one pass versus 16 separate runs, and a search versus a grid.

Two measurements, each side by side in one process, on stores of all-MiniLM-L6-v2 tweet activations:

* ``sweep16``: 16 UniPT runs (a learning-rate sweep, r = 8) trained by ``fit_many`` from one pass over the
  store per epoch -- stacked where ``stack = "auto"`` measures it faster, and in turn (``stack = "off"``) --
  against the same 16 runs trained one after another with ``fit``, each its own passes; wall time of the
  whole thing (loader set-up and reads, steps, evaluation, checkpoints, the test pass), in-memory loader.
  Target: the sweep in one pass takes at most 0.6x the separate runs' time.
* ``search``: a 32-run grid (lr x r x weight decay, every run all epochs) against a 32-trial Optuna TPE search
  with ASHA pruning over the same ranges, both through recipe sections (``train_stage`` / ``search_stage``,
  the code ``unipt train`` runs). Target: the search reaches the grid's best validation accuracy within 0.3
  points in at most half the grid's run-epochs.

    python benchmarks/bench_many.py --sweep-store runs/bench-many/features.zarr \\
        --search-store runs/bench-search/features.zarr --plot docs/sweep-grid.svg --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from unipt.pipelines._recipe import build_recipe
from unipt.pipelines._stages import results_table, train_stage
from unipt.pipelines._sweep_plot import sweep_plot
from unipt.pipelines._tune import search_stage
from unipt.store import FeatureStore
from unipt.train import LoaderConfig, TrainConfig, fit, fit_many

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, publish  # noqa: E402

MEMORY = LoaderConfig(mode="memory")
LRS = [round(1e-4 * (30 ** (i / 15)), 6) for i in range(16)]  # 1e-4 .. 3e-3, log-spaced


def sweep_runs(epochs: int, stack: str) -> dict[str, TrainConfig]:
    return {f"unipt@lr={lr}": TrainConfig(method="unipt", model={"reduction": 8}, lr=lr, epochs=epochs,
                                          batch_size=32, seed=0, stack=stack) for lr in LRS}


def bench_sweep16(store_url: str, epochs: int) -> list[str]:
    store = FeatureStore.open(store_url)
    seconds, chose = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for way in ("auto", "off"):
            t0 = time.perf_counter()
            results = fit_many(sweep_runs(epochs, way), store, f"{tmp}/{way}", loader_config=MEMORY, progress=False)
            seconds[f"one pass, stack {way}"] = time.perf_counter() - t0
            if way == "auto":
                chose = "stacked" if all(r.stacked for r in results) else "in turn"
        t0 = time.perf_counter()
        for name, config in sweep_runs(epochs, "off").items():
            fit(name, store, config, f"{tmp}/separate", loader_config=MEMORY, progress=False)
        separate = time.perf_counter() - t0
    lines = [
        "## Sweeps: 16 side networks in one pass (stacked or in turn) vs 16 separate runs",
        "",
        f"Machine: {machine()}.",
        f"Store: {store_url} ({store.num_examples('train')} training examples, {store.dtype}, layers "
        f"{store.layers}). 16 UniPT runs, r = 8, lr log-spaced 1e-4 .. 3e-3, {epochs} epoch(s), batch size 32, "
        "evaluation every epoch, final test pass, in-memory loader; whole wall time (set-up, reads, steps, "
        "evaluation, checkpoints). Command: `python benchmarks/bench_many.py --sweep-store STORE "
        "--search-store STORE --write docs/benchmarks.md`.",
        "",
        "| how | wall time (s) | / 16 separate runs |",
        "|---|---|---|",
        f"| 16 separate runs (`fit`, one after another) | {separate:.1f} | 1.00 |",
        *(f"| {how}{f' (auto chose: {chose})' if 'auto' in how else ''} | {s:.1f} | {s / separate:.2f} |"
          for how, s in seconds.items()),
        "",
        "Target: one pass at most 0.60 of the separate runs.",
    ]
    return lines


GRID = {"lr": [1e-4, 3e-4, 1e-3, 3e-3], "model.reduction": [2, 4, 8, 16], "weight_decay": [0.0, 0.1]}
SPACE = {"lr": {"low": 1e-4, "high": 3e-3, "log": True}, "model.reduction": [2, 4, 8, 16],
         "weight_decay": [0.0, 0.1]}


def search_recipe(store_url: str, workdir: str, epochs: int, section: dict) -> object:
    return build_recipe({
        "name": "bench-search", "store": store_url, "workdir": workdir, "source": {"path": "unused.csv"},
        "backbone": {"model": f"{workdir}/unused"}, "loader": {"mode": "memory"},
        "train": {"unipt": {"method": "unipt", "epochs": epochs, "batch_size": 32, "data_seed": 0, **section}}})


def bench_search(store_url: str, epochs: int, trials: int, parallel: int, seeds: list[int],
                 plot: str | None = None) -> list[str]:
    store = FeatureStore.open(store_url)
    with tempfile.TemporaryDirectory() as tmp:
        grid = search_recipe(store_url, f"{tmp}/grid", epochs, {"sweep": GRID})
        t0 = time.perf_counter()
        grid_results = train_stage(grid, progress=False)
        grid_seconds = time.perf_counter() - t0
        if plot:  # the grid's validation accuracy against each swept value, as `unipt train` draws it
            sweep_plot(grid_results, plot)
        searches = {}  # sampler seed -> (results, seconds)
        for seed in seeds:
            search = search_recipe(store_url, f"{tmp}/search-{seed}", epochs, {"sweep": SPACE, "search": {
                "sampler": "tpe", "trials": trials, "parallel": parallel, "prune": "asha", "min_epochs": 1,
                "reduction_factor": 3, "seed": seed}})
            t0 = time.perf_counter()
            searches[seed] = (search_stage(search, "unipt", store, progress=False), time.perf_counter() - t0)
    epochs_of = lambda results: sum(len(r.history) for r in results)  # noqa: E731
    best = lambda results: max(results, key=lambda r: r.eval_metrics["accuracy"])  # noqa: E731
    g = best(grid_results)
    lines = [
        f"## Search: {trials}-trial TPE search with ASHA pruning vs a {len(grid_results)}-run grid",
        "",
        f"Machine: {machine()}.",
        f"Store: {store_url} ({store.num_examples('train')} training / {store.num_examples('validation')} validation "
        f"examples). UniPT, {epochs} epochs, batch size 32. Grid: lr {GRID['lr']} x r {GRID['model.reduction']} x "
        f"weight decay {GRID['weight_decay']}. Search: lr log-uniform in [1e-4, 3e-3], r and weight decay from the "
        f"grid's choices, optuna TPE (sampler seeds {seeds}), {parallel} trials per pass, ASHA (min 1 epoch, "
        "reduction factor 3). Both through recipe sections, as `unipt train` runs them. Command: as above.",
        "",
        "| | runs | pruned | run-epochs trained | / grid's | best validation accuracy | vs grid (points) | its config | "
        "test accuracy of the best | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| grid | {len(grid_results)} | 0 | {epochs_of(grid_results)} | 1.00 | {100 * g.eval_metrics['accuracy']:.2f} | "
        f"0 | {_params(g)} | {_test_accuracy(g)} | {grid_seconds:.1f} |",
    ]
    for seed, (results, seconds) in searches.items():
        s = best(results)
        lines.append(
            f"| search, seed {seed} | {len(results)} | {sum(r.pruned_at is not None for r in results)} | "
            f"{epochs_of(results)} | {epochs_of(results) / epochs_of(grid_results):.2f} | "
            f"{100 * s.eval_metrics['accuracy']:.2f} | "
            f"{100 * (s.eval_metrics['accuracy'] - g.eval_metrics['accuracy']):+.2f} | {_params(s)} | "
            f"{_test_accuracy(s)} | {seconds:.1f} |")
    n_val = store.num_examples("validation")
    lines += [
        "",
        f"Target: within 0.3 points of the grid's best validation accuracy in at most half its run-epochs. One "
        f"validation example is {100 / n_val:.2f} points here.",
        "",
        "<details><summary>The first search's ranked table (summary.md)</summary>",
        "",
        results_table(searches[seeds[0]][0], "test"),
        "",
        "</details>",
    ]
    return lines


def _test_accuracy(result) -> str:
    return "-" if not result.test_metrics else f"{100 * result.test_metrics['accuracy']:.2f}"


def _params(result) -> str:
    c = result.config
    return f"lr {c['lr']:.2g}, r {c['model'].get('reduction')}, wd {c['weight_decay']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep-store", help="store for the 16-run sweep (e.g. the demo's tweets store)")
    parser.add_argument("--sweep-epochs", type=int, default=1)
    parser.add_argument("--search-store", help="store for the search vs grid comparison")
    parser.add_argument("--search-epochs", type=int, default=4)
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one search per sampler seed")
    parser.add_argument("--plot", metavar="SVG", help="write the grid's sweep plot there (docs/sweep-grid.svg)")
    parser.add_argument("--write", metavar="MARKDOWN", help="replace these benchmarks' sections in that file")
    args = parser.parse_args()
    if args.sweep_store:
        publish("sweep16", bench_sweep16(args.sweep_store, args.sweep_epochs), args.write)
    if args.search_store:
        publish("search-vs-grid", bench_search(args.search_store, args.search_epochs, args.trials, args.parallel, args.seeds,
                                     args.plot),
                args.write)


if __name__ == "__main__":
    main()
