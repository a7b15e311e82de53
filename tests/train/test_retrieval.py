"""Two-tower retrieval from two stores: losses, R@K, the pair index's join, the joined loader, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from retrieval_stores import write_pair_stores
from unipt.store import FeatureStore, PairIndex
from unipt.train import LoaderConfig, TrainConfig
from unipt.train.retrieval import (PairLoader, TwoTower, build_two_tower, evaluate_two_tower, fit_retrieval,
                                   hardest_negative_triplet, info_nce, load_two_tower, retrieval_metrics)
from unipt.train.retrieval.model import FrozenConfig, FrozenMean, ResidualTower

MEMORY = LoaderConfig(mode="memory", background="off")


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


# ----------------------------------------------------------------------------------------------- losses
def test_info_nce_matches_hand_computed_values():
    q = unit([1.0, 0.0], [0.0, 1.0])
    d = unit([1.0, 1.0], [0.0, 1.0])
    s = torch.tensor(2.0)
    # S = q d^T = [[1/√2, 0], [1/√2, 1]]; rows: queries, columns: documents.
    a = 1 / math.sqrt(2)
    by_query = 0.5 * (-math.log(math.exp(2 * a) / (math.exp(2 * a) + math.exp(0)))
                      - math.log(math.exp(2) / (math.exp(2 * a) + math.exp(2))))
    by_document = 0.5 * (-math.log(math.exp(2 * a) / (math.exp(2 * a) + math.exp(2 * a)))
                         - math.log(math.exp(2) / (math.exp(0) + math.exp(2))))
    loss = info_nce(q, d, s, torch.eye(2, dtype=torch.bool))
    assert loss.item() == pytest.approx(0.5 * (by_query + by_document), abs=1e-6)


def test_info_nce_leaves_other_positives_out_of_the_negatives():
    q, d = unit([1.0, 0.2], [0.9, 0.1], [0.0, 1.0]), unit([1.0, 0.0], [1.0, 0.0], [0.1, 1.0])
    positives = torch.eye(3, dtype=torch.bool)
    positives[0, 1] = positives[1, 0] = True  # queries 0 and 1 are two captions of one image (documents 0 and 1)
    s = torch.tensor(5.0)
    logits = s * q @ d.T
    by_query = [-(logits[0, 0] - torch.logsumexp(logits[0, [0, 2]], 0)),
                -(logits[1, 1] - torch.logsumexp(logits[1, [1, 2]], 0)),
                -(logits[2, 2] - torch.logsumexp(logits[2], 0))]
    by_document = [-(logits[0, 0] - torch.logsumexp(logits[[0, 2], 0], 0)),
                   -(logits[1, 1] - torch.logsumexp(logits[[1, 2], 1], 0)),
                   -(logits[2, 2] - torch.logsumexp(logits[:, 2], 0))]
    expected = 0.5 * (torch.stack(by_query).mean() + torch.stack(by_document).mean())
    assert info_nce(q, d, s, positives).item() == pytest.approx(expected.item(), abs=1e-6)
    assert info_nce(q, d, s, torch.eye(3, dtype=torch.bool)).item() > expected.item()  # the duplicate hurt


def test_hardest_negative_triplet_matches_hand_computed_values():
    q = unit([1.0, 0.0], [0.0, 1.0], [1.0, 1.0])
    d = unit([1.0, 0.0], [1.0, 1.0], [0.0, 1.0])
    scores = (q @ d.T).tolist()
    margin, total = 0.2, 0.0
    for i in range(3):
        hardest_d = max(scores[i][j] for j in range(3) if j != i)
        hardest_q = max(scores[j][i] for j in range(3) if j != i)
        total += max(0.0, margin - scores[i][i] + hardest_d) + max(0.0, margin - scores[i][i] + hardest_q)
    loss = hardest_negative_triplet(q, d, torch.eye(3, dtype=torch.bool), margin)
    assert loss.item() == pytest.approx(total, abs=1e-6)
    assert total > 0
    # Masking a positive removes it from the maxima: query 1's hardest document was document 2 (its twin here).
    positives = torch.eye(3, dtype=torch.bool)
    positives[1, 2] = True
    masked = hardest_negative_triplet(q, d, positives, margin)
    assert masked.item() != pytest.approx(total, abs=1e-6)


# ----------------------------------------------------------------------------------------------- R@K
def test_recall_at_k_counts_any_relevant_document_and_any_caption():
    # Four documents along the axes; five queries. Query 0 and 1 are captions of document 0, query 2 of
    # document 1, query 3 of documents 2 and 3 (either counts), query 4 of document 3.
    documents = unit([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1])
    queries = unit([1.0, 0.5, 0, 0],   # ranks doc 0 first: hit@1
                   [0.2, 1.0, 0, 0],   # doc 0 second: hit@5 only
                   [0, 1.0, 0.1, 0],   # doc 1 first
                   [0, 0, 0.1, 1.0],   # doc 3 first, which is relevant: hit@1
                   [0, 0, 1.0, 0.5])   # doc 3 second
    relevant = [[0], [0], [1], [2, 3], [3]]
    m = retrieval_metrics(queries, documents, relevant, ks=(1, 5))
    assert m["q2d_r1"] == pytest.approx(100 * 3 / 5)
    assert m["q2d_r5"] == pytest.approx(100.0)
    # Document -> query: doc 0's best caption is query 0, which doc 0 ranks first among all queries
    # (scores 0.89, 0.20, 0, 0, 0); doc 1: query 2 (0.995) beats query 1 (0.98); doc 2: query 3 (0.0995) vs query 4
    # (0.894), so not first; doc 3: query 3 (0.995) first.
    assert m["d2q_r1"] == pytest.approx(100 * 3 / 4)
    assert m["rsum"] == pytest.approx(m["q2d_r1"] + m["q2d_r5"] + m["d2q_r1"] + m["d2q_r5"])
    chunked = retrieval_metrics(queries, documents, relevant, ks=(1, 5), chunk=2)
    assert chunked == m


# ----------------------------------------------------------------------------------------------- the pair index
def test_pair_index_joins_two_stores_and_round_trips(tmp_path):
    q, d, pairs = write_pair_stores(tmp_path, captions=2)
    index = PairIndex.build(pairs + [("q-absent", "d-absent")], q, d, pairs_source={"path": "pairs.csv"})
    test = index.split("test")
    assert len(test.documents) == 24 and len(test.queries) == 48 and test.num_pairs == 48
    assert all(test.documents[r[0]] == f"d-test-{k // 2}" for k, r in enumerate(test.relevant))
    assert index.pairs_source["pairs_not_stored"] == 1  # neither side stored: outside the extracted subset
    index.save(str(tmp_path / "out" / "pairs.json"))
    again = PairIndex.load(str(tmp_path / "out" / "pairs.json"))
    assert again.to_dict() == index.to_dict()
    again.check_stores(q, d)


def test_pair_index_refuses_a_pair_with_one_side_stored(tmp_path):
    q, d, pairs = write_pair_stores(tmp_path)
    with pytest.raises(ValueError, match=r"1 pair\(s\) join an example of one store with an id the other store "
                                         r"lacks, e\.g\. q-train-0#0 -> d-gone \(only the query is stored\)"):
        PairIndex.build(pairs + [("q-train-0#0", "d-gone")], q, d)
    with pytest.raises(ValueError, match=r"q-new -> d-test-3 \(only the document is stored\)"):
        PairIndex.build(pairs + [("q-new", "d-test-3")], q, d)


def test_pair_index_refuses_pairs_across_splits(tmp_path):
    q, d, pairs = write_pair_stores(tmp_path)
    with pytest.raises(ValueError, match=r"different splits, e\.g\. q-train-0#0 \(train\) -> d-test-0 \(test\)"):
        PairIndex.build(pairs + [("q-train-0#0", "d-test-0")], q, d)


def test_pair_index_refuses_a_store_it_was_not_built_from(tmp_path):
    q, d, pairs = write_pair_stores(tmp_path)
    index = PairIndex.build(pairs, q, d)
    other_q, _, _ = write_pair_stores(tmp_path / "other", widths=(16, 16))
    with pytest.raises(ValueError, match=r"(?s)query store .* is not the one this pair index was built from.*layers: expected \[0, 1, 2\], found \[0, 1\]"):
        index.check_stores(other_q, d)


def test_pair_index_load_names_a_missing_or_foreign_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no pair index at"):
        PairIndex.load(str(tmp_path / "none.json"))
    (tmp_path / "x.json").write_text('{"format": "something"}')
    with pytest.raises(ValueError, match="is not a unipt pair index"):
        PairIndex.load(str(tmp_path / "x.json"))


# ----------------------------------------------------------------------------------------------- the joined loader
class CountingReads:
    """Counts read_part calls per part on a store."""

    def __init__(self, store: FeatureStore):
        self.calls: list[str] = []
        original = store.read_part

        def read_part(part, layers=None):
            self.calls.append(getattr(part, "name", str(part)))
            return original(part, layers=layers)

        store.read_part = read_part


def test_pair_loader_joins_matching_rows_and_marks_every_positive(tmp_path):
    q, d, pairs = write_pair_stores(tmp_path, captions=3)
    index = PairIndex.build(pairs, q, d)
    loader = PairLoader(q, d, index.split("train"), "train", [0, 2], [1], batch_size=32, shuffle=True, seed=3,
                        config=MEMORY)
    seen, shared = [], 0
    for batch in loader:
        doc_of = [i.split("#")[0].replace("q-", "d-") for i in batch.query.example_ids]
        assert batch.document.example_ids == doc_of
        expected = torch.tensor([[a == b for b in doc_of] for a in doc_of])
        assert torch.equal(batch.positives, expected)
        assert len(batch.query.hidden_states) == 2 and len(batch.document.hidden_states) == 1
        # The document rows are the document store's own rows for those ids.
        k = 0
        stored = d.read_part(d.parts("train")[0], layers=[1])
        row = list(stored.example_id).index(doc_of[k])
        start = int(stored.offsets[row])
        n = int(stored.length[row])
        assert torch.equal(batch.document.hidden_states[0][k, :n], stored.layers[1][start : start + n].float())
        seen += batch.query.example_ids
        shared += int(batch.positives.sum()) - len(batch)
    assert sorted(seen) == sorted(index.split("train").queries)
    assert shared > 0  # three captions per image: captions of one image do meet in a batch


def test_pair_loader_reads_each_store_at_most_once_per_epoch(tmp_path):
    q, d, pairs = write_pair_stores(tmp_path, captions=2)
    index = PairIndex.build(pairs, q, d)
    q_reads, d_reads = CountingReads(q), CountingReads(d)
    loader = PairLoader(q, d, index.split("train"), "train", [0, 1, 2], [0, 1], batch_size=16, shuffle=True,
                        config=LoaderConfig(mode="stream", background="off"))
    for epoch in range(2):
        loader.set_epoch(epoch)
        assert sum(len(b) for b in loader) == 192
    assert len(q_reads.calls) == 2 * len(q.parts("train"))  # streamed: once per epoch
    assert len(d_reads.calls) == len(d.parts("train"))  # held in memory: once in all


# ----------------------------------------------------------------------------------------------- models
def test_a_residual_tower_starts_as_the_frozen_embedding():
    torch.manual_seed(0)
    hidden = [torch.randn(3, 5, 8), torch.randn(3, 5, 8)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)

    class Side(torch.nn.Module):
        def forward(self, hs, m):
            return torch.ones(len(m), 8)

    tower = ResidualTower(Side(), 8)
    frozen = FrozenMean(FrozenConfig(), [8])
    assert torch.allclose(tower(hidden, mask), frozen([hidden[-1]], mask))
    tower.gate.data.fill_(0.5)
    assert torch.allclose(tower(hidden, mask), frozen([hidden[-1]], mask) + 0.5)


def test_frozen_towers_need_one_width_or_say_what_to_set(tmp_path):
    q, d, _ = write_pair_stores(tmp_path, widths=(16, 16), doc_widths=(12, 12))
    with pytest.raises(ValueError, match="embeddings differ in width .query 16, document 12."):
        build_two_tower(TrainConfig(method="frozen"), {"query": q, "document": d})
    model, _ = build_two_tower(TrainConfig(method="unipt", task={"embed_dim": 8}), {"query": q, "document": d})
    assert isinstance(model, TwoTower)


# ----------------------------------------------------------------------------------------------- training
def test_two_tower_training_beats_the_frozen_line_and_its_checkpoint_scores_the_same(tmp_path):
    q, d, pairs = write_pair_stores(tmp_path, captions=2, doc_widths=(16, 16))
    index = PairIndex.build(pairs, q, d)
    runs = {"unipt": TrainConfig(method="unipt", epochs=6, lr=3e-3, batch_size=16, task={"embed_dim": 16}),
            "triplet": TrainConfig(method="lst", epochs=6, lr=3e-3, batch_size=16, model={"reduction": 4, "num_heads": 2},
                                   task={"embed_dim": 16, "loss": "triplet"}),
            "frozen": TrainConfig(method="frozen", batch_size=16)}
    results = {r.name: r for r in fit_retrieval(runs, q, d, index, tmp_path / "ck", loader_config=MEMORY,
                                                progress=False)}
    frozen = results["frozen"]
    assert frozen.trainable_params == 0 and frozen.best_epoch == 1 and len(frozen.history) == 1
    for name in ("unipt", "triplet"):
        r = results[name]
        assert r.task == "retrieval" and r.select_metric == "rsum"
        assert r.test_metrics["rsum"] > frozen.test_metrics["rsum"] + 50, (name, r.test_metrics, frozen.test_metrics)
        assert len(r.history) == 6 and r.history[-1]["train_loss"] < r.history[0]["train_loss"]
        again = evaluate_two_tower(r.checkpoint, q, d, index, "test", batch_size=7)
        assert again == pytest.approx(r.test_metrics, abs=1e-9)
    model, config = load_two_tower(results["unipt"].checkpoint)
    assert config["kind"] == "two-tower" and config["towers"]["query"]["method"] == "unipt"
    assert config["epoch"] == results["unipt"].best_epoch and config["test"] == results["unipt"].test_metrics


def test_training_is_reproducible_and_runs_in_one_pass_equal_runs_alone(tmp_path):
    q, d, pairs = write_pair_stores(tmp_path, doc_widths=(16, 16))
    index = PairIndex.build(pairs, q, d)
    a = TrainConfig(method="unipt", epochs=2, lr=2e-3, batch_size=16, task={"embed_dim": 16, "residual": True})
    b = TrainConfig(method="linear_probe", epochs=2, lr=2e-3, batch_size=16, task={"embed_dim": 16})
    together = fit_retrieval({"a": a, "b": b}, q, d, index, tmp_path / "together", loader_config=MEMORY, progress=False)
    alone = fit_retrieval({"a": a}, q, d, index, tmp_path / "alone", loader_config=MEMORY, progress=False)
    assert together[0].test_metrics == alone[0].test_metrics
    assert [h["train_loss"] for h in together[0].history] == [h["train_loss"] for h in alone[0].history]


def test_retrieval_options_are_checked(tmp_path):
    q, d, pairs = write_pair_stores(tmp_path, doc_widths=(16, 16))
    index = PairIndex.build(pairs, q, d)
    with pytest.raises(ValueError, match=r"unknown retrieval option\(s\) \['embed'\] in train.<run>.task; valid: .*embed_dim"):
        fit_retrieval({"x": TrainConfig(task={"embed": 3})}, q, d, index, tmp_path, progress=False)
    with pytest.raises(ValueError, match="task.loss must be one of"):
        fit_retrieval({"x": TrainConfig(task={"loss": "hinge"})}, q, d, index, tmp_path, progress=False)
    with pytest.raises(ValueError, match="select_metric 'accuracy' is not a retrieval metric"):
        fit_retrieval({"x": TrainConfig(select_metric="accuracy")}, q, d, index, tmp_path, progress=False)
    with pytest.raises(ValueError, match="embed_dim must be 16"):
        fit_retrieval({"x": TrainConfig(task={"embed_dim": 8, "residual": True})}, q, d, index, tmp_path,
                      progress=False)
