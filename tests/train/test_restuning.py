"""Res-Tuning-Bypass against a loop-based reference of its equations, padding, init, trainer, recipes and sweeps."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import (assert_checkpoint_rebuilds, pad_with_garbage, random_hidden, randomise_params,
                     reference_layer_norm, reference_linear, write_store_recipe, write_tagging_store, write_tiny_store)
from unipt.pipelines.cli import main
from unipt.store import FeatureStore
from unipt.train import (LoaderConfig, ResTuningBypass, ResTuningClassifier, ResTuningConfig, TrainConfig, fit,
                         fit_many, get_method, load_checkpoint, save_checkpoint)
from unipt.train import _stacked, _trainer
from unipt.train._stacked import StackedRuns

WIDTHS = (12, 12, 12, 12)  # the bypass sums its layers: one width D = 12; r = 3 -> bottleneck 4
LOADER = LoaderConfig(mode="memory", background="off")


# --------------------------------------------------------------------------- reference implementation
def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))  # exact GELU, as nn.GELU()


def _adapter(adapter, x: torch.Tensor) -> torch.Tensor:
    """The official ResAdapter: x + up(GELU(down(x)))."""
    return x + reference_linear(_gelu(reference_linear(x, adapter.down)), adapter.up)


def reference_restuning(model: ResTuningClassifier, hidden_states, mask) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """b_0 = H_0; b_i = Lateral_i(H_i) + Vertical_i(b_{i-1}); Y = LN(b_L); logits = W mean(Y) + c, one example
    at a time on its real tokens only (no padding, no masks). Returns the logits and each example's Y (n_b, D)."""
    side = model.side
    logits, ys = [], []
    for b in range(mask.shape[0]):
        real = mask[b].nonzero().squeeze(-1)
        hs = [h[b, real] for h in hidden_states]  # (n_b, D)
        bypass = hs[0]
        for i, h in enumerate(hs[1:]):
            bypass = _adapter(side.lateral[i], h) + _adapter(side.vertical[i], bypass)
        y = reference_layer_norm(bypass, side.norm)
        ys.append(y)
        logits.append(reference_linear(y.mean(0), model.head.classifier))
    return torch.stack(logits), ys


# --------------------------------------------------------------------------- helpers
def make_restuning(widths=WIDTHS, seed=0, labels=3, **config) -> ResTuningClassifier:
    config = {"reduction": 3, "dropout": 0.1, **config}
    torch.manual_seed(seed)
    model = ResTuningClassifier(ResTuningConfig(**config), widths, labels).eval()
    randomise_params(model, seed, scale=0.3)
    return model


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> FeatureStore:
    return write_tiny_store(str(tmp_path_factory.mktemp("restuning") / "store.zarr"), widths=(16, 16, 16))


# --------------------------------------------------------------------------- equations
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no-grad"])
def test_matches_reference_float32(grad):
    model = make_restuning(seed=1)
    hs, mask = random_hidden([5, 1, 3, 5, 2], WIDTHS, seed=1)
    with torch.set_grad_enabled(grad):
        y = model.side(hs, mask)
        logits = model(hs, mask)
    ref_logits, ref_ys = reference_restuning(model, hs, mask)
    assert y.shape == (5, 5, 12) and logits.shape == (5, 3)
    for b, ref_y in enumerate(ref_ys):
        torch.testing.assert_close(y[b][mask[b]], ref_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [{"reduction": 1}, {"bottleneck": 7}, {"zero_init": "all"}])
def test_matches_reference_other_bottlenecks_two_layers_and_a_non_prefix_float_mask(config):
    model = make_restuning(widths=(9, 9), seed=3, **config)
    assert model.side.bottleneck == config.get("bottleneck", 9 // config.get("reduction", 3))
    hs, _ = random_hidden([6, 6], (9, 9), seed=3)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    expected = reference_restuning(model, hs, mask)[0]
    torch.testing.assert_close(model(hs, mask), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(hs, mask.float()), expected, atol=1e-5, rtol=1e-5)


def test_lateral_inputs_are_the_later_layers_and_the_bypass_starts_at_the_first():
    """With every adapter's up-projection at 0 (zero_init = "all") each adapter is the identity, so the bypass is
    the plain sum H_0 + ... + H_L: its output is LayerNorm(sum), and every layer matters."""
    model = ResTuningClassifier(ResTuningConfig(reduction=3, zero_init="all"), WIDTHS, 3).eval()
    hs, mask = random_hidden([4, 2], WIDTHS, seed=4)
    expected = F.layer_norm(sum(hs), (12,))
    torch.testing.assert_close(model.side(hs, mask), expected, atol=1e-6, rtol=1e-6)


def test_initialisation_follows_the_official_res_adapter():
    none = ResTuningBypass([384] * 5, reduction=8)
    assert none.bottleneck == 48 and len(none.lateral) == len(none.vertical) == 4
    bound = math.sqrt(6.0 / (384 + 48))  # xavier_uniform on (48, 384) and (384, 48)
    for adapter in [*none.lateral, *none.vertical]:
        for linear in (adapter.down, adapter.up):
            assert linear.weight.abs().max() <= bound and linear.weight.abs().max() > 0.9 * bound
            assert 0 < linear.bias.abs().max() < 1e-4  # N(0, 1e-6^2)
    last = ResTuningBypass([384] * 5, reduction=8, zero_init="last")  # the official zero_init_last
    for i, (lateral, vertical) in enumerate(zip(last.lateral, last.vertical)):
        for adapter in (lateral, vertical):
            zero = bool(torch.all(adapter.up.weight == 0) and torch.all(adapter.up.bias == 0))
            assert zero == (i == 3), i
            assert adapter.down.weight.abs().max() > 0
    every = ResTuningBypass([384] * 5, bottleneck=32, zero_init="all")
    assert every.bottleneck == 32 and all(torch.all(a.up.weight == 0) for a in [*every.lateral, *every.vertical])


# --------------------------------------------------------------------------- padding, gradients
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no-grad"])
def test_padding_invariance(grad):
    model = make_restuning(seed=5).double()
    hs, mask = random_hidden([4, 1, 3], WIDTHS, seed=5, dtype=torch.float64)
    hs2, mask2 = pad_with_garbage(hs, mask, extra=5, seed=6)
    with torch.set_grad_enabled(grad):
        logits = model(hs, mask)
        torch.testing.assert_close(model(hs2, mask2), logits, atol=1e-10, rtol=1e-10)
        for i, n in enumerate([4, 1, 3]):  # each example alone, unpadded
            alone = model([h[i : i + 1, :n] for h in hs], mask[i : i + 1, :n])
            torch.testing.assert_close(alone, logits[i : i + 1], atol=1e-10, rtol=1e-10)


def test_gradients_reach_every_parameter_and_not_padding():
    model = make_restuning(seed=7, zero_init="all").train()  # randomise_params moves the zeros
    hs, mask = random_hidden([5, 2, 4, 1], WIDTHS, seed=7)
    hs = [h.requires_grad_() for h in hs]
    F.cross_entropy(model(hs, mask), torch.tensor([0, 2, 1, 1])).backward()
    names = [name for name, _ in model.named_parameters()]
    assert "side.lateral.2.up.weight" in names and "side.vertical.0.down.bias" in names and "side.norm.weight" in names
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    for h in hs:
        assert h.grad is not None and torch.all(h.grad[~mask] == 0)  # padded hidden states cannot matter


# --------------------------------------------------------------------------- validation
def test_config_validation():
    for bad, match in [({"reduction": 0}, "reduction must be >= 1, got 0"),
                       ({"bottleneck": 0}, "bottleneck must be positive or None"),
                       ({"layers": "last"}, "'all' or a list"),
                       ({"layers": [3]}, "at least 2 layers"),
                       ({"zero_init": "first"}, r"zero_init must be one of \['none', 'last', 'all'\], got 'first'"),
                       ({"dropout": 1.0}, r"dropout must be in \[0, 1\)")]:
        with pytest.raises(ValueError, match=match):
            ResTuningConfig(**bad)
    cfg = ResTuningConfig()
    assert (cfg.reduction, cfg.bottleneck, cfg.layers, cfg.zero_init) == (8, None, "all", "none")


def test_layers_of_different_widths_are_refused_clearly():
    with pytest.raises(ValueError, match=r"must share one width; the selected layers have widths \[12, 20, 12\]"):
        ResTuningClassifier(ResTuningConfig(), [12, 20, 12], 3)
    with pytest.raises(ValueError, match="at least 2 layers"):
        ResTuningBypass([12])
    model = make_restuning()
    hs, mask = random_hidden([2, 1], WIDTHS[:3])
    with pytest.raises(ValueError, match="expected 4 layers"):
        model(hs, mask)


def test_registered_method():
    method = get_method("restuning")
    assert method.config_cls is ResTuningConfig and method.build is ResTuningClassifier
    assert method.token_outputs and method.layouts == ("tokens",) and method.pad_options == ()
    assert method.make_config({"reduction": 4, "layers": [0, -1]}).reduction == 4
    with pytest.raises(ValueError, match=r"unknown restuning model option\(s\) \['adapter_length'\]; valid: "):
        method.make_config({"adapter_length": 32})


# --------------------------------------------------------------------------- checkpoints, trainer, recipes
def test_checkpoint_round_trip_gives_identical_logits(tiny_store, tmp_path):
    config = {"reduction": 4, "bottleneck": None, "layers": [0, 1, 2], "zero_init": "last", "dropout": 0.1}
    model = ResTuningClassifier(ResTuningConfig(**config), [16, 16, 16], 3).eval()
    randomise_params(model, 8, scale=0.3)
    save_checkpoint(tmp_path / "ckpt", model, method="restuning", model_config=config, layers=[0, 1, 2],
                    layer_widths=[16, 16, 16], store=tiny_store)
    loaded, meta = load_checkpoint(tmp_path / "ckpt")
    assert isinstance(loaded, ResTuningClassifier) and meta["method"] == "restuning"
    hs, mask = random_hidden([3, 5, 1], (16, 16, 16), seed=8)
    torch.testing.assert_close(loaded.eval()(hs, mask), model(hs, mask), atol=0, rtol=0)


def test_fit_learns_and_checkpoint_rebuilds(tiny_store, tmp_path):
    config = TrainConfig(method="restuning", model={"reduction": 4}, lr=3e-3, epochs=4, batch_size=8, warmup=0.0,
                         device="cpu", seed=0)
    result = fit("restuning", tiny_store, config, tmp_path, loader_config=LOADER, progress=False)
    losses = [r["train_loss"] for r in result.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert result.test_metrics["accuracy"] > 0.6  # 3 balanced classes: chance is 1/3
    loaded, meta = load_checkpoint(result.checkpoint)
    assert meta["method"] == "restuning" and meta["layers"] == [0, 1, 2] and loaded.side.bottleneck == 4
    assert_checkpoint_rebuilds(config, tiny_store, result.checkpoint, result.test_metrics, LOADER)


RECIPE_TRAIN = """
[train.bypass]
method = "restuning"
lr = 3e-3
epochs = 2
batch_size = 8
device = "cpu"
model = { reduction = 2, layers = [0, -1], zero_init = "last" }
"""


def test_the_cli_trains_a_recipe_with_a_restuning_run(tiny_store, tmp_path, capsys):
    path = write_store_recipe(tmp_path / "tiny-restuning.toml", tiny_store.url, tmp_path / "work", RECIPE_TRAIN)
    assert main(["train", str(path), "-q"]) == 0
    assert "| bypass " in capsys.readouterr().out
    loaded, meta = load_checkpoint(tmp_path / "work" / "checkpoints" / "bypass")
    assert meta["method"] == "restuning" and meta["layers"] == [0, 2] and meta["model"]["zero_init"] == "last"
    assert isinstance(loaded, ResTuningClassifier) and loaded.side.bottleneck == 8 and len(loaded.side.lateral) == 1


def test_a_tagging_store_trains_per_token(tmp_path):
    store = write_tagging_store(str(tmp_path / "tags.zarr"))
    config = TrainConfig(method="restuning", model={"reduction": 4}, lr=5e-3, epochs=3, batch_size=8, warmup=0.0,
                         device="cpu", seed=0)
    result = fit("restuning", store, config, tmp_path / "run", loader_config=LOADER, progress=False)
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < losses[0] and result.test_metrics["token_accuracy"] > 0.5  # 3 tags: chance is 1/3
    loaded, _ = load_checkpoint(result.checkpoint)
    hs, mask = random_hidden([3, 5], (16, 16, 16), seed=9)
    assert loaded.eval()(hs, mask).shape == (2, 5, 3)  # one score row per token


def test_a_two_run_sweep_trains_stacked_as_it_trains_in_turn(tiny_store, tmp_path, monkeypatch):
    common = dict(method="restuning", batch_size=8, data_seed=5, device="cpu", warmup=0.1, epochs=2)
    runs = {"a": TrainConfig(model={"reduction": 4, "dropout": 0.3}, lr=3e-3, seed=0, **common),
            "b": TrainConfig(model={"reduction": 4, "dropout": 0.0}, lr=1e-3, seed=1, weight_decay=0.1, **common)}
    off = fit_many({k: replace(c, stack="off") for k, c in runs.items()}, tiny_store, tmp_path / "off",
                   loader_config=LOADER, progress=False)
    passes = []
    monkeypatch.setattr(_trainer, "group_steppers", lambda r: passes.append(_stacked.group_steppers(r)) or passes[-1])
    on = fit_many({k: replace(c, stack="on") for k, c in runs.items()}, tiny_store, tmp_path / "on",
                  loader_config=LOADER, progress=False)
    assert [type(s) for s in passes[0]] == [StackedRuns] and [r.stacked for r in on] == [True, True]
    for a, b in zip(on, off):
        assert [h["train_loss"] for h in a.history] == pytest.approx([h["train_loss"] for h in b.history], rel=1e-5)
        assert a.test_metrics == pytest.approx(b.test_metrics, rel=1e-5, abs=1e-6)
