"""Two tiny stores of one retrieval dataset, written in code: every pair shares a random concept, which the
query store carries in one basis and the document store in another (learnable, invisible to cosine)."""

from __future__ import annotations

import torch

from unipt.store import FeatureStore

SPLITS = (("train", 96), ("validation", 24), ("test", 24))


def write_pair_stores(root, *, widths=(16, 16, 16), doc_widths=(12, 12), captions: int = 1, seed: int = 0,
                      sizes=SPLITS, concepts: int = 8):
    """(query store, document store, pairs): document ``d-<split>-<k>`` has ``captions`` queries
    ``q-<split>-<k>#<c>``; a pair's tokens are its concept's direction (query basis / document basis) plus noise."""
    g = torch.Generator().manual_seed(seed)
    q_dirs = [torch.randn(concepts, w, generator=g) for w in widths]
    d_dirs = [torch.randn(concepts, w, generator=g) for w in doc_widths]
    stores, pairs = {}, []
    for tower, tower_widths, dirs in (("query", widths, q_dirs), ("document", doc_widths, d_dirs)):
        layers = list(range(len(tower_widths)))
        store = FeatureStore.create(str(root / f"{tower}.zarr"), layers=layers, layer_widths=list(tower_widths),
                                    dtype="float32", label_names=[],
                                    provenance={"backbone": {"weights_sha256": tower, "tokenizer_sha256": tower},
                                                "source": {"fingerprint": f"{tower}-source"}})
        start = 0
        for split, n in sizes:
            ids, lengths, rows = [], [], []
            for k in range(n):
                concept = (k * 5 + len(split)) % concepts
                for c in range(captions if tower == "query" else 1):
                    ids.append(f"q-{split}-{k}#{c}" if tower == "query" else f"d-{split}-{k}")
                    length = 2 + (3 * k + c) % 6
                    lengths.append(length)
                    # Two concepts per example (its own and its index's), so examples are told apart.
                    rows.append({l: torch.randn(length, w, generator=g) * 0.5 + dirs[l][concept]
                                 + 0.8 * dirs[l][k % concepts] for l, w in zip(layers, tower_widths)})
                    if tower == "query":
                        pairs.append((ids[-1], f"d-{split}-{k}"))
            writer = store.part_writer(split, 0, n_examples=len(ids), n_tokens=sum(lengths), source_start=start)
            for row in rows:
                writer.append(row)
            writer.finish(ids, [0] * len(ids), lengths)
            start += len(ids)
        stores[tower] = FeatureStore.open(store.url)
    return stores["query"], stores["document"], pairs
