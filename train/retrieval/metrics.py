"""Retrieval metrics as the field reports them: R@K in both directions over a whole gallery, and rsum.

Query → document: a query is a hit at K when any of its relevant documents ranks in its top K among every
document of the split. Document → query (image → text): a document is a hit when any query relevant to it
(any caption of the image) ranks in its top K among every query; documents no query names are not scored.
A rank counts the items scoring strictly above the best relevant one (ties go the relevant item's way).
"""

from __future__ import annotations

from typing import Sequence

import torch

KS = (1, 5, 10)


def metric_names(ks: Sequence[int] = KS) -> list[str]:
    return [*(f"q2d_r{k}" for k in ks), *(f"d2q_r{k}" for k in ks), "rsum"]


@torch.no_grad()
def retrieval_metrics(queries: torch.Tensor, documents: torch.Tensor, relevant: Sequence[Sequence[int]],
                      ks: Sequence[int] = KS, chunk: int = 4096) -> dict[str, float]:
    """R@K (in percent, as papers report them) both ways and rsum, from (Q, E) query and (D, E) document
    embeddings; ``relevant[i]``: positions in ``documents`` of query i's relevant documents (non-empty).
    Similarities are computed ``chunk`` rows at a time, so a large gallery never needs a Q x D matrix."""
    queries, documents = queries.float(), documents.float()
    if len(relevant) != len(queries):
        raise ValueError(f"{len(queries)} query embeddings but relevance for {len(relevant)} queries")
    if any(not r for r in relevant):
        raise ValueError("every query needs at least one relevant document")
    q_ranks = torch.empty(len(queries), dtype=torch.long)
    # Query -> document: the score of each query's best relevant document, then how many documents beat it.
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ documents.T  # (c, D)
        rows = [r for r in relevant[start : start + chunk]]
        best = torch.stack([scores[i, list(r)].max() for i, r in enumerate(rows)])
        q_ranks[start : start + len(rows)] = (scores > best[:, None]).sum(dim=1)
    # Document -> query: the same, over the queries relevant to each document.
    by_document: list[list[int]] = [[] for _ in range(len(documents))]
    for i, docs in enumerate(relevant):
        for d in docs:
            by_document[d].append(i)
    scored = [d for d, qs in enumerate(by_document) if qs]
    d_ranks = torch.empty(len(scored), dtype=torch.long)
    for start in range(0, len(scored), chunk):
        block = scored[start : start + chunk]
        scores = documents[block] @ queries.T  # (c, Q)
        best = torch.stack([scores[i, by_document[d]].max() for i, d in enumerate(block)])
        d_ranks[start : start + len(block)] = (scores > best[:, None]).sum(dim=1)
    out = {}
    for name, ranks in (("q2d", q_ranks), ("d2q", d_ranks)):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * (ranks < k).float().mean().item() if len(ranks) else float("nan")
    out["rsum"] = sum(out[f"{name}_r{k}"] for name in ("q2d", "d2q") for k in ks)
    return out
