"""The comparison table: UniPT and its baselines from one cache, against the online references.

On the demo data (all-MiniLM-L6-v2, tweet sentiment; the demo's caps of 4,000 training and 1,000
validation tweets unless --full), for every method and seed:

* cached (no backbone in memory, from one float16 feature store extracted once): UniPT, linear probe,
  scalar-mix probe, LST;
* online (the backbone in the loop, on raw text): UniPT with the frozen backbone (the official way), LoRA
  (peft) and full fine-tuning.

Each (method, seed) runs in a fresh Python process, so memory is measured the same way for all: peak RSS of
that process above its idle RSS (measured after imports, before any model or data is loaded); on a GPU,
``torch.cuda.max_memory_allocated``. Cached runs use the streaming loader in its lean setting (a 256-example
shuffle buffer and length-sorting window, one part decoded ahead; the store is cut into parts of 256 examples,
each a hash-drawn random sample of the split), the way a store larger than RAM is read: what the loader holds is counted as training
memory, not the size of the whole store. The in-memory loader row holds the whole decoded split. Time
per epoch counts training steps only (evaluation excluded). The one-time extraction is timed separately.

    pip install -e ".[bench]"                               # matplotlib, for --plot
    python benchmarks/bench_compare.py                      # 3 seeds, prints a Markdown section
    python benchmarks/bench_compare.py --write docs/benchmarks.md --plot docs/accuracy-vs-memory.svg
    python benchmarks/bench_compare.py --resume --redo-cached ...   # new store + cached rows, keep online rows
    python benchmarks/bench_compare.py --backbone convert://all-mpnet-base-v2 --online-seeds 1 \
        --methods ... --write docs/benchmarks.md               # the 12-layer backbone, its own section
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, publish  # noqa: E402

SECTION = "compare"
RECIPE = "tweets-minilm"
# name -> (kind, TrainConfig fields). Learning rates: UniPT's reference 5e-4; probes 2e-3 (as the demo);
# LoRA 5e-4 and full fine-tuning 5e-5 (the usual ranges for BERT-sized encoders).
METHODS = {
    "UniPT r=2 (cached)": ("cached", dict(method="unipt", model={"reduction": 2}, lr=5e-4, epochs=5)),
    "UniPT r=2 (cached, in-memory loader)": ("cached", dict(method="unipt", model={"reduction": 2}, lr=5e-4,
                                                            epochs=5)),
    "linear probe (cached)": ("cached", dict(method="linear_probe", model={"layer": -1}, lr=2e-3, epochs=10)),
    "scalar-mix probe (cached)": ("cached", dict(method="scalar_mix", lr=2e-3, epochs=10)),
    "LST r=8 (cached)": ("cached", dict(method="lst", model={"reduction": 8}, lr=1e-3, epochs=5)),
    "UniPT r=2 (online, frozen backbone)": ("online", dict(method="online_unipt", model={"reduction": 2}, lr=5e-4,
                                                           epochs=5)),
    "LoRA r=8 (online)": ("online", dict(method="lora", model={"r": 8, "alpha": 16}, lr=5e-4, epochs=3)),
    "full fine-tuning (online)": ("online", dict(method="full_finetune", lr=5e-5, epochs=3)),
}
FULL_FINETUNE = "full fine-tuning (online)"  # the memory reference


# Cached runs stream the store unless named here: "memory" decodes the split once and shuffles it fully
# (the demo's loader), at the price of keeping the decoded split resident.
LOADER_MODES = {"UniPT r=2 (cached, in-memory loader)": "memory"}
# The streaming loader's lean setting, and the part size of the benchmark's store that it reads.
STREAM = dict(shuffle_buffer=256, prefetch_parts=1, bucket_batches=8)
PART_SIZE = 256


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set of this process since it started (the kernel's high-water mark, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def backbone_name(spec: str | None) -> str:
    return "all-MiniLM-L6-v2" if spec is None else spec.rstrip("/").rsplit("/", 1)[-1]


def run_one(name: str, seed: int, store: str, overrides: list[str], out: str) -> dict:
    """One (method, seed) in this (fresh) process; returns what the table needs."""
    import torch

    from unipt.pipelines import fit_online, load_recipe
    from unipt.pipelines._memory import PeakMemory
    from unipt.store import FeatureStore
    from unipt.train import LoaderConfig, TrainConfig, fit

    recipe = load_recipe(RECIPE, overrides)
    kind, fields = METHODS[name]
    config = TrainConfig(**fields, seed=seed, batch_size=32)
    cuda = torch.cuda.is_available()
    idle = rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with PeakMemory("cuda" if cuda else "cpu") as allocated:  # also samples glibc's allocated bytes on a CPU
        if kind == "cached":
            result = fit(f"{fields['method']}-{seed}", FeatureStore.open(store), config, out,
                         loader_config=LoaderConfig(mode=LOADER_MODES.get(name, "stream"), **STREAM),
                         progress=False)
            epoch_seconds = [h["epoch_seconds"] for h in result.history]
        else:
            result = fit_online(f"{fields['method']}-{seed}", recipe.source, recipe.backbone, config,
                                progress=False)
            epoch_seconds = result.epoch_seconds
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes() - idle
    return {"name": name, "kind": kind, "seed": seed, "test_accuracy": result.test_metrics["accuracy"],
            "test_macro_f1": result.test_metrics["macro_f1"], "trainable_params": result.trainable_params,
            "peak_memory_bytes": peak, "memory": "cuda max allocated" if cuda else "peak RSS above idle",
            "peak_allocated_bytes": allocated.allocated_bytes,
            "epoch_seconds": statistics.mean(epoch_seconds), "epochs": len(epoch_seconds)}


def extract(workdir: Path, overrides: list[str]) -> tuple[str, dict]:
    from unipt.extract._runner import summary_dict
    from unipt.pipelines import extract_stage, load_recipe

    store = workdir / "features.zarr"
    if store.exists():
        shutil.rmtree(store)  # timed from scratch: the one-time cost is part of the comparison
    recipe = load_recipe(RECIPE, [*overrides, f"store='{store}'", f"extract.part_size={PART_SIZE}"])
    return str(store), summary_dict(extract_stage(recipe, progress=False))


def plot(rows: list[dict], path: str, backbone: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for row in rows:
        marker = "o" if row["kind"] == "cached" else "s"
        ax.errorbar(row["memory_mib"], row["accuracy"] * 100, yerr=row["accuracy_std"] * 100, fmt=marker,
                    capsize=3, color="tab:blue" if row["kind"] == "cached" else "tab:red")
        ax.annotate(row["name"], (row["memory_mib"], row["accuracy"] * 100), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"peak training memory, MiB ({rows[0]['memory']}; log scale)")
    ax.set_ylabel("test accuracy, % (mean ± std over seeds)")
    ax.set_title(f"Tweet sentiment, {backbone}: accuracy vs training memory\n"
                 "circles: from the feature store; squares: backbone in the loop", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="every tweet (lifts the demo's caps)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), help="a subset of the method names")
    parser.add_argument("--workdir", default="runs/bench-compare")
    parser.add_argument("--write", metavar="MARKDOWN", help="replace this benchmark's section in that file")
    parser.add_argument("--plot", metavar="SVG", help="write the accuracy-vs-memory plot there")
    parser.add_argument("--backbone", help="another backbone than the recipe's MiniLM (its own workdir and section)")
    parser.add_argument("--online-seeds", type=int, help="fewer seeds for the online methods (default: --seeds)")
    parser.add_argument("--resume", action="store_true", help="keep the runs (and store) a previous call finished")
    parser.add_argument("--redo-cached", action="store_true",
                        help="with --resume: extract the store again and redo the cached runs, keeping the online "
                             "runs (they never read the store)")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "SEED", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    name = backbone_name(args.backbone)
    section = SECTION if args.backbone is None else f"{SECTION}-{name}"
    workdir = Path(args.workdir if args.backbone is None or args.workdir != "runs/bench-compare"
                   else f"runs/bench-compare-{name}")
    overrides = [f"workdir='{workdir}'", "backbone.device=auto"] + (["source.max_examples={}"] if args.full else [])
    if args.backbone:
        overrides.append(f"backbone.model='{args.backbone}'")

    if args.one:  # a child process: one run, its result as the last line of stdout
        method, seed, store = args.one
        print(json.dumps(run_one(method, int(seed), store, overrides, str(workdir / "checkpoints"))))
        return

    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    workdir.mkdir(parents=True, exist_ok=True)
    saved = workdir / "compare.json"  # every finished run, so an interrupted benchmark can --resume
    previous = json.loads(saved.read_text()) if args.resume and saved.exists() else None
    if previous is not None and previous.get("full") == args.full and args.redo_cached:
        store, extraction = extract(workdir, overrides)
        results = [r for r in previous["runs"] if r["kind"] == "online"]
    elif previous is not None and previous.get("full") == args.full:
        store, extraction, results = str(workdir / "features.zarr"), previous["extraction"], previous["runs"]
    else:
        store, extraction = extract(workdir, overrides)
        results = []
    print(f"extraction: {extraction['seconds']:.1f}s", file=sys.stderr)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    for method in args.methods:
        for seed in range(args.seeds):
            if any(r["name"] == method and r["seed"] == seed for r in results):
                continue
            t0 = time.perf_counter()
            if METHODS[method][0] == "online" and seed >= (args.online_seeds or args.seeds):
                continue
            done = subprocess.run([sys.executable, __file__, "--one", method, str(seed), store,
                                   "--workdir", str(workdir), *(["--full"] if args.full else []),
                                   *(["--backbone", args.backbone] if args.backbone else [])],
                                  capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise SystemExit(f"{method} seed {seed} failed:\n{done.stderr[-4000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            saved.write_text(json.dumps({"full": args.full, "extraction": extraction, "runs": results}, indent=2))
            print(f"{method} seed {seed}: acc {results[-1]['test_accuracy']:.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr)

    rows = []
    for method in args.methods:
        runs = [r for r in results if r["name"] == method]
        acc, f1 = [r["test_accuracy"] for r in runs], [r["test_macro_f1"] for r in runs]
        rows.append({"name": method, "seeds": len(runs), "kind": runs[0]["kind"], "accuracy": statistics.mean(acc),
                     "accuracy_std": statistics.pstdev(acc), "f1": statistics.mean(f1), "f1_std": statistics.pstdev(f1),
                     "params": runs[0]["trainable_params"], "memory": runs[0]["memory"],
                     "memory_mib": statistics.mean(r["peak_memory_bytes"] for r in runs) / 2**20,
                     "allocated_mib": (statistics.mean(r["peak_allocated_bytes"] for r in runs) / 2**20
                                       if all(r.get("peak_allocated_bytes") is not None for r in runs) else None),
                     "epoch_seconds": statistics.mean(r["epoch_seconds"] for r in runs), "epochs": runs[0]["epochs"]})
    n = extraction["examples"]
    data = "every tweet" if args.full else "the demo's caps (4,000 train / 1,000 validation tweets)"
    command = " ".join(["python benchmarks/bench_compare.py", f"--seeds {args.seeds}", *(["--full"] if args.full else []),
                        *([f"--backbone {args.backbone}"] if args.backbone else []),
                        *([f"--online-seeds {args.online_seeds}"] if args.online_seeds else []),
                        *(["--methods " + " ".join(repr(m) for m in args.methods)] if args.methods != list(METHODS) else []),
                        "--write docs/benchmarks.md", *([f"--plot {args.plot}"] if args.plot else [])])
    lines = [
        f"## Comparison ({name}): UniPT from the cache vs baselines and online references",
        "",
        f"Machine: {machine()}.",
        f"Data: tweet sentiment with {data}; {name}; test split {n.get('test', 0)} tweets; "
        f"mean ± std over the seeds in the table's seeds column; batch size 32. Command: `{command}`. Memory: {rows[0]['memory']} of a fresh process per run (cached runs "
        f"stream the store, cut into parts of {PART_SIZE} hash-drawn examples, with a "
        f"{STREAM['shuffle_buffer']}-example shuffle buffer and {STREAM['prefetch_parts']} part decoded ahead, "
        "except the in-memory loader row, which holds the decoded split and shuffles it fully). Time per epoch: "
        "training steps only.",
        "",
        f"One-time extraction (backbone forward over {sum(n.values())} tweets, float16 + lz4 store): "
        f"{extraction['seconds']:.1f} s ({extraction['examples_per_s']:.0f} examples/s).",
        "",
        "| method | test accuracy | test macro-F1 | seeds | trainable params | peak training memory (MiB) "
        "| peak allocated (MiB) | s / epoch | epochs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    full = next((row for row in rows if row["name"] == FULL_FINETUNE), None)

    def mib(value: float | None, reference: float | None) -> str:
        if value is None:
            return "—"
        return f"{value:.0f}" + (f" ({value / reference:.2f}×)" if reference else "")

    for row in rows:
        lines.append(f"| {row['name']} | {row['accuracy']:.4f} ± {row['accuracy_std']:.4f} | {row['f1']:.4f} ± "
                     f"{row['f1_std']:.4f} | {row['seeds']} | {row['params']:,} | "
                     f"{mib(row['memory_mib'], full and full['memory_mib'])} | "
                     f"{mib(row['allocated_mib'], full and full['allocated_mib'])} | "
                     f"{row['epoch_seconds']:.1f} | {row['epochs']} |")
    if full is not None:
        lines += ["", "(×: the fraction of full fine-tuning's memory by the same measure.) Peak allocated: the most "
                  "bytes the run had allocated at once (glibc's mallinfo2, sampled every 5 ms; on a GPU, "
                  "max_memory_allocated), not counting what the allocator keeps after frees, which RSS does."]
    if args.plot:
        plot(rows, args.plot, name)
        lines += ["", f"![accuracy versus training memory]({Path(args.plot).name})"]
    publish(section, lines, args.write)


if __name__ == "__main__":
    main()
