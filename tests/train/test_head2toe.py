"""Head2Toe against a loop-based reference of its equations, padding, the group lasso's effect, the selection of
the keep fraction, checkpoints, resume, sweeps (stack = "on") and recipes."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import assert_checkpoint_rebuilds, pad_with_garbage, ragged_mask, randomise_params, write_store_recipe
from unipt.pipelines import load_recipe, train_stage
from unipt.store import FeatureStore
from unipt.train import (ActivationLoader, Head2Toe, Head2ToeConfig, HeadSpec, LoaderConfig, TrainConfig,
                         evaluate_checkpoint, fit, fit_many, get_method, load_checkpoint)
from unipt.train import _methods
from unipt.train.head2toe import kept_count, top_features

WIDTHS = (6, 9, 4)  # layers of different widths
LOADER = LoaderConfig(mode="memory", background="off")


# --------------------------------------------------------------------------- reference implementation
def reference_head2toe(model: Head2Toe, hidden_states, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """DESIGN.md's Head2Toe, one example, one layer and one pooling at a time, on real tokens only.

    Returns the normalised features G (B, F) and the logits (B, C)."""
    cfg = model.config
    keep = model.keep.tolist()
    rows, logits = [], []
    for b in range(mask.shape[0]):
        real = [n for n in range(mask.shape[1]) if mask[b, n]]
        groups = []
        for h in hidden_states:
            for pooling in cfg.poolings:
                tokens = [h[b, n] for n in real]
                if pooling == "mean":
                    groups.append(sum(tokens) / len(tokens))
                elif pooling == "max":
                    best = tokens[0].clone()
                    for t in tokens[1:]:
                        best = torch.where(t > best, t, best)
                    groups.append(best)
                else:  # cls: the first real token
                    groups.append(tokens[0].clone())
        start, normed = 0, []
        for g in groups:
            g = [float(v) for v in g]
            k = keep[start:start + len(g)]
            if cfg.normalization == "per_feature":
                mu = model.feature_mean[start:start + len(g)].tolist()
                sd = model.feature_std[start:start + len(g)].tolist()
                g = [(v - m) / s * kk for v, m, s, kk in zip(g, mu, sd, k)]
            else:
                g = [v * kk for v, kk in zip(g, k)]
                if cfg.normalization == "unit_vector":
                    norm = math.sqrt(sum(v * v for v in g))
                    g = [v / norm if norm > 0 else 0.0 for v in g]
            normed.extend(g)
            start += len(g)
        x = torch.tensor(normed, dtype=hidden_states[0].dtype)
        rows.append(x)
        logits.append(model.classifier.weight @ x + model.classifier.bias)
    return torch.stack(rows), torch.stack(logits)


def reference_penalty(model: Head2Toe) -> float:
    """λ Σ_f ||W_{:,f}||₂ with every column norm written out."""
    w = model.classifier.weight.detach().double()
    total = 0.0
    for f in range(w.shape[1]):
        total += math.sqrt(sum(float(w[c, f]) ** 2 for c in range(w.shape[0])))
    return model.config.group_lasso * total


# --------------------------------------------------------------------------- helpers
def random_inputs(lengths, widths=WIDTHS, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mask = ragged_mask(lengths)
    # layers on different scales and offsets, as real hidden states are
    hs = [torch.randn(len(lengths), mask.shape[1], w, generator=g, dtype=dtype) * (1 + 2 * l) + l
          for l, w in enumerate(widths)]
    return hs, mask


def make_model(widths=WIDTHS, seed=0, labels=3, **config) -> Head2Toe:
    torch.manual_seed(seed)
    model = Head2Toe(Head2ToeConfig(**config), widths, labels).eval()
    randomise_params(model, seed)
    return model


def write_signal_store(url: str, widths=(8, 8, 8, 8), signal_layers=(0, 2), kind: str = "classification",
                       sizes=(("train", 90), ("validation", 30), ("test", 30)), seed: int = 0) -> FeatureStore:
    """A store written in code whose ``signal_layers`` carry the target (every token: a direction of its class
    plus noise) and whose other layers are noise only. ``kind``: classification (3 classes), multilabel (3
    labels; the signal directions of the labels present, summed) or regression (one target: the class index
    plus a little noise)."""
    layers = list(range(len(widths)))
    names = {"regression": ["t"]}.get(kind, ["a", "b", "c"])
    store = FeatureStore.create(url, layers=layers, layer_widths=list(widths), dtype="float32", label_names=names,
                                provenance={"backbone": {"weights_sha256": "tiny", "tokenizer_sha256": "tiny"}},
                                task=kind)
    g = torch.Generator().manual_seed(seed)
    directions = [torch.randn(3, w, generator=g) for w in widths]
    start = 0
    for split, n in sizes:
        classes = [k % 3 for k in range(n)]
        lengths = [1 + (5 * k) % 9 for k in range(n)]
        present = [[c == j or (k % 2 == 0 and j == (c + 1) % 3) for j in range(3)] for k, c in enumerate(classes)]
        writer = store.part_writer(split, 0, n_examples=n, n_tokens=sum(lengths), source_start=start)
        for k, (c, length) in enumerate(zip(classes, lengths)):
            tokens = {}
            for l, w in zip(layers, widths):
                noise = torch.randn(length, w, generator=g)
                if l in signal_layers:
                    mix = (torch.tensor(present[k], dtype=torch.float32) @ directions[l] if kind == "multilabel"
                           else directions[l][c])
                    noise = noise + 1.5 * mix
                tokens[l] = noise
            writer.append(tokens)
        if kind == "multilabel":
            targets = np.array(present, dtype=np.uint8)
        elif kind == "regression":
            targets = (np.array(classes, dtype=np.float32) + 0.1 * torch.randn(n, generator=g).numpy())[:, None]
        else:
            targets = classes
        writer.finish([f"{split}-{k:03d}" for k in range(n)], targets, lengths)
        start += n
    return FeatureStore.open(url)


@pytest.fixture(scope="module")
def signal_store(tmp_path_factory) -> FeatureStore:
    return write_signal_store(str(tmp_path_factory.mktemp("h2t") / "store.zarr"))


def phase_one_weight(checkpoint: str) -> torch.Tensor:
    """The selection phase's last head, from the run's saved epoch state (the checkpoint holds the final head)."""
    (state,) = Path(checkpoint).glob("train-state-e*.safetensors")
    return load_file(str(state))["model/classifier.weight"]


def h2t_config(**overrides) -> TrainConfig:
    model = {"group_lasso": 1e-2, "keep_fractions": [0.25, 0.5, 1.0], **overrides.pop("model", {})}
    return TrainConfig(**{"method": "head2toe", "model": model, "lr": 2e-2, "epochs": 3, "batch_size": 16,
                          "warmup": 0.0, "device": "cpu", "seed": 0, **overrides})


# --------------------------------------------------------------------------- equations
@pytest.mark.parametrize("normalization", ["unit_vector", "per_feature", "none"])
@pytest.mark.parametrize("poolings", [("mean",), ("mean", "max", "cls"), ("cls", "max")])
def test_matches_reference(normalization, poolings):
    model = make_model(seed=1, poolings=poolings, normalization=normalization, group_lasso=0.3)
    with torch.no_grad():  # per_feature statistics off their identity default; some features dropped
        model.feature_mean.normal_(0, 1)
        model.feature_std.uniform_(0.5, 2.0)
        model.set_keep((torch.arange(model.num_features) % 3 != 1).float())
    hs, mask = random_inputs([5, 1, 3, 4], seed=1)
    assert model.num_features == len(poolings) * sum(WIDTHS)
    g, ref_logits = reference_head2toe(model, hs, mask)
    torch.testing.assert_close(model.normalized(model.features(hs, mask)), g, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(hs, mask), ref_logits, atol=1e-5, rtol=1e-5)
    assert model.regularization().item() == pytest.approx(reference_penalty(model), rel=1e-5, abs=1e-5)
    norms = [math.sqrt(sum(float(v) ** 2 for v in model.classifier.weight.detach()[:, f])) for f in range(model.num_features)]
    torch.testing.assert_close(model.feature_scores(), torch.tensor(norms), atol=1e-5, rtol=1e-5)


def test_unit_vector_groups_have_unit_norm_and_a_fully_dropped_group_is_zero():
    model = make_model(seed=2, poolings=("mean", "max"))
    keep = torch.ones(model.num_features)
    keep[:WIDTHS[0]] = 0  # layer 0's mean group: dropped entirely
    model.set_keep(keep)
    hs, mask = random_inputs([3, 2], seed=2)
    g = model.normalized(model.features(hs, mask))
    groups = g.split(model.group_sizes, dim=-1)
    assert torch.all(groups[0] == 0)
    for group in groups[1:]:
        torch.testing.assert_close(group.norm(dim=-1), torch.ones(2))
    assert torch.all(model.classifier.weight[:, :WIDTHS[0]] == 0)  # set_keep zeroes the dropped columns


def test_top_features_and_kept_count():
    scores = torch.tensor([0.5, 3.0, 1.0, 3.0, 0.0, 2.0])
    assert top_features(scores, 3).tolist() == [0, 1, 0, 1, 0, 1]
    assert top_features(scores, 1).tolist() == [0, 1, 0, 0, 0, 0]  # a tie: the earlier feature
    assert kept_count(0.01, 6) == 1 and kept_count(0.5, 6) == 3 and kept_count(1.0, 6) == 6
    assert kept_count(0.34, 100) == 34


# --------------------------------------------------------------------------- padding and gradients
@pytest.mark.parametrize("normalization", ["unit_vector", "per_feature"])
def test_padding_invariance(normalization):
    model = make_model(seed=3, poolings=("mean", "max", "cls"), normalization=normalization).double()
    hs, mask = random_inputs([4, 1, 3], seed=3, dtype=torch.float64)
    hs2, mask2 = pad_with_garbage(hs, mask, extra=5, seed=4)
    logits = model(hs, mask)
    torch.testing.assert_close(model(hs2, mask2), logits, atol=1e-10, rtol=1e-10)
    for i, n in enumerate([4, 1, 3]):  # each example alone, unpadded
        alone = model([h[i:i + 1, :n] for h in hs], mask[i:i + 1, :n])
        torch.testing.assert_close(alone, logits[i:i + 1], atol=1e-10, rtol=1e-10)


def test_gradients_reach_every_parameter_and_not_padding_or_dropped_features():
    model = make_model(seed=5, poolings=("mean", "max", "cls"), dropout=0.1, group_lasso=0.1).train()
    hs, mask = random_inputs([5, 2, 4, 1], seed=5)
    hs = [h.requires_grad_() for h in hs]
    (F.cross_entropy(model(hs, mask), torch.tensor([0, 2, 1, 1])) + model.regularization()).backward()
    assert [name for name, _ in model.named_parameters()] == ["classifier.weight", "classifier.bias"]
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    for h in hs:
        assert h.grad is not None and torch.all(h.grad[~mask] == 0)  # padded hidden states cannot matter
    # retraining on kept features: the task loss gives the dropped columns no gradient (so they stay 0)
    keep = (torch.arange(model.num_features) % 2 == 0).float()
    model.set_keep(keep)
    model.zero_grad()
    F.cross_entropy(model([h.detach() for h in hs], mask), torch.tensor([0, 2, 1, 1])).backward()
    assert torch.all(model.classifier.weight.grad[:, keep == 0] == 0)
    assert model.classifier.weight.grad[:, keep == 1].abs().sum() > 0


# --------------------------------------------------------------------------- validation and registry
def test_config_validation():
    for bad, match in [({"layers": "last"}, "'all' or a list"),
                       ({"layers": []}, "at least 1 layer"),
                       ({"poolings": "mean"}, "non-empty list"),
                       ({"poolings": ["mean", "avg"]}, r"distinct choices from \('mean', 'max', 'cls'\)"),
                       ({"poolings": ["max", "max"]}, "distinct choices"),
                       ({"normalization": "l2"}, r"normalization must be one of \('unit_vector'"),
                       ({"group_lasso": -1.0}, "group_lasso"),
                       ({"keep_fractions": []}, "non-empty list"),
                       ({"keep_fractions": [0.0, 0.5]}, r"fractions in \(0, 1\]"),
                       ({"keep_fractions": [0.5, 1.5]}, r"fractions in \(0, 1\]"),
                       ({"keep_fractions": [0.5, 0.5]}, "distinct"),
                       ({"retrain_epochs": -1}, "retrain_epochs"),
                       ({"dropout": 1.0}, r"dropout must be in \[0, 1\)")]:
        with pytest.raises(ValueError, match=match):
            Head2ToeConfig(**bad)
    cfg = Head2ToeConfig(keep_fractions=[1.0, 0.1, 0.5], poolings=["max", "mean"])
    assert cfg.keep_fractions == (0.1, 0.5, 1.0) and cfg.poolings == ("max", "mean")
    assert Head2ToeConfig().keep_fractions == (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def test_registered_method_refuses_per_token_tasks():
    method = get_method("head2toe")
    assert method.build is Head2Toe and not method.token_outputs
    with pytest.raises(ValueError, match=r"unknown head2toe model option\(s\) \['lambda'\]"):
        method.make_config({"lambda": 1.0})
    with pytest.raises(ValueError, match="'head2toe' outputs one pooled vector per example"):
        Head2Toe(Head2ToeConfig(), [8], HeadSpec(4, per_token=True))
    model = Head2Toe(Head2ToeConfig(), [8, 8], 3)
    with pytest.raises(ValueError, match="expected 2 layers"):
        model([torch.zeros(1, 2, 8)], torch.ones(1, 2, dtype=torch.bool))


# --------------------------------------------------------------------------- the two phases, trained
def test_group_lasso_drives_noise_layers_to_zero_and_selection_keeps_the_signal(signal_store, tmp_path):
    """Layers 0 and 2 carry the class, 1 and 3 are noise: the penalty shrinks the noise layers' columns far more
    than a plain head does, and every kept feature comes from a signal layer."""
    ratios = {}
    for lam in (0.0, 0.05):
        config = h2t_config(model={"group_lasso": lam, "keep_fractions": [0.25, 0.5]}, epochs=8)
        result = fit(f"lam{lam}", signal_store, config, tmp_path, loader_config=LOADER, progress=False)
        norms = phase_one_weight(result.checkpoint).norm(dim=0).view(4, 8)  # (layer, feature)
        signal, noise = norms[[0, 2]].mean(), norms[[1, 3]].mean()
        ratios[lam] = (noise / signal).item()
        if lam:
            assert result.post_train["kept_per_layer"]["1"] == result.post_train["kept_per_layer"]["3"] == 0
            assert result.post_train["kept_per_layer"]["0"] + result.post_train["kept_per_layer"]["2"] == \
                result.post_train["kept_features"]
            model, _ = load_checkpoint(result.checkpoint)
            assert torch.all(model.keep.view(4, 8)[[1, 3]] == 0)
            assert result.test_metrics["accuracy"] > 0.8
    assert ratios[0.05] < 0.1, ratios  # measured: 0.045 (plain: 0.50)
    assert ratios[0.05] < 0.2 * ratios[0.0], ratios


def test_chosen_keep_fraction_is_the_best_candidate_and_the_checkpoint_rebuilds(signal_store, tmp_path):
    config = h2t_config(model={"keep_fractions": [1.0, 0.05, 0.25], "poolings": ["mean", "max"]},
                        select_metric="loss")
    result = fit("h2t", signal_store, config, tmp_path, loader_config=LOADER, progress=False)
    record = result.post_train
    assert record["features"] == 2 * 4 * 8 and [c["keep_fraction"] for c in record["candidates"]] == [0.05, 0.25, 1.0]
    assert [c["kept_features"] for c in record["candidates"]] == [3, 16, 64]
    losses = [c["eval"]["loss"] for c in record["candidates"]]
    best = record["candidates"][int(np.argmin(losses))]  # recomputed: the lowest loss (first on ties)
    assert record["keep_fraction"] == best["keep_fraction"] and record["kept_features"] == best["kept_features"]
    assert result.eval_metrics == best["eval"] and result.select_metric == "loss"
    assert result.best_epoch == config.epochs
    # the saved model scores the eval split as its candidate did
    on_eval = evaluate_checkpoint(result.checkpoint, signal_store, "validation", batch_size=16, device="cpu",
                                  loader_config=LOADER)
    assert on_eval["loss"] == pytest.approx(best["eval"]["loss"], rel=1e-5)
    assert on_eval["accuracy"] == best["eval"]["accuracy"]
    # it keeps the top features of the selection phase's last head (ranked here with numpy), and nothing else
    model, meta = load_checkpoint(result.checkpoint)
    scores = np.linalg.norm(phase_one_weight(result.checkpoint).double().numpy(), axis=0)
    expected = np.zeros(len(scores))
    expected[np.argsort(-scores, kind="stable")[:record["kept_features"]]] = 1
    assert model.keep.tolist() == expected.tolist()
    assert torch.all(model.classifier.weight[:, model.keep == 0] == 0)
    assert meta["head2toe"] == record and meta["eval"] == result.eval_metrics
    assert_checkpoint_rebuilds(config, signal_store, result.checkpoint, result.test_metrics, LOADER)


def test_per_feature_statistics_come_from_the_train_split(signal_store, tmp_path):
    config = h2t_config(model={"normalization": "per_feature", "poolings": ["mean", "cls"],
                               "keep_fractions": [0.5, 1.0]}, epochs=2)
    result = fit("pf", signal_store, config, tmp_path, loader_config=LOADER, progress=False)
    model, _ = load_checkpoint(result.checkpoint)
    loader = ActivationLoader(signal_store, "train", [0, 1, 2, 3], batch_size=7, shuffle=False, config=LOADER)
    rows = []
    for batch in loader:  # mean and first real token, layer by layer, in numpy
        for b in range(len(batch)):
            n = int(batch.mask[b].sum())
            rows.append(np.concatenate([np.concatenate([h[b, :n].double().numpy().mean(0), h[b, 0].double().numpy()])
                                        for h in batch.hidden_states]))
    features = np.stack(rows)
    assert len(features) == 90
    np.testing.assert_allclose(model.feature_mean.numpy(), features.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.feature_std.numpy(), np.sqrt(features.var(0) + 1e-5), rtol=1e-5, atol=1e-6)
    assert_checkpoint_rebuilds(config, signal_store, result.checkpoint, result.test_metrics, LOADER)


def test_without_an_eval_split_a_single_fraction_trains_and_several_are_refused(signal_store, tmp_path):
    config = h2t_config(eval_split="", model={"keep_fractions": [0.5, 1.0]}, epochs=1)
    with pytest.raises(ValueError, match=r"chooses among keep_fractions \[0.5, 1.0\] on the eval split"):
        fit("two", signal_store, config, tmp_path, loader_config=LOADER, progress=False)
    assert not (tmp_path / "two" / "model.safetensors").exists()  # refused before any epoch
    config = h2t_config(eval_split="", model={"keep_fractions": [0.5]}, epochs=1)
    result = fit("one", signal_store, config, tmp_path, loader_config=LOADER, progress=False)
    assert result.post_train["keep_fraction"] == 0.5 and result.post_train["kept_features"] == 16
    assert result.test_metrics["n"] == 30


@pytest.mark.parametrize("kind,metric", [("regression", "pearson"), ("multilabel", "map")])
def test_other_tasks_train_and_select_on_their_metric(kind, metric, tmp_path):
    store = write_signal_store(str(tmp_path / "store.zarr"), kind=kind)
    config = h2t_config(model={"keep_fractions": [0.25, 1.0]}, epochs=4)
    result = fit(kind, store, config, tmp_path / "out", loader_config=LOADER, progress=False)
    assert result.task == kind and result.select_metric == metric
    scores = [c["eval"][metric] for c in result.post_train["candidates"]]
    assert result.eval_metrics[metric] == max(scores)
    assert result.test_metrics[metric] > 0.5
    again = evaluate_checkpoint(result.checkpoint, store, "test", batch_size=16, device="cpu", loader_config=LOADER)
    assert again[metric] == pytest.approx(result.test_metrics[metric], rel=1e-6)


# --------------------------------------------------------------------------- resume, sweeps, recipes
def _same_outcome(a, b) -> None:
    assert a.post_train == b.post_train and a.eval_metrics == b.eval_metrics and a.test_metrics == b.test_metrics
    wa, wb = load_file(f"{a.checkpoint}/model.safetensors"), load_file(f"{b.checkpoint}/model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_run_killed_during_selection_or_between_epochs_resumes_to_the_same_result(signal_store, tmp_path,
                                                                                     monkeypatch):
    config = h2t_config(epochs=2)
    whole = fit("h2t", signal_store, config, tmp_path / "whole", loader_config=LOADER, progress=False)

    # killed during the selection phase: the epochs are saved, the selection is repeated on restart
    method = _methods.METHODS["head2toe"]

    def killed(*args):
        raise KeyboardInterrupt("killed during selection")

    monkeypatch.setitem(_methods.METHODS, "head2toe", dataclasses.replace(method, finish=killed))
    with pytest.raises(KeyboardInterrupt):
        fit("h2t", signal_store, config, tmp_path / "killed", loader_config=LOADER, progress=False)
    monkeypatch.setitem(_methods.METHODS, "head2toe", method)
    assert not (tmp_path / "killed" / "h2t" / "result.json").exists()
    _same_outcome(fit("h2t", signal_store, config, tmp_path / "killed", loader_config=LOADER, progress=False), whole)

    # killed after its second epoch, before that epoch's state was saved: it resumes after the first
    def stop(name, epoch, metrics):
        if epoch == 2:
            raise KeyboardInterrupt("killed after epoch 2")
        return False

    with pytest.raises(KeyboardInterrupt):
        fit_many({"h2t": config}, signal_store, tmp_path / "early", loader_config=LOADER, progress=False, on_epoch=stop)
    (resumed,) = fit_many({"h2t": config}, signal_store, tmp_path / "early", loader_config=LOADER, progress=False)
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    _same_outcome(resumed, whole)


def test_a_sweep_with_stack_on_trains_each_run_as_alone(signal_store, tmp_path):
    runs = {f"s{seed}": h2t_config(seed=seed, data_seed=0, stack="on", epochs=2,
                                   model={"group_lasso": 1e-2 * (seed + 1), "keep_fractions": [0.25, 1.0]})
            for seed in (0, 1)}
    results = fit_many(runs, signal_store, tmp_path / "sweep", loader_config=LOADER, progress=False)
    assert [r.runs_in_pass for r in results] == [2, 2]
    assert not any(r.stacked for r in results)  # the group lasso keeps head2toe off stacked steps
    for (name, config), result in zip(runs.items(), results):
        assert result.post_train["keep_fraction"] in (0.25, 1.0)
        alone = fit(name, signal_store, config, tmp_path / f"alone-{name}", loader_config=LOADER, progress=False)
        _same_outcome(result, alone)
    assert results[0].post_train != results[1].post_train


RECIPE_TRAIN = """
[train.h2t]
method = "head2toe"
lr = 2e-2
epochs = 2
batch_size = 16
device = "cpu"
model = { group_lasso = 1e-2, keep_fractions = [0.25, 1.0], poolings = ["mean", "cls"], dropout = 0.1 }
"""


def test_a_recipe_with_a_head2toe_run_trains(signal_store, tmp_path):
    path = write_store_recipe(tmp_path / "tiny-h2t.toml", signal_store.url, tmp_path / "work", RECIPE_TRAIN)
    recipe = load_recipe(str(path))
    assert recipe.train["h2t"].method == "head2toe"
    (result,) = train_stage(recipe, progress=False)
    assert result.method == "head2toe" and len(result.history) == 2
    assert result.test_metrics["n"] == signal_store.num_examples("test")
    assert result.post_train["features"] == 2 * 4 * 8
    model, meta = load_checkpoint(tmp_path / "work" / "checkpoints" / "h2t")
    assert meta["head2toe"]["keep_fraction"] == result.post_train["keep_fraction"]
    assert int(model.keep.sum()) == result.post_train["kept_features"]
    assert model.config.poolings == ("mean", "cls") and model.config.dropout == 0.1
