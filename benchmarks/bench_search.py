"""Nearest-neighbour search for `unipt search`: exact top-k by matrix product vs faiss, on random unit vectors.

    python benchmarks/bench_search.py --write docs/benchmarks.md

For each gallery size (E = 256, float32, unit norm) it measures
  - exact: ``torch.topk`` over the full matrix product, as ``unipt search --engine exact`` runs it
    (unipt.pipelines._search.exact_search, chunked over queries);
  - faiss IndexFlatIP (exact, faiss's own BLAS + heap);
  - faiss IndexHNSWFlat (approximate) at a few efSearch values: build time, query time, recall against exact.

Query time: a batch of 1 (median over single queries) and a batch of 100 (best of 3). Two kinds of query,
both of unit norm: "random" (independent of the gallery: in 256 dimensions every gallery row is about
equally far, the hardest case for a graph index) and "planted" (a gallery row plus noise of the same norm,
cosine ~0.71 to it: a query whose true match is in the gallery, as in retrieval). Recall@10 = share of the
exact top 10 found; planted R@1 = share of queries whose own row comes first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from unipt.pipelines._search import HnswOptions, build_hnsw, exact_search, faiss_flat, faiss_search, import_faiss

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, publish  # noqa: E402

SECTION = "search"


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def timed(fn, queries: torch.Tensor, singles: int, repeats: int = 3) -> tuple[float, float, tuple]:
    """(ms per single query: median over ``singles`` queries, ms per batch of all queries: best of ``repeats``,
    the batch's result)."""
    fn(queries[:1])  # warm-up: thread pools, first allocations
    one = []
    for i in range(singles):
        t0 = time.perf_counter()
        fn(queries[i : i + 1])
        one.append(time.perf_counter() - t0)
    batch, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(queries)
        batch.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(one), 1e3 * min(batch), out


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / truth.shape[1] for a, b in zip(found, truth)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=100, help="the batch's size (and the recall sample)")
    parser.add_argument("--singles", type=int, default=20, help="single queries timed one by one")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--m", type=int, default=HnswOptions.m, help="HNSW links per node")
    parser.add_argument("--ef-construction", type=int, default=HnswOptions.ef_construction)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--write", metavar="MARKDOWN", help="replace this benchmark's section in that file")
    args = parser.parse_args()
    faiss = import_faiss()
    faiss.omp_set_num_threads(torch.get_num_threads())  # both libraries on the same cores
    load = os.getloadavg()[0]

    rows = []
    rng = np.random.default_rng(0)
    for n in args.sizes:
        gallery = torch.from_numpy(unit(rng.standard_normal((n, args.dim), dtype=np.float32)))
        planted_rows = rng.choice(n, args.queries, replace=False)
        queries = {"random": torch.from_numpy(unit(rng.standard_normal((args.queries, args.dim), dtype=np.float32))),
                   "planted": torch.from_numpy(unit(gallery[planted_rows].numpy()
                                                    + unit(rng.standard_normal((args.queries, args.dim),
                                                                               dtype=np.float32))))}
        truth = {kind: exact_search(gallery, q, args.k)[1] for kind, q in queries.items()}

        def row(engine: str, build_s: float, fn) -> None:
            single_ms, batch_ms, (_, found) = timed(fn, queries["random"], args.singles)
            _, planted = fn(queries["planted"])
            rows.append((n, engine, build_s, single_ms, batch_ms, recall(found, truth["random"]),
                         recall(planted, truth["planted"]),
                         float(np.mean(planted[:, 0].numpy() == planted_rows))))
            print(rows[-1], flush=True)

        row("exact (torch matmul + topk)", 0.0, lambda q: exact_search(gallery, q, args.k))
        t0 = time.perf_counter()
        flat = faiss_flat(gallery)
        row("faiss IndexFlatIP", time.perf_counter() - t0, lambda q: faiss_search(flat, q, args.k))
        del flat
        t0 = time.perf_counter()
        hnsw = build_hnsw(gallery, HnswOptions(m=args.m, ef_construction=args.ef_construction))
        build_s = time.perf_counter() - t0
        for ef in args.ef_search:
            row(f"faiss HNSW M={args.m}, efSearch={ef}", build_s, lambda q, ef=ef: faiss_search(hnsw, q, args.k, ef))
        del hnsw, gallery

    command = "python benchmarks/bench_search.py" + (
        "" if args.sizes == [10_000, 100_000, 1_000_000] else " --sizes " + " ".join(map(str, args.sizes))) + (
        " --write docs/benchmarks.md" if args.write else "")
    lines = [
        "## Search: exact top-k vs faiss (flat, HNSW) for `unipt search`",
        "",
        f"Machine: {machine()}; faiss {faiss.__version__} on {faiss.omp_get_max_threads()} threads; 1-minute load "
        f"average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end (the machine is shared with other "
        "work: compare rows of one run).",
        f"Data: random unit vectors, E = {args.dim}, float32. Queries: {args.queries} \"random\" unit vectors (times and "
        "recall@10 vs exact) and as many \"planted\" ones (a gallery row plus noise of equal norm, cosine ~0.71 "
        f"to it: planted recall@10 and R@1 = own row first). k = {args.k}. Batch 1: median ms of "
        f"{args.singles} single queries; batch {args.queries}: best of 3. HNSW built with M = {args.m}, "
        f"efConstruction = {args.ef_construction} (faiss's default) on the same threads. Command: `{command}`.",
        "",
        f"| gallery | engine | build (s) | batch 1 (ms) | batch {args.queries} (ms) | recall@10 random | "
        "recall@10 planted | planted R@1 |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {n:,} | {engine} | {build:.1f} | {single:.2f} | {batch:.1f} | {r:.3f} | {p:.3f} | {r1:.2f} |"
          for n, engine, build, single, batch, r, p, r1 in rows),
    ]
    publish(SECTION, lines, args.write)


if __name__ == "__main__":
    main()
