"""Tasks benchmark: per task recipe, UniPT against its baselines from one store, on the task's own metrics.

For each recipe (its real data installed by ``scripts/install_data.sh``): extract the store once (the
recipe's backbone, caps as given), then train every run section of the recipe with three seeds (one pass
over the store per section: the seeds share batch order, ``data_seed = 0``, and vary initialisation and
dropout), and score the test split with each run's best epoch. Reported per section: the task's test
metrics as mean ± sample std over the seeds, trainable parameters, and seconds per epoch of the section's
pass (its three seeds trained together; one seed alone takes about a third of the side-network compute).
For the sentence-pair recipe, the online UniPT reference (the backbone run in the loop on raw pairs, every
step; one seed) is trained on the same splits for comparison.

    python benchmarks/bench_tasks.py --write docs/benchmarks.md
    python benchmarks/bench_tasks.py --recipes vader-valence-minilm --seeds 1     # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

from unipt.pipelines import load_recipe
from unipt.pipelines._stages import extract_stage, train_stage
from unipt.store import FeatureStore

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, publish  # noqa: E402

SECTION = "tasks"
RECIPES = ("brown-pos-minilm", "bible-paraphrase-minilm", "vader-valence-minilm", "openmoji-dinov2")
ONLINE_FOR = "bible-paraphrase-minilm"  # a classification recipe: the online reference trains classifiers


def run_recipe(name: str, workdir: Path, seeds: int, caps: list[str]) -> tuple[list[str], float]:
    """Extract and train one recipe; its table rows and the extraction time."""
    overrides = [f"workdir='{workdir / name}'", *caps]
    sections = list(load_recipe(name, overrides).sections)
    for section in sections:
        overrides += [f"train.{section}.sweep={{seed={list(range(seeds))}}}", f"train.{section}.data_seed=0"]
    recipe = load_recipe(name, overrides)
    t0 = time.perf_counter()
    extract_stage(recipe, progress=False)
    extract_seconds = time.perf_counter() - t0
    store = FeatureStore.open(recipe.store)
    counts = ", ".join(f"{s} {store.num_examples(s)}" for s in ("train", "validation", "test"))
    rows = []
    for section in sections:
        results = train_stage(recipe, [section], progress=False)
        first = results[0]
        metrics = [m for m in first.test_metrics if m not in ("loss", "n", "threshold")]
        cells = [f"{m} {_mean_std([r.test_metrics[m] for r in results])}" for m in metrics]
        epochs = len(first.history)
        rows.append(f"| {name} | {store.task} | {section} ({first.method}) | {'; '.join(cells)} | "
                    f"{first.trainable_params:,} | {first.train_seconds / epochs:.1f} |")
    rows.append(f"| {name} | | *store: {counts}; extraction {extract_seconds:.0f} s* | | | |")
    print("\n".join(rows), flush=True)  # before the online reference, which takes longest
    if name == ONLINE_FOR:
        rows.append(online_row(recipe))
    return rows, extract_seconds


def online_row(recipe) -> str:
    """The online UniPT reference on the recipe's splits: the backbone in the loop, one seed."""
    from unipt.pipelines._online import fit_online
    from unipt.train import TrainConfig

    config = next(c for c in recipe.train.values() if c.method == "unipt")
    # the cached run's settings, as the online method (the same UniPT side network, fed live)
    config = dataclasses.replace(config, method="online_unipt", seed=0, data_seed=None, device="cpu")
    result = fit_online("online-unipt", recipe.source, recipe.backbone, config, progress=False)
    metrics = {m: v for m, v in result.test_metrics.items() if m not in ("loss", "n")}
    per_epoch = statistics.fmean(result.epoch_seconds)
    return (f"| {recipe.name} | classification | online UniPT reference (backbone in the loop, 1 seed) | "
            f"{'; '.join(f'{m} {v:.4f}' for m, v in metrics.items())} | {result.trainable_params:,} | "
            f"{per_epoch:.1f} |")


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {std:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workdir", default="runs/bench-tasks")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to every recipe (e.g. source.max_examples={train=2000})")
    parser.add_argument("--write", metavar="MARKDOWN", help="replace this benchmark's section in that file")
    args = parser.parse_args()
    rows = []
    for name in args.recipes:
        recipe_rows, _ = run_recipe(name, Path(args.workdir), args.seeds, args.override)
        rows += recipe_rows
        print(recipe_rows[-1], flush=True)
    command = " ".join(["python benchmarks/bench_tasks.py", *(f"--override {o}" for o in args.override)])
    lines = [
        "## Tasks",
        "",
        f"Every task recipe on its real data (`scripts/install_data.sh all`), UniPT and the baselines trained from "
        f"one store per recipe; test metrics as mean ± std over {args.seeds} seeds (shared batch order, seeds vary "
        f"init and dropout); s/epoch is the pass that trains a section's {args.seeds} seeds together. `{command}`.",
        "",
        f"Machine: {machine()}.",
        "",
        "| recipe | task | run (method) | test metrics | trainable params | s/epoch |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    publish(SECTION, lines, args.write)


if __name__ == "__main__":
    main()
