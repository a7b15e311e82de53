"""Each task's loss and metrics against hand-computed examples; heads; which methods serve which task."""

from __future__ import annotations

import math

import re

import pytest
import torch

from unipt.store import IGNORE_INDEX
from unipt.train import METHODS, HeadSpec, LinearProbe, LinearProbeConfig, UniPTClassifier, UniPTConfig, task_for
from unipt.train.tasks import entity_scores, entity_spans, f1_scores, mean_average_precision, spearman


# --------------------------------------------------------------------------- classification
def test_classification_loss_and_metrics_by_hand():
    task = task_for("classification", ["a", "b"])
    outputs = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]])
    targets = torch.tensor([0, 0, 1])
    # cross-entropy: -log softmax(target) averaged
    by_hand = -(math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(1 / (1 + math.e))
                + math.log(math.exp(3) / (math.exp(1) + math.exp(3)))) / 3
    assert task.loss(outputs, targets).item() == pytest.approx(by_hand, rel=1e-6)
    metrics = task.metrics(outputs, targets, tune=False)
    # predictions 0, 1, 1: class a F1 = 2*1/(2+1), class b F1 = 2*1/(1+2)
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["macro_f1"] == pytest.approx(2 / 3)
    assert metrics["loss"] == pytest.approx(by_hand, rel=1e-6)
    assert task.default_metric == "accuracy" and task.head == HeadSpec(2, per_token=False)
    with pytest.raises(ValueError, match="unlabelled"):
        task.check_targets(torch.tensor([0, -1]), "test")


# --------------------------------------------------------------------------- multilabel
def test_multilabel_f1_and_average_precision_by_hand():
    truth = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    predicted = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    # label 0: tp 2; label 1: tp 1, fn 1; label 2: fp 1, fn 1. micro: 2*3 / (2*3 + 1 + 2)
    scores = f1_scores(predicted, truth)
    assert scores["micro_f1"] == pytest.approx(6 / 9)
    assert scores["macro_f1"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)
    # average precision of one label: positives at ranks 1 and 3 -> (1/1 + 2/3) / 2
    ranking = torch.tensor([[0.9], [0.8], [0.7], [0.1]])
    positives = torch.tensor([[1], [0], [1], [0]], dtype=torch.bool)
    assert mean_average_precision(ranking, positives) == pytest.approx((1 + 2 / 3) / 2)
    # labels without a positive are left out of the mean
    two = mean_average_precision(torch.cat([ranking, ranking], 1), torch.cat([positives, torch.zeros_like(positives)], 1))
    assert two == pytest.approx((1 + 2 / 3) / 2)


def test_multilabel_threshold_is_tuned_on_eval_and_kept_for_test():
    task = task_for("multilabel", ["x", "y"])
    # probabilities of the true labels are all 0.3, the false ones 0.04: a threshold in (0.04, 0.3] is perfect,
    # and the smallest such candidate is 0.05
    p_true, p_false = math.log(0.3 / 0.7), math.log(0.04 / 0.96)
    targets = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=torch.uint8)
    outputs = torch.where(targets.bool(), torch.tensor(p_true), torch.tensor(p_false))
    at_half = task.metrics(outputs, targets, tune=False)
    assert at_half["threshold"] == 0.5 and at_half["micro_f1"] == 0.0  # untuned: nothing predicted
    tuned = task.metrics(outputs, targets, tune=True)
    assert tuned["threshold"] == 0.05 and tuned["micro_f1"] == 1.0 and tuned["map"] == 1.0
    assert task.state["threshold"] == tuned["threshold"]
    # a test pass (tune=False) uses the tuned threshold, whatever its own data would have liked
    shifted = task.metrics(outputs - 10, targets, tune=False)
    assert shifted["threshold"] == tuned["threshold"] and shifted["micro_f1"] == 0.0
    loss = task.loss(outputs, targets)
    by_hand = -(4 * math.log(0.3) + 4 * math.log(0.96)) / 8  # 4 true labels at 0.3, 4 false ones at 0.04
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    record = task.record()
    assert task_for("multilabel", record["names"], record["options"], record["state"]).threshold == tuned["threshold"]
    fixed = task_for("multilabel", ["x", "y"], {"threshold": 0.2})
    assert fixed.metrics(outputs, targets, tune=True)["threshold"] == 0.2  # a fixed threshold is never tuned


# --------------------------------------------------------------------------- regression
def test_regression_standardises_with_train_statistics_and_scores_in_units():
    task = task_for("regression", ["valence"])
    task.fit([[1.0], [3.0], [5.0], [7.0]])  # mean 4, std sqrt(5)
    assert task.state["mean"] == [4.0] and task.state["std"] == [pytest.approx(math.sqrt(5))]
    targets = torch.tensor([[4.0], [4.0 + math.sqrt(5)]])
    outputs = torch.tensor([[0.0], [0.5]])  # standardised predictions: 4 and 4 + 0.5 sqrt(5)
    assert task.loss(outputs, targets).item() == pytest.approx((0 + 0.25) / 2, rel=1e-6)
    metrics = task.metrics(outputs, targets, tune=False)
    assert metrics["rmse"] == pytest.approx(math.sqrt((0 + (0.5 * math.sqrt(5)) ** 2) / 2), rel=1e-6)
    assert metrics["pearson"] == pytest.approx(1.0)
    assert task.predictions(outputs)[1] == {"valence": pytest.approx(4 + 0.5 * math.sqrt(5))}
    assert task.better("rmse", 0.5, 0.6) and not task.better("pearson", 0.5, 0.6)
    huber = task_for("regression", ["v"], {"loss": "huber", "huber_delta": 1.0})
    huber.fit([[1.0], [3.0], [5.0], [7.0]])
    big = torch.tensor([[3.0]])  # 3 standard deviations off: linear part, delta * (|e| - delta / 2)
    assert huber.loss(big, torch.tensor([[4.0]])).item() == pytest.approx(3 - 0.5)


def test_spearman_and_pearson_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    y = torch.tensor([1.0, 4.0, 9.0, 100.0])
    assert spearman(x, y) == pytest.approx(1.0)  # monotone: ranks agree
    ties = torch.tensor([1.0, 1.0, 2.0, 3.0])  # ranks 1.5, 1.5, 3, 4
    expected = torch.corrcoef(torch.stack([torch.tensor([1.5, 1.5, 3.0, 4.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])]))[0, 1]
    assert spearman(ties, x) == pytest.approx(expected.item())
    task = task_for("regression", ["a", "b"])
    task.fit([[0.0, 10.0], [2.0, 30.0]])
    assert task.state == {"mean": [1.0, 20.0], "std": [1.0, 10.0]}


# --------------------------------------------------------------------------- tagging
def test_tagging_loss_counts_real_tokens_only():
    task = task_for("tagging", ["DET", "NOUN", "VERB"])
    outputs = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[IGNORE_INDEX, 0, 1, IGNORE_INDEX], [IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX]])
    real = targets != IGNORE_INDEX
    by_hand = torch.nn.functional.cross_entropy(outputs[real], targets[real])
    assert task.loss(outputs, targets).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert task.loss_weight(targets) == 3
    kept_outputs, kept_targets = task.scored(outputs, targets)
    metrics = task.metrics(kept_outputs, kept_targets, tune=False)
    assert metrics["n"] == 3
    assert metrics["token_accuracy"] == pytest.approx((outputs[real].argmax(-1) == targets[real]).float().mean().item())
    assert "entity_f1" not in metrics and task.default_metric == "token_accuracy"  # not a BIO tag set


def test_entity_f1_on_a_bio_example_with_a_partial_match():
    gold = ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "I-LOC", "O", "B-ORG"]
    predicted = ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O", "O", "I-ORG"]
    # PER exact; LOC predicted (3, 5) vs gold (3, 6): a partial match counts nothing; I-ORG after O starts an
    # ORG entity, as conlleval reads it: exact
    assert entity_spans(gold) == {(0, 2, "PER"), (3, 6, "LOC"), (7, 8, "ORG")}
    assert entity_spans(predicted) == {(0, 2, "PER"), (3, 5, "LOC"), (7, 8, "ORG")}
    scores = entity_scores(gold, predicted)
    assert scores == {"entity_precision": pytest.approx(2 / 3), "entity_recall": pytest.approx(2 / 3),
                      "entity_f1": pytest.approx(2 / 3)}
    # a sentence break ends an entity: I-LOC in the next sentence is an entity of its own
    assert entity_spans(["B-LOC", None, "I-LOC"]) == {(0, 1, "LOC"), (2, 3, "LOC")}
    task = task_for("tagging", ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"])
    assert task.bio and task.default_metric == "entity_f1"


def test_tagging_metrics_keep_sentences_apart():
    names = ["B-X", "I-X", "O"]
    task = task_for("tagging", names)
    # two sentences: "B-X I-X" and "I-X"; predicted perfectly
    targets = torch.tensor([[IGNORE_INDEX, 0, 1], [IGNORE_INDEX, 1, IGNORE_INDEX]])
    outputs = torch.nn.functional.one_hot(targets.clamp_min(0), 3).float() * 5
    metrics = task.metrics(*task.scored(outputs, targets), tune=False)
    assert metrics["entity_f1"] == 1.0 and metrics["token_accuracy"] == 1.0 and metrics["n"] == 3


# --------------------------------------------------------------------------- heads and methods
def test_token_methods_give_per_token_outputs_and_pooled_methods_refuse_tagging():
    hidden = [torch.randn(2, 5, 16), torch.randn(2, 5, 16)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    unipt = UniPTClassifier(UniPTConfig(reduction=2), [16, 16], HeadSpec(7, per_token=True)).eval()
    assert unipt(hidden, mask).shape == (2, 5, 7)
    pooled = UniPTClassifier(UniPTConfig(reduction=2), [16, 16], HeadSpec(3)).eval()
    assert pooled(hidden, mask).shape == (2, 3)
    probe = LinearProbe(LinearProbeConfig(), [16], HeadSpec(7, per_token=True)).eval()
    out = probe([hidden[1]], mask)
    # the per-token probe is LayerNorm (no affine) + Linear on every token, independently
    expected = probe.classifier(torch.nn.functional.layer_norm(hidden[1], (16,)))
    torch.testing.assert_close(out, expected)
    tagging = task_for("tagging", ["a", "b"])
    per_token = sorted(name for name, m in METHODS.items() if m.token_outputs and "tokens" in m.layouts)
    assert {"linear_probe", "lst", "unipt"} <= set(per_token) and "scalar_mix" not in per_token
    with pytest.raises(ValueError, match=rf"method 'scalar_mix' cannot train a tagging task.*{re.escape(str(per_token))}"):
        METHODS["scalar_mix"].check_task(tagging, "tokens")
    with pytest.raises(ValueError, match="feature-map store has no tokens"):
        METHODS["linear_probe"].check_task(tagging, "maps")
    METHODS["unipt_cnn"].check_task(task_for("multilabel", ["a", "b"]), "maps")  # the CNN variant gains multilabel
    with pytest.raises(ValueError, match="pooling 'cls' does not apply"):
        LinearProbe(LinearProbeConfig(pooling="cls"), [16], HeadSpec(2, per_token=True))


def test_select_metric_is_checked_against_the_task():
    task = task_for("regression", ["v"])
    assert task.check_metric("") == "pearson" and task.check_metric("rmse") == "rmse"
    with pytest.raises(ValueError, match=r"select_metric 'accuracy' is not a regression metric.*pearson"):
        task.check_metric("accuracy")
    with pytest.raises(ValueError, match="unknown regression task option"):
        task_for("regression", ["v"], {"threshold": 0.5})
