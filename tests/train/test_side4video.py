"""Side4Video-style side transformer against a loop-based reference of its equations, side-layer selection,
positions, padding, trainer, recipes and stacked sweeps."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import (assert_checkpoint_rebuilds, pad_with_garbage, random_hidden, randomise_params,
                     reference_layer_norm, reference_linear, write_store_recipe, write_tagging_store, write_tiny_store)
from unipt.pipelines import load_recipe, train_stage
from unipt.store import FeatureStore
from unipt.train import (LoaderConfig, Side4Video, Side4VideoClassifier, Side4VideoConfig, TrainConfig, fit, fit_many,
                         get_method, load_checkpoint, save_checkpoint)
from unipt.train import _stacked, _trainer
from unipt.train._stacked import StackedRuns, why_not_stackable
from unipt.train.side4video import side_layer_indices

WIDTHS = (12, 20, 7, 16, 9, 16)  # layers of different widths; D = 16 (the last), r = 2 -> side width 8
LOADER = LoaderConfig(mode="memory", background="off")


# --------------------------------------------------------------------------- reference implementation
def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _side_block(block, s: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """One example's real tokens s (n, w), one attention head at a time; every key is a real token."""
    if positions is not None:
        s = s + positions
    heads, w = block.num_heads, s.shape[-1]
    dh = w // heads
    qkv = reference_linear(reference_layer_norm(s, block.ln_1), block.qkv)
    q, k, v = qkv[:, :w], qkv[:, w : 2 * w], qkv[:, 2 * w :]
    outs = []
    for i in range(heads):
        cols = slice(i * dh, (i + 1) * dh)
        outs.append(torch.softmax(q[:, cols] @ k[:, cols].T / math.sqrt(dh), dim=-1) @ v[:, cols])
    s = s + reference_linear(torch.cat(outs, dim=-1), block.out)
    return s + reference_linear(_gelu(reference_linear(reference_layer_norm(s, block.ln_2), block.fc)), block.proj)


def reference_side4video(model: Side4VideoClassifier, hidden_states, mask, side_layers):
    """s = Linear_0(LN_0(H_0)); for each side layer l: s = s + Linear_k(LN_k(H_l)), s = SideBlock_k(s); Y = LN(s)
    (+ H_L, Up for "residual"); logits = W mean(Y) + c. ``side_layers`` (positions in hidden_states) is given by
    the test, not read from the model. One example at a time on its real tokens. Returns logits and each Y."""
    side = model.side
    logits, ys = [], []
    for b in range(mask.shape[0]):
        real = mask[b].nonzero().squeeze(-1)
        hs = [h[b, real] for h in hidden_states]  # (n_b, D_l)
        positions = None if side.positions is None else side.positions[: len(real)]  # ranks 0 ... n_b - 1
        s = reference_linear(reference_layer_norm(hs[0], side.first_norm), side.first)
        for k, l in enumerate(side_layers):
            s = s + reference_linear(reference_layer_norm(hs[l], side.norms[k]), side.linears[k])
            s = _side_block(side.blocks[k], s, positions)
        y = reference_layer_norm(s, side.norm)
        if side.output == "residual":
            y = hs[-1] + reference_linear(y, side.up)
        ys.append(y)
        logits.append(reference_linear(y.mean(0), model.head.classifier))
    return torch.stack(logits), ys


# --------------------------------------------------------------------------- helpers
def make_side4video(widths=WIDTHS, seed=0, labels=3, **config) -> Side4VideoClassifier:
    config = {"reduction": 2, "num_heads": 2, "dropout": 0.1, "max_positions": 16, **config}
    torch.manual_seed(seed)
    model = Side4VideoClassifier(Side4VideoConfig(**config), widths, labels).eval()
    randomise_params(model, seed, scale=0.3)
    return model


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> FeatureStore:
    return write_tiny_store(str(tmp_path_factory.mktemp("side4video") / "store.zarr"), widths=(32, 32, 32))


# --------------------------------------------------------------------------- equations
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no-grad"])
def test_matches_reference_float32(grad):
    model = make_side4video(seed=1)  # stride 2 over H_1 ... H_5: side layers H_1, H_3, H_5
    hs, mask = random_hidden([5, 1, 3, 5, 2], WIDTHS, seed=1)
    with torch.set_grad_enabled(grad):
        y = model.side(hs, mask)
        logits = model(hs, mask)
    ref_logits, ref_ys = reference_side4video(model, hs, mask, side_layers=[1, 3, 5])
    assert y.shape == (5, 5, 8) and logits.shape == (5, 3)
    for b, ref_y in enumerate(ref_ys):
        torch.testing.assert_close(y[b][mask[b]], ref_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config, side_layers", [
    ({"stride": 1, "reduction": 4, "num_heads": 1}, [1, 2, 3, 4, 5]),
    ({"stride": 3, "output": "residual", "num_heads": 4}, [2, 5]),
    ({"stride": 2, "max_positions": 0, "reduction": 1}, [1, 3, 5]),
], ids=["every-layer", "residual", "no-positions"])
def test_matches_reference_other_options(config, side_layers):
    model = make_side4video(seed=2, **config)
    assert model.side.side_layers == side_layers
    hs, mask = random_hidden([4, 2, 3], WIDTHS, seed=2)
    torch.testing.assert_close(model(hs, mask), reference_side4video(model, hs, mask, side_layers)[0],
                               atol=1e-5, rtol=1e-5)


def test_matches_reference_with_non_prefix_float_mask_and_two_layers():
    model = make_side4video(widths=(9, 6), seed=3, reduction=1, num_heads=3)
    hs, _ = random_hidden([6, 6], (9, 6), seed=3)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    expected = reference_side4video(model, hs, mask, side_layers=[1])[0]  # positions by rank among real tokens
    torch.testing.assert_close(model(hs, mask), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(hs, mask.float()), expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- side layers, positions, output
def test_side_layers_count_back_from_the_last_as_the_official_interval_mode():
    # 12 blocks: later hidden states H_1 ... H_12; "interval" taps blocks 1, 3, ..., 11 (0-based) = H_2, ..., H_12
    assert [1 + i for i in side_layer_indices(12, 2)] == [2, 4, 6, 8, 10, 12]
    assert [1 + i for i in side_layer_indices(12, 1)] == list(range(1, 13))
    assert [1 + i for i in side_layer_indices(12, 5)] == [2, 7, 12]
    assert side_layer_indices(1, 4) == [0]
    side = Side4Video([768] * 13)  # defaults: r = 2, stride 2, heads = w // 64
    assert side.side_layers == [2, 4, 6, 8, 10, 12] and side.side_dim == 384 and side.num_heads == 6
    assert len(side.blocks) == len(side.linears) == len(side.norms) == 6


def test_layers_skipped_by_the_stride_do_not_matter_and_the_others_do():
    model = make_side4video(seed=4)  # side layers H_1, H_3, H_5 of H_0 ... H_5
    hs, mask = random_hidden([4, 3], WIDTHS, seed=4)
    base = model(hs, mask)
    g = torch.Generator().manual_seed(40)
    for i in range(len(WIDTHS)):  # a random shift per feature (a constant one would vanish in LN_k)
        shifted = model([h + 3.0 * torch.randn(h.shape[-1], generator=g) if j == i else h for j, h in enumerate(hs)],
                        mask)
        if i in (2, 4):
            torch.testing.assert_close(shifted, base, atol=0, rtol=0)
        else:
            assert not torch.allclose(shifted, base, atol=1e-4), i


def test_residual_output_starts_as_the_last_layer():
    model = Side4VideoClassifier(Side4VideoConfig(reduction=2, num_heads=2, output="residual"), WIDTHS, 3).eval()
    hs, mask = random_hidden([4, 2], WIDTHS, seed=5)
    assert model.side.out_dim == 16 and model.head.classifier.weight.shape == (3, 16)
    torch.testing.assert_close(model.side(hs, mask), hs[-1], atol=0, rtol=0)  # Up is zero-initialised
    side = Side4Video(WIDTHS, reduction=2, num_heads=2)
    assert side.out_dim == 8 and not hasattr(side, "up")


def test_examples_longer_than_the_position_table_are_refused():
    model = make_side4video(max_positions=4)
    hs, mask = random_hidden([3, 2], WIDTHS, n=6, seed=6)  # padded past 4, but no example is longer
    torch.testing.assert_close(model(hs, mask), reference_side4video(model, hs, mask, [1, 3, 5])[0],
                               atol=1e-5, rtol=1e-5)
    hs, mask = random_hidden([5, 2], WIDTHS, seed=6)
    with pytest.raises(ValueError, match="an example has 5 tokens, more than max_positions = 4"):
        model(hs, mask)


# --------------------------------------------------------------------------- padding, gradients
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no-grad"])
def test_padding_invariance(grad):
    model = make_side4video(seed=5).double()
    hs, mask = random_hidden([4, 1, 3], WIDTHS, seed=5, dtype=torch.float64)
    hs2, mask2 = pad_with_garbage(hs, mask, extra=5, seed=6)
    with torch.set_grad_enabled(grad):
        logits = model(hs, mask)
        torch.testing.assert_close(model(hs2, mask2), logits, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(model.side(hs2, mask2)[:, :4][mask], model.side(hs, mask)[mask],
                                   atol=1e-10, rtol=1e-10)
        for i, n in enumerate([4, 1, 3]):  # each example alone, unpadded
            alone = model([h[i : i + 1, :n] for h in hs], mask[i : i + 1, :n])
            torch.testing.assert_close(alone, logits[i : i + 1], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("output", ["side", "residual"])
def test_gradients_reach_every_parameter_and_not_padding(output):
    model = make_side4video(seed=7, output=output).train()  # randomise_params moves Up's zeros
    hs, mask = random_hidden([5, 2, 4, 1], WIDTHS, seed=7)
    hs = [h.requires_grad_() for h in hs]
    F.cross_entropy(model(hs, mask), torch.tensor([0, 2, 1, 1])).backward()
    names = [name for name, _ in model.named_parameters()]
    assert "side.positions" in names and any(n.startswith("side.blocks.2.") for n in names)
    assert ("side.up.weight" in names) == (output == "residual")
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    for i, h in enumerate(hs):
        if i in (2, 4):  # layers the stride skips are not read at all
            assert h.grad is None
        else:
            assert h.grad.abs().max() > 0 and torch.all(h.grad[~mask] == 0)  # padded hidden states cannot matter


# --------------------------------------------------------------------------- validation
def test_config_validation():
    for bad, match in [({"reduction": 0}, "reduction must be >= 1, got 0"),
                       ({"layers": "last"}, "'all' or a list"),
                       ({"layers": [3]}, "at least 2 layers"),
                       ({"stride": 0}, "stride must be >= 1, got 0"),
                       ({"num_heads": 0}, "num_heads must be >= 1 or None"),
                       ({"max_positions": -1}, "max_positions must be >= 0"),
                       ({"output": "up"}, r"output must be one of \['side', 'residual'\], got 'up'"),
                       ({"dropout": 1.0}, r"dropout must be in \[0, 1\)")]:
        with pytest.raises(ValueError, match=match):
            Side4VideoConfig(**bad)
    cfg = Side4VideoConfig()
    assert (cfg.reduction, cfg.stride, cfg.num_heads, cfg.output, cfg.layers) == (2, 2, None, "side", "all")


def test_model_validation():
    with pytest.raises(ValueError, match=r"num_heads 5 does not divide the side width 48 .*\[1, 2, 3, 4, 6, 8, 12"):
        Side4Video([384, 384], reduction=8, num_heads=5)
    with pytest.raises(ValueError, match="at least 2 layers"):
        Side4Video([384])
    model = make_side4video()
    hs, mask = random_hidden([2, 1], WIDTHS[:3])
    with pytest.raises(ValueError, match="expected 6 layers"):
        model(hs, mask)


def test_registered_method_and_stackable():
    method = get_method("side4video")
    assert method.config_cls is Side4VideoConfig and method.build is Side4VideoClassifier
    assert method.token_outputs and method.layouts == ("tokens",) and method.pad_options == ()
    assert method.make_config({"stride": 1, "layers": [0, -1]}).stride == 1
    with pytest.raises(ValueError, match=r"unknown side4video model option\(s\) \['side_dim'\]; valid: "):
        method.make_config({"side_dim": 320})
    assert why_not_stackable(make_side4video(dropout=0.3)) is None  # its dropout is nn.Dropout only


# --------------------------------------------------------------------------- checkpoints, trainer, recipes
def test_checkpoint_round_trip_gives_identical_logits(tiny_store, tmp_path):
    config = {"reduction": 4, "layers": [0, 1, 2], "stride": 1, "num_heads": 2, "max_positions": 16,
              "output": "residual", "dropout": 0.1}
    model = Side4VideoClassifier(Side4VideoConfig(**config), [32, 32, 32], 3).eval()
    randomise_params(model, 8, scale=0.3)
    save_checkpoint(tmp_path / "ckpt", model, method="side4video", model_config=config, layers=[0, 1, 2],
                    layer_widths=[32, 32, 32], store=tiny_store)
    loaded, meta = load_checkpoint(tmp_path / "ckpt")
    assert isinstance(loaded, Side4VideoClassifier) and meta["method"] == "side4video"
    hs, mask = random_hidden([3, 5, 1], (32, 32, 32), seed=8)
    torch.testing.assert_close(loaded.eval()(hs, mask), model(hs, mask), atol=0, rtol=0)


def test_fit_learns_and_checkpoint_rebuilds(tiny_store, tmp_path):
    config = TrainConfig(method="side4video", model={"reduction": 4, "stride": 1, "num_heads": 2}, lr=3e-3, epochs=4,
                         batch_size=8, warmup=0.0, device="cpu", seed=0)
    result = fit("side4video", tiny_store, config, tmp_path, loader_config=LOADER, progress=False)
    losses = [r["train_loss"] for r in result.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert result.test_metrics["accuracy"] > 0.6  # 3 balanced classes: chance is 1/3
    loaded, meta = load_checkpoint(result.checkpoint)
    assert meta["method"] == "side4video" and meta["layers"] == [0, 1, 2] and loaded.side.side_layers == [1, 2]
    assert_checkpoint_rebuilds(config, tiny_store, result.checkpoint, result.test_metrics, LOADER)


RECIPE_TRAIN = """
[train.side]
method = "side4video"
lr = 3e-3
epochs = 1
batch_size = 8
device = "cpu"
model = { reduction = 8, output = "residual" }
"""


def test_a_recipe_with_a_side4video_run_trains_one_epoch(tiny_store, tmp_path):
    path = write_store_recipe(tmp_path / "tiny-side4video.toml", tiny_store.url, tmp_path / "work", RECIPE_TRAIN)
    recipe = load_recipe(str(path))
    assert recipe.train["side"].model == {"reduction": 8, "output": "residual"}
    (result,) = train_stage(recipe, progress=False)
    assert result.method == "side4video" and len(result.history) == 1
    assert result.test_metrics["n"] == tiny_store.num_examples("test")
    loaded, meta = load_checkpoint(tmp_path / "work" / "checkpoints" / "side")
    assert meta["layers"] == [0, 1, 2] and loaded.side.side_dim == 4 and loaded.side.side_layers == [2]
    assert loaded.side.num_heads == 1 and loaded.side.out_dim == 32


def test_a_tagging_store_trains_per_token(tmp_path):
    store = write_tagging_store(str(tmp_path / "tags.zarr"))
    config = TrainConfig(method="side4video", model={"reduction": 2, "stride": 1, "num_heads": 2}, lr=5e-3, epochs=3,
                         batch_size=8, warmup=0.0, device="cpu", seed=0)
    result = fit("side4video", store, config, tmp_path / "run", loader_config=LOADER, progress=False)
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < losses[0] and result.test_metrics["token_accuracy"] > 0.5  # 3 tags: chance is 1/3
    loaded, _ = load_checkpoint(result.checkpoint)
    hs, mask = random_hidden([3, 5], (16, 16, 16), seed=9)
    assert loaded.eval()(hs, mask).shape == (2, 5, 3)  # one score row per token


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_a_two_run_sweep_trains_stacked_as_it_trains_in_turn(tiny_store, tmp_path, monkeypatch):
    common = dict(method="side4video", batch_size=8, data_seed=5, device="cpu", warmup=0.1, epochs=2)
    model = {"reduction": 4, "stride": 1, "num_heads": 2}
    runs = {"a": TrainConfig(model=model | {"dropout": 0.3}, lr=3e-3, seed=0, **common),
            "b": TrainConfig(model=model | {"dropout": 0.0}, lr=1e-3, seed=1, weight_decay=0.1, **common)}
    off = fit_many({k: replace(c, stack="off") for k, c in runs.items()}, tiny_store, tmp_path / "off",
                   loader_config=LOADER, progress=False)
    passes = []
    monkeypatch.setattr(_trainer, "group_steppers", lambda r: passes.append(_stacked.group_steppers(r)) or passes[-1])
    on = fit_many({k: replace(c, stack="on") for k, c in runs.items()}, tiny_store, tmp_path / "on",
                  loader_config=LOADER, progress=False)
    assert [type(s) for s in passes[0]] == [StackedRuns] and [r.stacked for r in on] == [True, True]
    for a, b in zip(on, off):  # stacked dropout draws each run's own masks, as alone on CPU
        assert [h["train_loss"] for h in a.history] == pytest.approx([h["train_loss"] for h in b.history], rel=1e-5)
        assert a.test_metrics == pytest.approx(b.test_metrics, rel=1e-5, abs=1e-6)
