"""Batches of matching (query, document) activations joined from two stores by a pair index.

The query store drives the epoch: its split goes through an ordinary :class:`ActivationLoader` (memory or
stream mode, shuffled, length-bucketed, as any training split), and each query batch is joined with a batch of
its documents gathered from the document split, which is decoded once and held in memory. Neither store is
read twice per epoch: the query split is read once per epoch (or once in all, in memory mode), the document
split once in all. Holding the documents is what a gallery costs anyway at evaluation; its size is logged.

A query relevant to several documents takes one of them per epoch, drawn from the epoch's seed (unshuffled
loaders: the first), and the batch's ``positives`` mark every (query, document) pair of the batch that the
index calls relevant, so the loss never treats a right answer as a negative.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np
import torch

from unipt.store import FeatureStore, SplitPairs, StoreError

from .._loader import ActivationLoader, Batch
from ..config import LoaderConfig

logger = logging.getLogger(__name__)


@dataclass
class PairBatch:
    query: Batch
    document: Batch
    positives: torch.Tensor  # (B, B) bool: document j of the batch is relevant to query i (diagonal True)

    def to(self, device: torch.device | str) -> "PairBatch":
        return PairBatch(self.query.to(device), self.document.to(device), self.positives.to(device))

    def __len__(self) -> int:
        return len(self.query)


class PairLoader:
    """Iterable of :class:`PairBatch` over one split of a pair index."""

    def __init__(self, query_store: FeatureStore, document_store: FeatureStore, pairs: SplitPairs, split: str,
                 query_layers: Sequence[int], document_layers: Sequence[int], *, batch_size: int, shuffle: bool,
                 seed: int = 0, config: LoaderConfig | None = None, pin_memory: bool = False,
                 accelerator: bool = False):
        config = config or LoaderConfig()
        self.split, self.shuffle, self.seed, self.epoch = split, shuffle, seed, 0
        self.queries = ActivationLoader(query_store, split, query_layers, batch_size=batch_size, shuffle=shuffle,
                                        seed=seed, config=config, pin_memory=pin_memory, accelerator=accelerator,
                                        length_sorted=not shuffle)
        self.documents = ActivationLoader(document_store, split, document_layers, batch_size=batch_size,
                                          shuffle=False, config=replace(config, mode="memory"), pin_memory=pin_memory)
        if self.documents.resident_bytes > config.memory_budget_gb * 2**30:
            logger.warning("the document split %r of %s takes %.1f GiB decoded (memory budget %.1f GiB): it is held "
                           "in memory while training; select fewer document layers to shrink it", split,
                           document_store.url, self.documents.resident_bytes / 2**30, config.memory_budget_gb)
        self.relevant = {q: [pairs.documents[d] for d in docs] for q, docs in zip(pairs.queries, pairs.relevant)}
        if not self.relevant:
            raise StoreError(f"split {split!r} of the pair index has no query with a relevant document")
        self.num_examples = len(self.relevant)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.queries.set_epoch(epoch)

    def release(self) -> None:
        self.queries.release()
        self.documents.release()

    def __len__(self) -> int:
        return math.ceil(self.num_examples / self.queries.batch_size)

    def __iter__(self) -> Iterator[PairBatch]:
        rng = np.random.default_rng([self.seed, self.epoch, 1])  # which relevant document each query takes
        for batch in self.queries:
            batch = _with_queries(batch, self.relevant)
            if batch is None:
                continue
            relevant = [self.relevant[q] for q in batch.example_ids]
            documents = [docs[int(rng.integers(len(docs)))] if self.shuffle and len(docs) > 1 else docs[0]
                         for docs in relevant]
            wanted = [set(docs) for docs in relevant]
            positives = torch.tensor([[d in w for d in documents] for w in wanted], dtype=torch.bool)
            yield PairBatch(batch, self.documents.batch_of(documents), positives)


def _with_queries(batch: Batch, relevant: dict[str, list[str]]) -> Batch | None:
    """``batch`` without the examples that are no query of the index (None when none is left)."""
    keep = [i for i, q in enumerate(batch.example_ids) if q in relevant]
    if len(keep) == len(batch):
        return batch
    if not keep:
        return None
    rows = torch.tensor(keep)
    n = int(batch.mask[rows].sum(dim=1).max())
    return Batch([h.index_select(0, rows)[:, :n] if h.dim() == 3 else h.index_select(0, rows)
                  for h in batch.hidden_states], batch.mask[rows][:, :n] if batch.mask.shape[1] > 1 else batch.mask[rows],
                 batch.labels[rows], [batch.example_ids[i] for i in keep])
