"""Stacked runs: runs whose parameter shapes agree (or, for UniPT's r, are zero-padded to agree), stepped as one
batched model, train as they would alone."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.func import vmap

from conftest import write_tagging_store, write_tiny_store
from unipt.store import FeatureStore
from unipt.train import LinearProbeConfig, LoaderConfig, TrainConfig, fit_many
from unipt.train import _methods, _stacked, _trainer
from unipt.train._stacked import AutoStack, StackedRuns, Unstackable, why_not_stackable

MEMORY = LoaderConfig(mode="memory", background="off")
COMMON = dict(batch_size=8, data_seed=5, device="cpu", warmup=0.1)  # one pass; 60 train examples: 8 batches
TOLERANCE = dict(rel=1e-5, abs=1e-6)


def with_gradient(key: str, weights: torch.Tensor) -> torch.Tensor:
    """``weights`` but the parts whose true gradient is 0 and that no output depends on: UniPT's gate bias adds
    the same number to every layer's score, and an attention key bias the same number to every key's score, both
    ignored by the softmax after them. What they get is rounding noise, which AdamW scales up to full-size steps;
    batched kernels round differently, so those parts drift apart (by up to ~lr per step), harmlessly."""
    if key == "side.gate.bias":
        return weights[:0]
    if key.endswith("self_attn.in_proj_bias"):  # (3 w,): query, key, value biases
        w = len(weights) // 3
        return torch.cat([weights[:w], weights[2 * w:]])
    return weights


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> FeatureStore:
    return write_tiny_store(str(tmp_path_factory.mktemp("stacked") / "store.zarr"))


@pytest.fixture(scope="module")
def wide_store(tmp_path_factory) -> FeatureStore:
    """32 wide, for sweeps over r: r = 8 leaves m = 4. (At m = 2, LayerNorm(m) outputs +-1 whatever its input, so
    the Linear before it gets only rounding noise as gradient, which AdamW scales to full-size steps: such runs
    drift apart stacked even unpadded, as the gate bias does in :func:`with_gradient`.)"""
    return write_tiny_store(str(tmp_path_factory.mktemp("stacked-wide") / "store.zarr"), widths=(32, 32, 32))


@pytest.fixture(scope="module")
def tagging_store(tmp_path_factory) -> FeatureStore:
    return write_tagging_store(str(tmp_path_factory.mktemp("stacked-tags") / "store.zarr"))


def with_stack(runs: dict[str, TrainConfig], stack: str) -> dict[str, TrainConfig]:
    return {name: replace(config, stack=stack) for name, config in runs.items()}


def capture_steppers(monkeypatch) -> list[list]:
    """The steppers of every pass that fit_many makes (its trainer calls group_steppers once per pass)."""
    passes: list[list] = []

    def grouping(runs):
        passes.append(_stacked.group_steppers(runs))
        return passes[-1]

    monkeypatch.setattr(_trainer, "group_steppers", grouping)
    return passes


def assert_same_training(got, want) -> None:
    """Two RunResults trained the same, to float rounding: losses and metrics of every epoch, best epoch, test
    scores and checkpoint weights (:func:`with_gradient`)."""
    assert [r.name for r in got] == [r.name for r in want]
    for a, b in zip(got, want):
        assert (a.best_epoch, a.trainable_params, a.config | {"stack": None}) == (
            b.best_epoch, b.trainable_params, b.config | {"stack": None})
        assert len(a.history) == len(b.history)
        for ha, hb in zip(a.history, b.history):
            assert ha["step"] == hb["step"]
            assert {k: v for k, v in ha.items() if k.endswith("loss") or k.startswith("validation")} == pytest.approx(
                {k: v for k, v in hb.items() if k.endswith("loss") or k.startswith("validation")}, **TOLERANCE), a.name
        assert a.eval_metrics == pytest.approx(b.eval_metrics, **TOLERANCE)
        assert a.test_metrics == pytest.approx(b.test_metrics, **TOLERANCE)
        wa, wb = load_file(f"{a.checkpoint}/model.safetensors"), load_file(f"{b.checkpoint}/model.safetensors")
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(with_gradient(key, wa[key]), with_gradient(key, wb[key]), rtol=1e-5, atol=1e-5,
                                       msg=f"{a.name} {key}")


def sweep(method: str, model: dict, dropouts=(0.3, 0.0, 0.5)) -> dict[str, TrainConfig]:
    """One method's runs differing in everything a stack lets differ: lr, weight decay, seed, schedule,
    gradient clipping, dropout (where the model has any), and the step where they stop."""
    drop = iter([{}] * 3 if dropouts is None else [{"dropout": d} for d in dropouts])
    return {
        "a": TrainConfig(method=method, model=model | next(drop), lr=5e-3, seed=0, epochs=3, **COMMON),
        "b": TrainConfig(method=method, model=model | next(drop), lr=1e-3, weight_decay=0.1, seed=1, epochs=3,
                         schedule="linear", **COMMON),
        "c": TrainConfig(method=method, model=model | next(drop), lr=2e-3, seed=2, epochs=2, grad_clip=0.05,
                         schedule="constant", max_steps=13, **COMMON),
    }


# --------------------------------------------------------------------------- stacked == stepped in turn
@pytest.mark.parametrize("method, model, dropouts", [
    ("unipt", {"reduction": 2}, (0.3, 0.0, 0.5)),
    # attention dropout cannot stack: none here (vmap loops over torch's CPU flash attention, and says so)
    pytest.param("lst", {"reduction": 4, "num_heads": 2}, (0.0, 0.0, 0.0),
                 marks=pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")),
    ("linear_probe", {"layer": 1}, None),
    ("scalar_mix", {"layers": [0, -1]}, (0.2, 0.0, 0.4)),
])
def test_stacked_runs_equal_the_same_runs_stepped_in_turn(method, model, dropouts, store, tmp_path, monkeypatch):
    runs = sweep(method, model, dropouts)
    off = fit_many(with_stack(runs, "off"), store, tmp_path / "off", loader_config=MEMORY, progress=False)
    passes = capture_steppers(monkeypatch)
    on = fit_many(with_stack(runs, "on"), store, tmp_path / "on", loader_config=MEMORY, progress=False)

    assert [type(s) for s in passes[0]] == [StackedRuns]  # one stack, whatever lr, seed, schedule, clip, dropout
    assert [len(p[0].runs) if isinstance(p[0], StackedRuns) else 1 for p in passes] == [3, 3, 2]  # c is done
    assert [r.stacked for r in on] == [True] * 3 and [r.stacked for r in off] == [False] * 3
    assert_same_training(on, off)
    assert [[h["step"] for h in r.history] for r in on] == [[8, 16, 24], [8, 16, 24], [8, 13]]


def test_unipt_runs_of_different_r_stack_padded_and_equal_the_runs_in_turn(wide_store, tmp_path, monkeypatch):
    """m = E // r is 8, 16 and 4 wide (E = 32): one stack, zero-padded to the r = 2 run's shapes (not the first
    run's), its LayerNorms masked to each run's own m; lr, seed, schedule, clip and dropout differ too."""
    runs = {name: replace(config, model=config.model | {"reduction": r})
            for (name, config), r in zip(sweep("unipt", {}, (0.3, 0.0, 0.5)).items(), (4, 2, 8))}
    off = fit_many(with_stack(runs, "off"), wide_store, tmp_path / "off", loader_config=MEMORY, progress=False)
    passes = capture_steppers(monkeypatch)
    on = fit_many(with_stack(runs, "on"), wide_store, tmp_path / "on", loader_config=MEMORY, progress=False)

    assert [type(s) for s in passes[0]] == [StackedRuns]
    assert [len(p[0].runs) if isinstance(p[0], StackedRuns) else 1 for p in passes] == [3, 3, 2]  # c is done
    assert [r.stacked for r in on] == [True] * 3
    assert [on_run.trainable_params for on_run in on] == [off_run.trainable_params for off_run in off]
    assert len({r.trainable_params for r in on}) == 3  # each run kept its own, unpadded, parameters
    assert_same_training(on, off)


def test_masked_layer_norm_is_layer_norm_over_each_runs_own_width():
    """Three runs of widths 8, 5 and 2 padded to 8, as a stacked step feeds them (vmapped over the run axis):
    each run's features are torch's LayerNorm of its own width; the padding is 0 and gets no gradient, whatever
    the padded input holds."""
    g = torch.Generator().manual_seed(0)
    widths, wide = (8, 5, 2), 8
    x = torch.randn(3, 4, 6, wide, generator=g, requires_grad=True)  # (K, B, N, wide): the padding holds noise
    own = [(torch.randn(m, generator=g), torch.randn(m, generator=g)) for m in widths]
    weight = torch.stack([F.pad(w, (0, wide - len(w))) for w, _ in own]).requires_grad_()  # (K, wide)
    bias = torch.stack([F.pad(b, (0, wide - len(b))) for _, b in own]).requires_grad_()
    valid = torch.arange(wide) < torch.tensor(widths)[:, None]  # (K, wide)
    out = vmap(_stacked.masked_layer_norm, in_dims=(0, 0, 0, 0, None))(x, valid, weight, bias, 1e-5)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    for k, (m, (w, b)) in enumerate(zip(widths, own)):
        reference = nn.LayerNorm(m, eps=1e-5)
        with torch.no_grad():
            reference.weight.copy_(w)
            reference.bias.copy_(b)
        torch.testing.assert_close(out[k, ..., :m], reference(x[k, ..., :m]), rtol=1e-6, atol=1e-6)
        assert torch.equal(out[k, ..., m:], torch.zeros_like(out[k, ..., m:]))
        for grad in (x.grad[k, ..., m:], weight.grad[k, m:], bias.grad[k, m:]):
            assert torch.equal(grad, torch.zeros_like(grad))


def test_stacked_runs_draw_their_own_dropout_masks(store, tmp_path):
    """Large dropout makes every mask count: drawn from another stream, or in another order, losses would differ
    from the first step on. Runs of one seed stacked draw the same masks; they train the same."""
    runs = {f"{seed}-{k}": TrainConfig(model={"dropout": 0.6}, lr=5e-3, epochs=1, seed=seed, **COMMON)
            for seed in (0, 1) for k in (0, 1)}
    off = fit_many(with_stack(runs, "off"), store, tmp_path / "off", loader_config=MEMORY, progress=False)
    on = fit_many(with_stack(runs, "on"), store, tmp_path / "on", loader_config=MEMORY, progress=False)
    assert_same_training(on, off)
    assert on[0].history[0]["train_loss"] == on[1].history[0]["train_loss"] != on[2].history[0]["train_loss"]


def test_stacked_runs_on_a_per_token_task_equal_the_runs_in_turn(tagging_store, tmp_path, monkeypatch):
    runs = {**sweep("unipt", {"reduction": 4}, (0.2, 0.4, 0.0)),
            "probe-1": TrainConfig(method="linear_probe", model={"layer": -1}, lr=1e-2, epochs=2, **COMMON),
            "probe-2": TrainConfig(method="linear_probe", model={"layer": -1}, lr=3e-2, epochs=2, seed=4, **COMMON)}
    off = fit_many(with_stack(runs, "off"), tagging_store, tmp_path / "off", loader_config=MEMORY, progress=False)
    passes = capture_steppers(monkeypatch)
    on = fit_many(with_stack(runs, "on"), tagging_store, tmp_path / "on", loader_config=MEMORY, progress=False)
    assert [[run.name for run in s.runs] for s in passes[0]] == [["a", "b", "c"], ["probe-1", "probe-2"]]
    assert on[0].task == "tagging" and all(r.stacked for r in on)
    assert_same_training(on, off)


def test_runs_leave_the_stack_where_their_steps_end(store, tmp_path, monkeypatch):
    runs = {f"stop-{n}": TrainConfig(model={"reduction": 4, "dropout": 0.2}, lr=3e-3, epochs=3, max_steps=n, seed=n,
                                     **COMMON) for n in (3, 11, 12, 0)}
    off = fit_many(with_stack(runs, "off"), store, tmp_path / "off", loader_config=MEMORY, progress=False)
    passes = capture_steppers(monkeypatch)
    on = fit_many(with_stack(runs, "on"), store, tmp_path / "on", loader_config=MEMORY, progress=False)
    assert_same_training(on, off)
    assert [[h["step"] for h in r.history] for r in on] == [[3], [8, 11], [8, 12], [8, 16, 24]]
    # epoch 2 stacks the three runs left; epoch 3 leaves one, which steps alone
    assert [[len(s.runs) if isinstance(s, StackedRuns) else 1 for s in p] for p in passes] == [[4], [3], [1]]


# --------------------------------------------------------------------------- what stacks with what
def test_runs_stack_by_method_shapes_layers_and_stack_mode(store, tmp_path, monkeypatch):
    """UniPT's r (a width: Method.pad_options) stacks padded; other model options, layers, and the shapes of a
    method that does not pad (LST: r splits into attention heads) keep runs apart."""
    on = dict(stack="on", epochs=1, max_steps=1, **COMMON)
    lst = dict(method="lst", **on)
    runs = {
        "r2-a": TrainConfig(model={"reduction": 2, "dropout": 0.1}, **on),
        "r4-a": TrainConfig(model={"reduction": 4}, **on),
        "r2-b": TrainConfig(model={"reduction": 2, "dropout": 0.4}, lr=1e-3, seed=3, **on),  # a dropout sweep stacks
        "r2-off": TrainConfig(model={"reduction": 2}, **{**on, "stack": "off"}),
        "r4-b": TrainConfig(model={"reduction": 4}, weight_decay=0.0, **on),
        "r8": TrainConfig(model={"reduction": 8}, **on),
        "r2-layers": TrainConfig(model={"reduction": 2, "layers": [0, 2]}, **on),  # other layers
        "r2-eps": TrainConfig(model={"reduction": 2, "eps": 1e-6}, **on),  # same shapes, another model
        "r4-eps": TrainConfig(model={"reduction": 4, "eps": 1e-6}, **on),
        "lst-drop-a": TrainConfig(model={"reduction": 4, "num_heads": 2}, **lst),  # attention dropout
        "lst-drop-b": TrainConfig(model={"reduction": 4, "num_heads": 2}, **lst),
        "lst-r2": TrainConfig(model={"reduction": 2, "num_heads": 2, "dropout": 0.0}, **lst),  # other shapes
        "lst-r4": TrainConfig(model={"reduction": 4, "num_heads": 2, "dropout": 0.0}, **lst),
        "probe-0": TrainConfig(method="linear_probe", model={"layer": 0}, **on),
        "probe-2": TrainConfig(method="linear_probe", model={"layer": 2}, **on),  # another layer: same shapes
        "probe-auto": TrainConfig(method="linear_probe", model={"layer": 2}, **{**on, "stack": "auto"}),
    }
    passes = capture_steppers(monkeypatch)
    results = fit_many(runs, store, tmp_path, loader_config=MEMORY, progress=False)
    grouped = [(type(s).__name__, [r.name for r in s.runs]) if hasattr(s, "runs") else s.name for s in passes[0]]
    assert grouped == [("StackedRuns", ["r2-a", "r4-a", "r2-b", "r4-b", "r8"]), "r2-off", "r2-layers",
                       ("StackedRuns", ["r2-eps", "r4-eps"]), "lst-drop-a", "lst-drop-b", "lst-r2", "lst-r4",
                       "probe-0", ("AutoStack", ["probe-2", "probe-auto"])]
    stacked = {r.name for r in results if r.stacked}
    assert stacked == {"r2-a", "r2-b", "r4-a", "r4-b", "r8", "r2-eps", "r4-eps"}  # the auto pair stopped undecided


def test_large_groups_are_split_into_stacks_of_at_most_max_stack(store, tmp_path, monkeypatch):
    monkeypatch.setattr(_stacked, "MAX_STACK", 2)
    runs = {f"s{k}": TrainConfig(model={"reduction": 8}, stack="on", epochs=1, max_steps=1, seed=k, **COMMON)
            for k in range(5)}
    passes = capture_steppers(monkeypatch)
    fit_many(runs, store, tmp_path, loader_config=MEMORY, progress=False)
    assert [[r.name for r in s.runs] if hasattr(s, "runs") else s.name for s in passes[0]] == [
        "s0", ["s1", "s2"], ["s3", "s4"]]


def test_models_with_running_statistics_or_other_random_draws_do_not_stack():
    assert why_not_stackable(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))) is None
    assert "running statistics" in why_not_stackable(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    assert why_not_stackable(nn.Sequential(nn.InstanceNorm1d(2))) is None  # no running statistics
    assert "attention kernel" in why_not_stackable(nn.TransformerEncoderLayer(4, 2, 8, dropout=0.1))
    assert why_not_stackable(nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0)) is None
    assert "not an nn.Dropout" in why_not_stackable(nn.Sequential(nn.AlphaDropout(0.1)))


class NoisyProbe(nn.Module):
    """A linear probe that adds noise in training outside any nn.Dropout: nothing a stacked step can reproduce."""

    def __init__(self, config, layer_widths, head):
        super().__init__()
        self.classifier = nn.Linear(layer_widths[0], head.outputs)

    def forward(self, hidden_states, mask):
        pooled = hidden_states[0].mean(dim=1)
        return self.classifier(F.dropout(pooled, 0.5, self.training))


def test_a_model_drawing_outside_dropout_layers_is_refused_on_and_steps_in_turn_on_auto(store, tmp_path, monkeypatch,
                                                                                        caplog):
    monkeypatch.setitem(_methods.METHODS, "noisy", _methods.Method("noisy", LinearProbeConfig, NoisyProbe))
    runs = {f"n{k}": TrainConfig(method="noisy", model={"layer": 1}, stack="on", epochs=1, seed=k, **COMMON)
            for k in range(2)}
    with pytest.raises(Unstackable, match=r"runs \['n0', 'n1'\] cannot train stacked: their noisy model draws random "
                                          r"numbers outside nn.Dropout .*set stack = \"off\""):
        fit_many(runs, store, tmp_path / "on", loader_config=MEMORY, progress=False)
    off = fit_many(with_stack(runs, "off"), store, tmp_path / "off", loader_config=MEMORY, progress=False)
    passes = capture_steppers(monkeypatch)
    with caplog.at_level(logging.INFO, logger=_stacked.__name__):
        auto = fit_many(with_stack(runs, "auto"), store, tmp_path / "auto", loader_config=MEMORY, progress=False)
    assert passes[0][0].decision == "separate" and "they cannot stack" in caplog.text
    assert [r.stacked for r in auto] == [False, False]
    assert_same_training(auto, off)


# --------------------------------------------------------------------------- auto
@pytest.mark.parametrize("faster", ["stacked", "separate"])
def test_auto_measures_both_ways_then_keeps_the_faster(faster, store, tmp_path, monkeypatch, caplog):
    """A fake clock that a stacked step advances by 1 per token and a run's own step by 0.4 (or 0.6): two runs
    in turn take 0.8 (or 1.2); the measurement is the real one, only the time is made up."""
    now = [0.0]
    monkeypatch.setattr(_stacked, "_clock", lambda: now[0])
    stacked_step, own_step = StackedRuns.train_step, _trainer._Run.train_step

    def timed(step, seconds):
        def run(self, batch):
            step(self, batch)
            now[0] += seconds * int(batch.mask.sum())
        return run

    monkeypatch.setattr(StackedRuns, "train_step", timed(stacked_step, 1.0))
    monkeypatch.setattr(_trainer._Run, "train_step", timed(own_step, 0.6 if faster == "stacked" else 0.4))
    runs = {name: replace(config, epochs=3, max_steps=0) for name, config in sweep("unipt", {"reduction": 4}).items()
            if name != "c"}
    off = fit_many(with_stack(runs, "off"), store, tmp_path / "off", loader_config=MEMORY, progress=False)
    passes = capture_steppers(monkeypatch)
    with caplog.at_level(logging.INFO, logger=_stacked.__name__):
        auto = fit_many(with_stack(runs, "auto"), store, tmp_path / "auto", loader_config=MEMORY, progress=False)

    steppers = [p[0] for p in passes]
    assert all(isinstance(s, AutoStack) for s in steppers)
    # 8 batches a pass: warm-up and 6 timed batches each way end in the second pass, which the third reuses
    assert steppers[0].decision == steppers[1].decision == steppers[2].decision == faster
    assert steppers[2].state["measured"]["stacked"][0] == AutoStack.WARMUP + AutoStack.MEASURE
    speedup = 1.2 if faster == "stacked" else 0.8
    assert f"stacking is {speedup:.2f}x as fast" in caplog.text
    assert caplog.text.count("train stacked" if faster == "stacked" else "train in turn") == 1
    assert [r.stacked for r in auto] == [faster == "stacked"] * 2
    assert_same_training(auto, off)


@pytest.mark.parametrize("reductions, width", [((2, 2, 2), 16), ((2, 4, 8), 32)])  # a padded stack measures too
def test_auto_runs_equal_the_runs_in_turn_and_decide(reductions, width, store, wide_store, tmp_path, monkeypatch):
    store = {16: store, 32: wide_store}[width]
    runs = {name: replace(config, epochs=2, max_steps=0, model=config.model | {"reduction": r})
            for (name, config), r in zip(sweep("unipt", {}).items(), reductions)}
    off = fit_many(with_stack(runs, "off"), store, tmp_path / "off", loader_config=MEMORY, progress=False)
    passes = capture_steppers(monkeypatch)
    auto = fit_many(with_stack(runs, "auto"), store, tmp_path / "auto", loader_config=MEMORY, progress=False)
    assert isinstance(passes[0][0], AutoStack)
    decision = passes[-1][0].decision
    assert decision in ("stacked", "separate")
    assert [r.stacked for r in auto] == [decision == "stacked"] * 3
    assert_same_training(auto, off)


# --------------------------------------------------------------------------- the masks
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_masks_are_drawn_as_torchs_cpu_dropout_draws_them(p):
    x = torch.randn(5, 7, 33)
    torch.manual_seed(3)
    dropped = F.dropout(x, p, training=True)
    after = torch.get_rng_state()
    torch.manual_seed(3)
    mask = _stacked._dropout_mask(tuple(x.shape), x.dtype, p, torch.device("cpu"))
    assert torch.equal(x * mask, dropped) and torch.equal(torch.get_rng_state(), after)
    assert _stacked._dropout_mask((2, 3), torch.float32, 0.0, torch.device("cpu")) is None
