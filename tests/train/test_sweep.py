"""fit_many: many side networks from one pass over the store per epoch, each exactly as if trained alone."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_tiny_store
from unipt.store import FeatureStore
from unipt.train import (PASS_FIELDS, LoaderConfig, MetricsLog, TrainConfig, expand_sweep, fit, fit_many, pass_groups,
                         sweep_keys)
from unipt.train import _trainer

MEMORY = LoaderConfig(mode="memory", background="off")
STREAM = LoaderConfig(mode="stream", shuffle_buffer=16, bucket_batches=1, prefetch_parts=1, background="off")
TIMING = ("train_examples_per_s", "epoch_seconds")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> FeatureStore:
    return write_tiny_store(str(tmp_path_factory.mktemp("sweep") / "store.zarr"))


def mixed_runs() -> dict[str, TrainConfig]:
    """Four methods, three learning rates, two reductions, four init seeds, 1 to 3 epochs, one step limit,
    dropout in three of them (so a shared random stream would show); one data seed: one pass."""
    common = dict(batch_size=8, data_seed=5, device="cpu", warmup=0.1)
    return {
        "unipt-r2": TrainConfig(method="unipt", model={"reduction": 2}, lr=5e-3, epochs=3, seed=0, **common),
        "unipt-r4": TrainConfig(method="unipt", model={"reduction": 4, "layers": [2, 0]}, lr=1e-3, epochs=2, seed=1,
                                **common),
        "lst": TrainConfig(method="lst", model={"reduction": 4, "num_heads": 2}, lr=3e-3, epochs=2, seed=2, **common),
        "probe": TrainConfig(method="linear_probe", model={"layer": 1}, lr=1e-2, epochs=3, max_steps=11,
                             schedule="linear", seed=3, **common),
        "mix": TrainConfig(method="scalar_mix", model={"layers": [0, -1], "dropout": 0.2}, lr=1e-2, epochs=1, seed=0,
                           select_metric="macro_f1", **common),
    }


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def count_reads(monkeypatch) -> Counter:
    """Counts the part reads that decode layers, by split (reading the train split's targets alone, which
    every fit does once to check and fit its task, decodes none)."""
    reads: Counter = Counter()
    read_part = FeatureStore.read_part

    def counting(self, part, layers=None):
        if layers is None or list(layers):
            reads[part.split] += 1
        return read_part(self, part, layers)

    monkeypatch.setattr(FeatureStore, "read_part", counting)
    return reads


def assert_same_run(a, b) -> None:
    """Two RunResults (and their checkpoints) hold exactly the same numbers."""
    assert (a.name, a.method, a.trainable_params, a.best_epoch) == (b.name, b.method, b.trainable_params, b.best_epoch)
    assert a.eval_metrics == b.eval_metrics and a.test_metrics == b.test_metrics
    assert without_timing(a.history) == without_timing(b.history)
    wa, wb = load_file(f"{a.checkpoint}/model.safetensors"), load_file(f"{b.checkpoint}/model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    assert json.loads(Path(a.checkpoint, "config.json").read_text()) == json.loads(
        Path(b.checkpoint, "config.json").read_text())


# --------------------------------------------------------------------------- fit, before and after the refactor
# Numbers written by `fit` before it became `fit_many` with one run (same store, configs and loaders).
BEFORE = {
    "unipt": (TrainConfig(method="unipt", model={"reduction": 2}, lr=5e-3, epochs=3, batch_size=8, warmup=0.1, seed=3,
                          device="cpu"), MEMORY,
              [0.753462556997935, 0.4396979312102, 0.2933334271113078],
              [0.5300483067830404, 0.3479434967041016, 0.30759639739990235], 3,
              {"accuracy": 1.0, "macro_f1": 1.0, "n": 15, "loss": 0.3004669507344564}, 748, 132.09985769935884),
    "lst": (TrainConfig(method="lst", model={"reduction": 4, "num_heads": 2}, lr=3e-3, epochs=2, batch_size=8, seed=1,
                        device="cpu"), STREAM,
            [0.8924411574999491, 0.7531102021535238], [0.7512247085571289, 0.7147818247477213], 2,
            {"accuracy": 0.8, "macro_f1": 0.7802197802197801, "n": 15, "loss": 0.7282012939453125}, 833,
            169.77768040554656),
}


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_fit_gives_the_numbers_it_gave_before_the_refactor(name, store, tmp_path):
    config, loader, train_loss, eval_loss, best_epoch, test, params, weight_sum = BEFORE[name]
    result = fit(name, store, config, tmp_path, loader_config=loader, progress=False)
    assert [h["train_loss"] for h in result.history] == pytest.approx(train_loss, rel=1e-5)
    assert [h["validation_loss"] for h in result.history] == pytest.approx(eval_loss, rel=1e-5)
    assert result.best_epoch == best_epoch and result.trainable_params == params and result.runs_in_pass == 1
    assert {k: v for k, v in result.test_metrics.items() if k != "loss"} == {k: v for k, v in test.items() if k != "loss"}
    assert result.test_metrics["loss"] == pytest.approx(test["loss"], rel=1e-5)
    weights = load_file(f"{result.checkpoint}/model.safetensors")
    assert sum(float(w.double().abs().sum()) for w in weights.values()) == pytest.approx(weight_sum, rel=1e-5)


# --------------------------------------------------------------------------- one pass == each run alone
@pytest.mark.parametrize("loader", [MEMORY, STREAM], ids=["memory", "stream"])
def test_a_mixed_sweep_in_one_pass_equals_each_run_trained_alone(loader, store, tmp_path, monkeypatch):
    runs = mixed_runs()
    reads = count_reads(monkeypatch)
    together = fit_many(runs, store, tmp_path / "together", loader_config=loader,
                        log=MetricsLog(tmp_path / "together.jsonl"), progress=False)
    together_reads = dict(reads)
    reads.clear()
    alone = [fit(name, store, config, tmp_path / "alone", loader_config=loader,
                 log=MetricsLog(tmp_path / "alone.jsonl"), progress=False) for name, config in runs.items()]

    assert [r.name for r in together] == list(runs)
    for a, b in zip(together, alone):
        assert_same_run(a, b)
        assert a.runs_in_pass == len(runs) and b.runs_in_pass == 1
        assert a.config == b.config and a.config["lr"] == runs[a.name].lr
    # every record of every run, tagged with its name, in both logs
    logged = {path: [json.loads(line) for line in (tmp_path / path).read_text().splitlines()]
              for path in ("together.jsonl", "alone.jsonl")}
    by_run = {path: {name: without_timing([r for r in records if r["run"] == name]) for name in runs}
              for path, records in logged.items()}
    assert by_run["together.jsonl"] == by_run["alone.jsonl"]

    # runs with fewer epochs (or a step limit) stop stepping; the others go on
    epochs = {r.name: len(r.history) for r in together}
    assert epochs == {"unipt-r2": 3, "unipt-r4": 2, "lst": 2, "probe": 2, "mix": 1}
    probe = next(r for r in together if r.name == "probe")
    assert [h["step"] for h in probe.history] == [8, 11]  # 60 examples / 8 = 8 batches, then 3 more

    # The store is read once per pass: train once per epoch of the longest run (memory mode: once in all),
    # eval once per epoch, test once; alone, every run reads it for itself.
    passes = max(epochs.values())
    if loader.mode == "memory":
        assert together_reads == {"train": 1, "validation": 1, "test": 1}
        assert reads == {"train": len(runs), "validation": len(runs), "test": len(runs)}
    else:
        assert together_reads == {"train": passes, "validation": passes, "test": 1}
        assert reads == {"train": sum(epochs.values()), "validation": sum(epochs.values()), "test": len(runs)}


def test_each_run_keeps_its_own_random_stream(store, tmp_path, monkeypatch):
    """Without per-run random states, dropout draws would interleave: the test above would catch it."""
    # stepped in turn (stack "off"): this is about random streams, bit for bit (stacked runs: test_stacked.py)
    runs = {f"unipt-{seed}": TrainConfig(model={"dropout": 0.5}, epochs=1, batch_size=8, seed=seed, data_seed=0,
                                         device="cpu", stack="off") for seed in (0, 1)}
    alone = fit("unipt-1", store, runs["unipt-1"], tmp_path / "alone", loader_config=MEMORY, progress=False)
    together = fit_many(runs, store, tmp_path / "together", loader_config=MEMORY, progress=False)[1]
    assert_same_run(together, alone)

    monkeypatch.setattr(_trainer._RandomStream, "__enter__", lambda self: None)
    monkeypatch.setattr(_trainer._RandomStream, "__exit__", lambda self, *exc: None)
    shared = fit_many(runs, store, tmp_path / "shared", loader_config=MEMORY, progress=False)[1]
    assert without_timing(shared.history) != without_timing(alone.history)


def test_a_seed_sweep_over_one_data_seed_shares_a_pass_and_varies_init(store, tmp_path):
    runs = expand_sweep("unipt", TrainConfig(epochs=1, batch_size=8, device="cpu", data_seed=0), {"seed": [0, 1, 2]})
    results = fit_many(runs, store, tmp_path, loader_config=MEMORY, progress=False)
    assert len({json.dumps(without_timing(r.history)) for r in results}) == 3
    assert [r.config["seed"] for r in results] == [0, 1, 2]
    assert all(Path(r.checkpoint).parent == tmp_path and Path(r.checkpoint, "model.safetensors").is_file()
               for r in results)


# --------------------------------------------------------------------------- what can share a pass
def test_runs_that_cannot_share_a_pass_are_refused_and_grouped():
    base = TrainConfig(device="cpu")
    with pytest.raises(ValueError, match=r"runs 'a' and 'b' cannot train in one pass over the store: their "
                                         r"batch_size differs \(32 vs 16\)"):
        fit_many({"a": base, "b": TrainConfig(device="cpu", batch_size=16)}, None, "unused")
    with pytest.raises(ValueError, match=r"shuffle_seed differs \(0 vs 1\) \(set the same data_seed"):
        fit_many({"a": base, "b": TrainConfig(device="cpu", seed=1)}, None, "unused")
    with pytest.raises(ValueError, match="at least one run"):
        fit_many({}, None, "unused")

    runs = {"a": base, "b": TrainConfig(device="cpu", seed=1), "c": TrainConfig(device="cpu", lr=1e-3),
            "d": TrainConfig(device="cpu", seed=1, method="lst"), "e": TrainConfig(device="cpu", eval_split=""),
            "f": TrainConfig(device="cpu", seed=7, data_seed=0)}
    assert [list(g) for g in pass_groups(runs)] == [["a", "c", "f"], ["b", "d"], ["e"]]
    assert "shuffle_seed" in PASS_FIELDS and "lr" not in PASS_FIELDS


# --------------------------------------------------------------------------- sweep expansion
def test_expand_sweep_is_the_cartesian_product_named_by_what_varies():
    base = TrainConfig(model={"reduction": 2, "dropout": 0.0}, epochs=2)
    runs = expand_sweep("unipt", base, {"lr": [1e-4, 5e-4], "model.reduction": [2, 4, 8], "seed": [0, 1]})
    assert len(runs) == 12
    assert list(runs)[:3] == ["unipt@lr=0.0001,model.reduction=2,seed=0", "unipt@lr=0.0001,model.reduction=2,seed=1",
                              "unipt@lr=0.0001,model.reduction=4,seed=0"]
    run = runs["unipt@lr=0.0005,model.reduction=8,seed=1"]
    assert (run.lr, run.model, run.seed, run.epochs) == (5e-4, {"reduction": 8, "dropout": 0.0}, 1, 2)
    assert base.model == {"reduction": 2, "dropout": 0.0}  # the base is left alone
    assert expand_sweep("unipt", base, {}) == {"unipt": base}
    # lists, booleans and strings in names stay file-name and shell safe
    names = expand_sweep("probe", TrainConfig(method="linear_probe"),
                         {"model.normalize": [True], "model.pooling": ["cls"], "device": ["cuda:1"]})
    assert list(names) == ["probe@model.normalize=true,model.pooling=cls,device=cuda_1"]
    layers = expand_sweep("u", TrainConfig(), {"model.layers": [[0, -1], "all"]})
    assert list(layers) == ["u@model.layers=0+-1", "u@model.layers=all"]


def test_expand_sweep_refuses_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match=r"unknown sweep key\(s\) \['learning_rate', 'model.r'\]; valid keys: "
                                         r"\[.*'lr'.*'model.reduction'.*\]"):
        expand_sweep("unipt", TrainConfig(), {"learning_rate": [1e-3], "model.r": [2]})
    with pytest.raises(ValueError, match=r"non-empty list, got lr = 0.001"):
        expand_sweep("unipt", TrainConfig(), {"lr": 1e-3})
    with pytest.raises(ValueError, match=r"sweep run 'unipt@lr=-1': lr must be positive"):
        expand_sweep("unipt", TrainConfig(), {"lr": [1e-3, -1]})
    with pytest.raises(ValueError, match=r"sweep run 'x@method=linear_probe,model.reduction=2': unknown linear_probe "
                                         r"model option\(s\) \['reduction'\]"):
        expand_sweep("x", TrainConfig(), {"method": ["unipt", "linear_probe"], "model.reduction": [2]})
    with pytest.raises(ValueError, match="unknown method 'lora'"):
        expand_sweep("x", TrainConfig(), {"method": ["lora"]})
    with pytest.raises(ValueError, match="twice"):
        expand_sweep("x", TrainConfig(), {"seed": [1, 1]})
    assert "model.num_heads" in sweep_keys(["unipt", "lst"]) and "model.num_heads" not in sweep_keys(["unipt"])
