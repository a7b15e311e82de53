"""Token tagging: one tag per word (a store's int32 ``token_label`` column, one per stored token).

A word's tag sits on its first sub-word token; its other sub-words, and special tokens, hold the ignore
index (-100) and are neither trained nor scored. Head: one logit per tag on every token; loss:
cross-entropy over the scored tokens of the batch. Metrics over a split: token accuracy (= word accuracy),
and for a BIO tag set (every tag "O" or "B-X" / "I-X") entity-level micro precision, recall and F1 of exact
spans, as conlleval counts them (an I-X that does not continue an X entity starts one). The best epoch is
chosen by entity F1 for BIO tag sets, else by token accuracy.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F

from unipt.store import IGNORE_INDEX

from ._base import Task

_SENTENCE_BREAK = -1  # a target kept between sentences by scored(), so entities never span two of them


class TaggingTask(Task):
    kind = "tagging"
    per_token = True
    report_metrics: ClassVar[tuple[str, ...]] = ("token_accuracy",)

    def __init__(self, names, options=None, state=None):
        super().__init__(names, options, state)
        self.bio = is_bio(self.names)
        if self.bio:  # an instance attribute: entity metrics exist for BIO tag sets only
            self.report_metrics = ("entity_f1", "token_accuracy", "entity_precision", "entity_recall")

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs.flatten(0, -2), targets.flatten().long(), ignore_index=IGNORE_INDEX)

    def loss_weight(self, targets: torch.Tensor) -> int:
        return int((targets != IGNORE_INDEX).sum())

    def scored(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The scored tokens of each sentence in order, with one break row after each sentence."""
        # One extra position per sentence holding the break; masking then keeps it after the sentence's tokens
        # (row-major order), in one gather for the whole batch.
        b, _, k = outputs.shape
        outputs = torch.cat([outputs, outputs.new_zeros((b, 1, k))], dim=1)  # (B, N + 1, K)
        targets = torch.cat([targets.long(), targets.new_full((b, 1), _SENTENCE_BREAK).long()], dim=1)
        keep = targets != IGNORE_INDEX
        return outputs[keep].cpu(), targets[keep].cpu()

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor, *, tune: bool) -> dict[str, float]:
        real = targets >= 0
        predicted = outputs.argmax(-1)
        n = int(real.sum())
        metrics = {"token_accuracy": (predicted[real] == targets[real]).double().sum().item() / max(n, 1)}
        if self.bio:
            gold_tags = [self.names[t] if t >= 0 else None for t in targets.tolist()]
            predicted_tags = [self.names[p] if t >= 0 else None for p, t in zip(predicted.tolist(), targets.tolist())]
            metrics.update(entity_scores(gold_tags, predicted_tags))
        metrics["loss"] = F.cross_entropy(outputs[real].double(), targets[real], reduction="sum").item() / max(n, 1)
        metrics["n"] = n
        return metrics

    def predictions(self, outputs: torch.Tensor, mask: torch.Tensor | None = None) -> list[dict[str, Any]]:
        """``mask``: (B, N) True on each word's first token; one tag per such token, in order."""
        best = outputs.argmax(-1)
        return [{"tags": [self.names[k] for k in best[b][mask[b]].tolist()]} for b in range(len(best))]


def is_bio(names: Sequence[str]) -> bool:
    """A BIO tag set: "O" and tags "B-X" / "I-X" (at least one entity type)."""
    return any(n.startswith("B-") for n in names) and all(n == "O" or n[:2] in ("B-", "I-") for n in names)


def entity_spans(tags: Sequence[str | None]) -> set[tuple[int, int, str]]:
    """Exact entity spans (start, end exclusive, type) of a BIO sequence; None breaks a sentence."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate([*tags, None]):
        continues = tag is not None and tag.startswith("I-") and kind == tag[2:]
        if start is not None and not continues:
            spans.add((start, i, kind))
            start = kind = None
        if tag is not None and (tag.startswith("B-") or (tag.startswith("I-") and not continues)):
            start, kind = i, tag[2:]
    return spans


def entity_scores(gold: Sequence[str | None], predicted: Sequence[str | None]) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 over exact (start, end, type) matches."""
    gold_spans, predicted_spans = entity_spans(gold), entity_spans(predicted)
    hits = len(gold_spans & predicted_spans)
    precision = hits / len(predicted_spans) if predicted_spans else 0.0
    recall = hits / len(gold_spans) if gold_spans else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"entity_f1": f1, "entity_precision": precision, "entity_recall": recall}
