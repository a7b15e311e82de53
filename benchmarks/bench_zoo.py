"""The method zoo: every memory-efficient method from one store per backbone, and the stochastic-views study.

Three stores, each extracted once (the recipes' caps: 4,000 train / 1,000 validation tweets and the 3,792-tweet
test split; 6,000 / 1,000 / 3,000 Fashion-MNIST images), and every method trained from the same store:

* ``tweets-minilm``: tweet sentiment, all-MiniLM-L6-v2 (6 x 384);
* ``tweets-mpnet``: tweet sentiment, all-mpnet-base-v2 (12 x 768);
* ``fmnist-dinov2``: Fashion-MNIST, the DINOv2-small ViT (12 x 384, 84 px: 37 tokens).

For every (method, seed) a fresh process trains one run from the store, the way a store larger than RAM is
read (the streaming loader in bench_compare's lean setting), and reports test accuracy and macro-F1, trainable
parameters and peak training memory (peak RSS above the process's idle RSS; on a GPU max_memory_allocated).
Runs go ``--jobs`` at a time, each on ``--threads`` torch threads. Seconds per epoch come from a separate
timing pass run alone on the machine (one epoch of seed 0 per method, all cores), so concurrent runs cannot
skew them.

The views study (``--views``, on tweets with MiniLM): one store with ``extract.views = 4`` (view 0 = the
eval-mode cache, views 1-3 with the backbone's dropout on) trains UniPT on its first K = 1, 2, 4 views
(rotated over epochs), against the online references with the backbone in eval mode and in train mode.

    python benchmarks/bench_zoo.py --dataset tweets-minilm --write docs/benchmarks.md
    python benchmarks/bench_zoo.py --dataset tweets-mpnet --write docs/benchmarks.md
    python benchmarks/bench_zoo.py --dataset fmnist-dinov2 --write docs/benchmarks.md
    python benchmarks/bench_zoo.py --views --write docs/benchmarks.md
    python benchmarks/bench_zoo.py --plot docs/zoo-accuracy-vs-memory.svg   # from the saved results
    # --resume keeps finished runs (and stores); --store PATH uses an existing store
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, publish  # noqa: E402
from bench_compare import PART_SIZE, STREAM, peak_rss_bytes, rss_bytes  # noqa: E402

WORKDIR = Path("runs/bench-zoo")

# dataset -> recipe, recipe overrides, side-network epochs, probe epochs, words for the table
DATASETS = {
    "tweets-minilm": dict(recipe="tweets-minilm", overrides=[], epochs=5, probe_epochs=10,
                          title="tweet sentiment, all-MiniLM-L6-v2"),
    "tweets-mpnet": dict(recipe="tweets-minilm", overrides=["backbone.model='convert://all-mpnet-base-v2'"],
                         epochs=3, probe_epochs=10, title="tweet sentiment, all-mpnet-base-v2"),
    "fmnist-dinov2": dict(recipe="fashion-mnist-dinov2", overrides=[], epochs=4, probe_epochs=10,
                          title="Fashion-MNIST, DINOv2-small"),
}

# table name -> (method, model options, lr, "side" | "probe" epochs). Learning rates: UniPT's reference 5e-4;
# the probes 2e-3 (as the demo); Head2Toe 1e-2 (its official recipe uses 0.1 with Adam: the group lasso needs
# large steps to act within a few epochs); the other side networks 1e-3 (LST's own setting in bench_compare).
ZOO = {
    "UniPT r=2": ("unipt", {"reduction": 2}, 5e-4, "side"),
    "linear probe": ("linear_probe", {"layer": -1}, 2e-3, "probe"),
    "scalar-mix probe": ("scalar_mix", {}, 2e-3, "probe"),
    "Head2Toe": ("head2toe", {}, 1e-2, "probe"),
    "LST r=8": ("lst", {"reduction": 8}, 1e-3, "side"),
    "Res-Tuning-Bypass r=8": ("restuning", {"reduction": 8}, 1e-3, "side"),
    "Side4Video r=2": ("side4video", {"reduction": 2}, 1e-3, "side"),
    "SHERL r=2": ("sherl", {"reduction": 2}, 5e-4, "side"),
}
# Per dataset: model options that differ (DINOv2's standard linear probe reads the final LayerNorm's CLS token).
DATASET_OPTIONS = {"fmnist-dinov2": {"linear_probe": {"layer": -1, "pooling": "cls"}}}

VIEWS = 4  # views stored by the study's store
VIEW_RUNS = {f"UniPT r=2, K={k} view{'s' if k > 1 else ''}": k for k in (1, 2, 4)}
ONLINE_RUNS = {"UniPT r=2 online, backbone in eval mode": "online_unipt",
               "UniPT r=2 online, backbone in train mode (dropout on)": "online_unipt_train"}


def train_config(dataset: str, name: str, seed: int, **changes):
    from unipt.train import TrainConfig

    method, model, lr, kind = ZOO[name]
    model = DATASET_OPTIONS.get(dataset, {}).get(method, model)
    spec = DATASETS[dataset]
    batch = 64 if dataset == "fmnist-dinov2" else 32  # the recipes' batch sizes
    fields = dict(method=method, model=dict(model), lr=lr, seed=seed, batch_size=batch,
                  epochs=spec["epochs"] if kind == "side" else spec["probe_epochs"])
    return TrainConfig(**{**fields, **changes})


def measured(fn):
    """Run ``fn()`` and return (its result, peak memory above idle in bytes, what that measure is)."""
    import torch

    cuda = torch.cuda.is_available()
    idle = rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = fn()
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes() - idle
    return result, peak, "cuda max allocated" if cuda else "peak RSS above idle"


def run_one(job: dict) -> dict:
    """One run in this (fresh) process; ``job`` says which. Returns what the tables need."""
    import torch

    from unipt.pipelines import fit_online, load_recipe
    from unipt.store import FeatureStore
    from unipt.train import LoaderConfig, TrainConfig, fit

    torch.set_num_threads(job["threads"])
    out = str(WORKDIR / job["dataset"] / "checkpoints")
    if job["kind"] == "online":
        recipe = load_recipe(DATASETS[job["dataset"]]["recipe"], DATASETS[job["dataset"]]["overrides"])
        config = TrainConfig(method=job["method"], model={"reduction": 2}, lr=5e-4, seed=job["seed"], batch_size=32,
                             epochs=DATASETS[job["dataset"]]["epochs"])
        result, peak, measure = measured(lambda: fit_online(f"{job['method']}-{job['seed']}", recipe.source,
                                                            recipe.backbone, config, progress=False))
        epoch_seconds = result.epoch_seconds
    else:
        config = train_config(job["dataset"], job["name"], job["seed"], **job.get("changes", {}))
        if config.method == "sherl":  # its frozen last block comes from the recipe's backbone folder
            from unipt.extract._resolve import resolve_path

            recipe = load_recipe(DATASETS[job["dataset"]]["recipe"], DATASETS[job["dataset"]]["overrides"])
            config.model["backbone"] = resolve_path(recipe.backbone.model)
        store = FeatureStore.open(job["store"])
        loader = LoaderConfig(mode="stream", **STREAM)
        slug = re.sub(r"[^a-z0-9]+", "-", job["name"].lower()).strip("-")  # one folder per table row and seed
        run = f"{slug}-{job['tag']}-{job['seed']}"
        result, peak, measure = measured(lambda: fit(run, store, config, out, loader_config=loader, progress=False))
        epoch_seconds = [h["epoch_seconds"] for h in result.history]
    test = result.test_metrics or {}
    return {**job, "test_accuracy": test.get("accuracy"), "test_macro_f1": test.get("macro_f1"),
            "trainable_params": result.trainable_params, "peak_memory_bytes": peak, "memory": measure,
            "epoch_seconds": statistics.mean(epoch_seconds), "epochs": len(epoch_seconds)}


def extract(dataset: str, store: Path, changes: list[str] = ()) -> dict:
    from unipt.extract._runner import summary_dict
    from unipt.pipelines import extract_stage, load_recipe

    if store.exists():
        shutil.rmtree(store)
    spec = DATASETS[dataset]
    recipe = load_recipe(spec["recipe"], [*spec["overrides"], f"store='{store}'", f"workdir='{store.parent}'",
                                          f"extract.part_size={PART_SIZE}", *changes])
    return summary_dict(extract_stage(recipe, progress=False))


def store_bytes(path: Path, views: int | None = None) -> int:
    """Bytes on disk of the store at ``path``; with ``views``, of its view-0 arrays plus views 1 .. views-1."""
    total = 0
    for file in path.rglob("*"):
        if not file.is_file():
            continue
        # views 1 .. K-1 of layer l are the arrays layer_<l>_view<k> (docs/store-format.md)
        view = next((int(m.group(1)) for part in file.parts if (m := re.search(r"_view(\d+)$", part))), 0)
        if views is None or view < views:
            total += file.stat().st_size
    return total


def launch(jobs: list[dict], parallel: int, finished=lambda row: None) -> list[dict]:
    """Run ``jobs`` in fresh processes, ``parallel`` at a time; ``finished(row)`` is called as each one ends
    (the callers save there, so an interrupted benchmark can --resume). Returns the rows in job order."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}

    def one(job: dict) -> dict:
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)], capture_output=True, text=True,
                              env={**env, "OMP_NUM_THREADS": str(job["threads"])})
        if done.returncode != 0:
            raise SystemExit(f"{job['name']} seed {job['seed']} failed:\n{done.stderr[-4000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{job['dataset']} {job.get('label', job['name'])} seed {job['seed']}: acc {row['test_accuracy']} "
              f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
        return row

    rows = []
    with ThreadPoolExecutor(parallel) as pool:
        for row in pool.map(one, jobs):
            rows.append(row)
            finished(row)
    return rows


def summarise(results: list[dict], names: list[str], timing: dict[str, float] | None = None) -> list[dict]:
    rows = []
    for name in names:
        runs = [r for r in results if r["name"] == name and r["seed"] >= 0]
        if not runs:
            continue
        acc, f1 = [r["test_accuracy"] for r in runs], [r["test_macro_f1"] for r in runs]
        rows.append({"name": name, "seeds": len(runs), "accuracy": statistics.mean(acc),
                     "accuracy_std": statistics.pstdev(acc), "f1": statistics.mean(f1),
                     "f1_std": statistics.pstdev(f1), "params": runs[0]["trainable_params"],
                     "memory": runs[0]["memory"], "kind": runs[0]["kind"],
                     "memory_mib": statistics.mean(r["peak_memory_bytes"] for r in runs) / 2**20,
                     "epoch_seconds": (timing or {}).get(name, statistics.mean(r["epoch_seconds"] for r in runs)),
                     "epochs": runs[0]["epochs"]})
    return rows


def table(rows: list[dict], extra: dict[str, str] | None = None) -> list[str]:
    head = "| method | test accuracy | test macro-F1 | seeds | trainable params | peak training memory (MiB) | s / epoch | epochs |"
    lines = [head + (" store (MiB) |" if extra else ""), "|---" * (8 + bool(extra)) + "|"]
    for row in rows:
        lines.append(f"| {row['name']} | {row['accuracy']:.4f} ± {row['accuracy_std']:.4f} | {row['f1']:.4f} ± "
                     f"{row['f1_std']:.4f} | {row['seeds']} | {row['params']:,} | {row['memory_mib']:.0f} | "
                     f"{row['epoch_seconds']:.1f} | {row['epochs']} |" + (f" {extra.get(row['name'], '—')} |" if extra else ""))
    return lines


def zoo(args) -> None:
    dataset = args.dataset
    folder = WORKDIR / dataset
    folder.mkdir(parents=True, exist_ok=True)
    saved = folder / "zoo.json"
    state = json.loads(saved.read_text()) if args.resume and saved.exists() else {}
    store = Path(args.store or state.get("store") or folder / "features.zarr")
    if not args.store and not (args.resume and store.exists()):
        state["extraction"] = extract(dataset, store)
    state["store"] = str(store)
    results = state.setdefault("runs", [])
    names = [n for n in args.methods if n in ZOO]
    jobs = [dict(dataset=dataset, name=n, seed=s, kind="cached", store=str(store), tag="zoo", threads=args.threads)
            for n in names for s in range(args.seeds)
            if not any(r["name"] == n and r["seed"] == s for r in results)]

    def save(row=None):
        if row is not None:
            results.append(row)
        saved.write_text(json.dumps(state, indent=2))

    if not args.report_only:
        launch(jobs, args.jobs, save)
    if args.no_timing and not args.report_only:  # the timing pass needs the machine to itself: run it later
        return
    timing = state.setdefault("timing", {})
    for name in names if not args.report_only else ():  # alone on the machine: one epoch of seed 0, every core
        if name not in timing or not args.resume:
            (row,) = launch([dict(dataset=dataset, name=name, seed=-1, kind="cached", store=str(store), tag="timing",
                                  threads=os.cpu_count(),
                                  changes={"epochs": 1, "eval_split": "", "test_split": "", "seed": 0})], 1)
            timing[name] = row["epoch_seconds"]
            save()
    rows = summarise(results, names, timing)
    missing = [n for n in names if not any(r["name"] == n for r in rows)]
    timed = all(n in timing for n in names if n not in missing)
    seconds = ("s / epoch: a separate pass, one epoch of seed 0 per method, alone on the machine with all its cores"
               if timed else "s / epoch: the runs' own epochs, timed while up to four such processes shared the two "
               "cores (no separate timing pass was run for this table), so read it as a rough ranking only")
    spec = DATASETS[dataset]
    extraction = state.get("extraction")
    lines = [f"## Method zoo: {spec['title']}", "",
             f"Machine: {machine()}.",
             f"Every method trains from one store ({store_mib(store):.0f} MiB, float16 + lz4, parts of {PART_SIZE}"
             + (f"; extracted once in {extraction['seconds']:.0f} s" if extraction else "")
             + f"). Mean ± std over the seeds column (up to {args.seeds}); side networks {spec['epochs']} epochs, probes and Head2Toe "
             f"{spec['probe_epochs']}; the best epoch on validation is scored on test. Memory: "
             f"{rows[0]['memory'] if rows else ''} of a fresh process per run, streaming the store (a "
             f"{STREAM['shuffle_buffer']}-example shuffle buffer, {STREAM['prefetch_parts']} part decoded ahead), "
             f"{args.jobs} run(s) at a time on {args.threads} torch thread(s) each. {seconds}. Command: "
             f"`python benchmarks/bench_zoo.py --dataset {dataset} --seeds {args.seeds} --jobs {args.jobs} "
             f"--threads {args.threads} --write docs/benchmarks.md`."
             + (f" Not run on this backbone yet (the command with --resume adds them): {', '.join(missing)}; "
                "the seeds column says how many seeds each row has." if missing else ""), ""]
    publish(f"zoo-{dataset}", lines + table(rows) + head2toe_choices(folder), args.write)


def head2toe_choices(folder: Path) -> list[str]:
    """What Head2Toe's selection kept in each seed's run (its checkpoint records it)."""
    chosen = []
    for config in sorted((folder / "checkpoints").glob("head2toe-zoo-*/config.json")):
        record = json.loads(config.read_text())["head2toe"]
        chosen.append(f"{record['keep_fraction']:g} ({record['kept_features']:,} of {record['features']:,})")
    if not chosen:
        return []
    return ["", "Head2Toe's trainable parameters are its full head during the group-lasso epochs; the fraction of "
            "features it then kept, chosen on validation, per seed: " + ", ".join(chosen) + "."]


def store_mib(path: Path, views: int | None = None) -> float:
    return store_bytes(path, views) / 2**20


def views_study(args) -> None:
    dataset = "tweets-minilm"
    folder = WORKDIR / "views"
    folder.mkdir(parents=True, exist_ok=True)
    saved = folder / "views.json"
    state = json.loads(saved.read_text()) if args.resume and saved.exists() else {}
    store = Path(args.store or state.get("store") or folder / "features.zarr")
    if not args.store and not (args.resume and store.exists()):
        state["extraction"] = extract(dataset, store, [f"extract.views={VIEWS}"])
    state["store"] = str(store)
    results = state.setdefault("runs", [])

    def save(row):
        results.append({**row, "name": row["label"]})
        saved.write_text(json.dumps(state, indent=2))

    jobs = []
    for name, k in VIEW_RUNS.items():
        for s in range(args.seeds):
            if not any(r["name"] == name and r["seed"] == s for r in results):
                jobs.append(dict(dataset=dataset, name="UniPT r=2", seed=s, kind="cached", store=str(store),
                                 tag=f"views{k}", threads=args.threads,
                                 changes={"views": k, "view_schedule": "rotate"}, label=name))
    for name, method in ONLINE_RUNS.items():
        for s in range(args.online_seeds or args.seeds):
            if not any(r["name"] == name and r["seed"] == s for r in results):
                jobs.append(dict(dataset=dataset, name=name, seed=s, kind="online", method=method, threads=args.threads,
                                 label=name))
    if not args.report_only:
        launch(jobs, args.jobs, save)
    rows = summarise(results, [*VIEW_RUNS, *ONLINE_RUNS])
    missing = [n for n in [*VIEW_RUNS, *ONLINE_RUNS] if not any(r["name"] == n for r in rows)]
    sizes = {name: f"{store_mib(store, k):.0f}" for name, k in VIEW_RUNS.items()}
    extraction = state.get("extraction", {})
    lines = ["## Stochastic views: UniPT from K cached views vs the online references (tweets, all-MiniLM-L6-v2)", "",
             f"Machine: {machine()}.",
             f"One store with `extract.views = {VIEWS}` on the train split (view 0 in eval mode, views 1-{VIEWS - 1} "
             "with the backbone's dropout on, seeded per batch of example ids and view); validation and test are "
             "eval-mode only. A K-view run reads the first K views, rotating: epoch e reads view e mod K. The "
             "online references run the backbone in the loop on raw text, in eval mode or with its dropout on "
             f"(the official protocol). {DATASETS[dataset]['epochs']} epochs, lr 5e-4, batch 32, mean ± std over "
             f"the seeds column; memory: peak RSS above idle of a fresh process per run, on {args.threads} torch "
             "thread(s) each; s / epoch is timed in those runs while other runs shared the two cores, so read it "
             "loosely. Store column: the "
             "bytes a K-view store holds (train views 0 .. K-1 plus the evaluation splits)."
             + (f" Extraction of the {VIEWS}-view store: {extraction['seconds']:.0f} s." if extraction else "")
             + f" Command: `python benchmarks/bench_zoo.py --views --seeds {args.seeds} --jobs {args.jobs} "
             f"--threads {args.threads} --write docs/benchmarks.md`."
             + (f" Not run yet (the command with --resume adds them): {', '.join(missing)}." if missing else ""), ""]
    publish("zoo-views", lines + table(rows, sizes), args.write)


def plot(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in DATASETS if (WORKDIR / d / "zoo.json").exists()]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 4.6), squeeze=False)
    colours = dict(zip(ZOO, plt.get_cmap("tab10").colors))
    for ax, dataset in zip(axes[0], datasets):
        state = json.loads((WORKDIR / dataset / "zoo.json").read_text())
        for row in summarise(state["runs"], list(ZOO)):
            ax.errorbar(row["memory_mib"], row["accuracy"] * 100, yerr=row["accuracy_std"] * 100, fmt="o",
                        capsize=3, color=colours[row["name"]], label=row["name"])
            ax.annotate(row["name"], (row["memory_mib"], row["accuracy"] * 100), textcoords="offset points",
                        xytext=(5, 3), fontsize=7)
        ax.set_xscale("log")
        ax.set_title(DATASETS[dataset]["title"], fontsize=10)
        ax.set_xlabel("peak training memory, MiB (log scale)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("test accuracy, % (mean ± std over seeds)")
    fig.suptitle("Every method from one feature store: accuracy vs training memory", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=list(DATASETS))
    parser.add_argument("--views", action="store_true", help="the stochastic-views study (tweets, MiniLM)")
    parser.add_argument("--plot", metavar="SVG", help="write the accuracy-vs-memory plot of the saved zoo results")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--online-seeds", type=int, help="fewer seeds for the online references (default: --seeds)")
    parser.add_argument("--methods", nargs="*", default=list(ZOO), help="a subset of the zoo's method names")
    parser.add_argument("--store", help="an existing store to train from (skips the extraction)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each a fresh process)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--resume", action="store_true", help="keep the runs (and store) a previous call finished")
    parser.add_argument("--report-only", action="store_true",
                        help="write the table from the saved runs (no training, no timing pass)")
    parser.add_argument("--no-timing", action="store_true",
                        help="train and save the runs only; the timing pass and the table come with a later --resume")
    parser.add_argument("--write", metavar="MARKDOWN", help="replace this benchmark's section in that file")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child process: one run, its result as the last line of stdout
        print(json.dumps(run_one(json.loads(args.one))))
        return
    unknown = sorted(set(args.methods) - set(ZOO))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(ZOO)}")
    if args.dataset:
        zoo(args)
    if args.views:
        views_study(args)
    if args.plot:
        plot(args.plot)
    if not (args.dataset or args.views or args.plot):
        parser.error("give --dataset, --views and/or --plot")


if __name__ == "__main__":
    main()
