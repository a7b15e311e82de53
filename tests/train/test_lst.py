"""LST encoder side network against a loop-based reference of DESIGN.md, padding, gates, trainer and recipes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import (assert_checkpoint_rebuilds, pad_with_garbage, random_hidden, randomise_params,
                     reference_layer_norm, reference_linear, write_store_recipe, write_tiny_store)
from unipt.pipelines import build_recipe, load_recipe, train_stage
from unipt.store import FeatureStore
from unipt.train import (LST, LoaderConfig, LSTClassifier, LSTConfig, TrainConfig, fit, get_method, load_checkpoint,
                         save_checkpoint)

WIDTHS = (12, 20, 7, 16)  # layers of different widths; D = 16 (the last), r = 2 -> side width 8
LOADER = LoaderConfig(mode="memory", background="off")


# --------------------------------------------------------------------------- reference implementation
def _side_block(block: torch.nn.TransformerEncoderLayer, x: torch.Tensor) -> torch.Tensor:
    """Pre-norm transformer block on one example's real tokens x (n, w), one attention head at a time."""
    attn = block.self_attn
    heads, w = attn.num_heads, x.shape[-1]
    dh = w // heads
    h = reference_layer_norm(x, block.norm1)
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    q, k, v = h @ wq.T + bq, h @ wk.T + bk, h @ wv.T + bv
    outs = []
    for i in range(heads):
        cols = slice(i * dh, (i + 1) * dh)
        scores = q[:, cols] @ k[:, cols].T / math.sqrt(dh)  # (n, n): every key is a real token
        outs.append(torch.softmax(scores, dim=-1) @ v[:, cols])
    x = x + reference_linear(torch.cat(outs, dim=-1), attn.out_proj)
    h = reference_layer_norm(x, block.norm2)
    return x + reference_linear(torch.relu(reference_linear(h, block.linear1)), block.linear2)


def reference_lst(model: LSTClassifier, hidden_states, mask) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """DESIGN.md's LST equations, one example at a time on its real tokens only (no padding, no masks).

    Returns the logits (B, classes) and each example's token outputs Y (n_b, D).
    """
    side = model.side
    logits, ys = [], []
    for b in range(mask.shape[0]):
        real = mask[b].nonzero().squeeze(-1)
        hs = [h[b, real] for h in hidden_states]  # (n_b, D_i)
        s = reference_linear(hs[0], side.first)  # s = W_first · H_0
        for i, h in enumerate(hs[1:]):
            mu = 1.0 / (1.0 + math.exp(-side.alpha[i].item() / side.gate_temperature))
            s = mu * s + (1 - mu) * reference_linear(h, side.down[i])
            s = _side_block(side.blocks[i], s)
        y = reference_linear(reference_layer_norm(s, side.norm), side.up)  # (n_b, D)
        ys.append(y)
        logits.append(reference_linear(y.mean(0), model.head.classifier))
    return torch.stack(logits), ys


# --------------------------------------------------------------------------- helpers
def random_inputs(lengths, widths=WIDTHS, n=None, seed=0, dtype=torch.float32):
    return random_hidden(lengths, widths, n, seed, dtype)


def make_lst(widths=WIDTHS, seed=0, labels=3, **config) -> LSTClassifier:
    config = {"reduction": 2, "num_heads": 2, "dropout": 0.1, **config}
    torch.manual_seed(seed)
    model = LSTClassifier(LSTConfig(**config), widths, labels).eval()
    randomise_params(model, seed, scale=0.3)
    return model


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> FeatureStore:
    return write_tiny_store(str(tmp_path_factory.mktemp("lst") / "store.zarr"), widths=(32, 32, 32))


# --------------------------------------------------------------------------- equations
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no-grad"])  # no-grad eval: torch's fast path
def test_matches_reference_float32(grad):
    model = make_lst(seed=1)
    hs, mask = random_inputs([5, 1, 3, 5, 2], seed=1)
    with torch.set_grad_enabled(grad):
        y = model.side(hs, mask)
        logits = model(hs, mask)
    ref_logits, ref_ys = reference_lst(model, hs, mask)
    assert y.shape == (5, 5, WIDTHS[-1]) and logits.shape == (5, 3)
    for b, ref_y in enumerate(ref_ys):
        torch.testing.assert_close(y[b][mask[b]], ref_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reduction,heads", [(1, 4), (4, 1), (2, 8)])
def test_matches_reference_other_widths_and_heads(reduction, heads):
    model = make_lst(seed=2, reduction=reduction, num_heads=heads)
    assert model.side.side_dim == WIDTHS[-1] // reduction
    hs, mask = random_inputs([4, 2, 3], seed=2)
    torch.testing.assert_close(model(hs, mask), reference_lst(model, hs, mask)[0], atol=1e-5, rtol=1e-5)


def test_matches_reference_with_non_prefix_float_mask_and_two_layers():
    model = make_lst(widths=(9, 6), seed=3, reduction=1, num_heads=3)
    hs, _ = random_inputs([6, 6], widths=(9, 6), seed=3)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    expected = reference_lst(model, hs, mask)[0]
    torch.testing.assert_close(model(hs, mask), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(hs, mask.float()), expected, atol=1e-5, rtol=1e-5)


def test_gates_mix_side_state_and_backbone():
    """mu -> 1 keeps the side state (only H_0 matters); mu -> 0 replaces it with Down_i(H_i) (only H_L matters)."""
    model = make_lst(seed=4)
    hs, mask = random_inputs([4, 3], seed=4)

    def shifted(i):
        return [h + 5.0 if j == i else h for j, h in enumerate(hs)]

    for alpha, matters in [(10.0, 0), (-10.0, len(WIDTHS) - 1)]:  # mu = sigmoid(±100) = 1 or 0 in float32
        with torch.no_grad():
            model.side.alpha.fill_(alpha)
        base = model(hs, mask)
        for i in range(len(WIDTHS)):
            if i == matters:
                assert not torch.allclose(model(shifted(i), mask), base, atol=1e-3), (alpha, i)
            else:
                torch.testing.assert_close(model(shifted(i), mask), base)


def test_gates_start_at_one_half():
    model = LSTClassifier(LSTConfig(), [32] * 7, 3)
    assert model.side.alpha.shape == (6,) and torch.all(model.side.alpha == 0)
    gates = model.side.gates()
    assert not gates.requires_grad
    torch.testing.assert_close(gates, torch.full((6,), 0.5))
    with torch.no_grad():
        model.side.alpha.fill_(0.1)
    torch.testing.assert_close(model.side.gates(), torch.full((6,), 1 / (1 + math.exp(-1.0))))


# --------------------------------------------------------------------------- shapes
def test_widths_and_parameter_shapes():
    model = LSTClassifier(LSTConfig(), [384] * 7, 3)  # MiniLM-like: D = 384, r = 8 -> w = 48
    side = model.side
    assert side.side_dim == 48 and side.out_dim == 384
    assert side.first.weight.shape == (48, 384) and len(side.down) == len(side.blocks) == 6
    block = side.blocks[0]
    assert block.self_attn.num_heads == 4 and block.linear1.weight.shape == (4 * 48, 48) and block.norm_first
    assert side.up.weight.shape == (384, 48) and model.head.classifier.weight.shape == (3, 384)
    hs, mask = random_inputs([3, 1], widths=[384] * 7)
    assert model.eval()(hs, mask).shape == (2, 3)


# --------------------------------------------------------------------------- padding and masking
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no-grad"])
def test_padding_invariance(grad):
    model = make_lst(seed=5).double()
    hs, mask = random_inputs([4, 1, 3], seed=5, dtype=torch.float64)
    hs2, mask2 = pad_with_garbage(hs, mask, extra=5, seed=6)
    with torch.set_grad_enabled(grad):
        logits = model(hs, mask)
        torch.testing.assert_close(model(hs2, mask2), logits, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(model.side(hs2, mask2)[:, :4][mask], model.side(hs, mask)[mask],
                                   atol=1e-10, rtol=1e-10)
        for i, n in enumerate([4, 1, 3]):  # each example alone, unpadded
            alone = model([h[i : i + 1, :n] for h in hs], mask[i : i + 1, :n])
            torch.testing.assert_close(alone, logits[i : i + 1], atol=1e-10, rtol=1e-10)


def test_gradients_reach_every_parameter_and_not_padding():
    model = make_lst(seed=7).train()
    hs, mask = random_inputs([5, 2, 4, 1], seed=7)
    hs = [h.requires_grad_() for h in hs]
    F.cross_entropy(model(hs, mask), torch.tensor([0, 2, 1, 1])).backward()
    names = [name for name, _ in model.named_parameters()]
    assert "side.alpha" in names and any(n.startswith("side.blocks.2.") for n in names)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    for h in hs:
        assert h.grad is not None and torch.all(h.grad[~mask] == 0)  # padded hidden states cannot matter


# --------------------------------------------------------------------------- validation
def test_config_validation():
    for bad, match in [({"reduction": 0}, "reduction must be >= 1, got 0"),
                       ({"layers": "last"}, "'all' or a list"),
                       ({"layers": [3]}, "at least 2 layers"),
                       ({"num_heads": 0}, "num_heads must be >= 1"),
                       ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
                       ({"gate_temperature": 0.0}, "gate_temperature must be positive")]:
        with pytest.raises(ValueError, match=match):
            LSTConfig(**bad)
    cfg = LSTConfig()
    assert cfg.reduction == 8 and cfg.layers == "all" and cfg.gate_temperature == 0.1
    assert LSTConfig(layers=[0, -1]).layers == [0, -1]


def test_model_validation():
    with pytest.raises(ValueError, match=r"num_heads 5 does not divide the side width 48 .*\[1, 2, 3, 4, 6, 8, 12, 16, 24, 48\]"):
        LST([384, 384], reduction=8, num_heads=5)
    with pytest.raises(ValueError, match="at least 2 layers"):
        LST([384])
    model = make_lst()
    hs, mask = random_inputs([2, 1], widths=WIDTHS[:3])
    with pytest.raises(ValueError, match="expected 4 layers"):
        model(hs, mask)


def test_registered_method():
    method = get_method("lst")
    assert method.config_cls is LSTConfig and method.build is LSTClassifier
    assert method.make_config({"reduction": 4, "layers": [0, -1]}).reduction == 4
    with pytest.raises(ValueError, match=r"unknown lst model option\(s\) \['heads'\]; valid: .*'num_heads'"):
        method.make_config({"heads": 2})


# --------------------------------------------------------------------------- checkpoints, trainer, recipes
def test_checkpoint_round_trip_gives_identical_logits(tiny_store, tmp_path):
    config = {"reduction": 4, "layers": [0, 1, 2], "num_heads": 2, "dropout": 0.1, "gate_temperature": 0.1}
    model = LSTClassifier(LSTConfig(**config), [32, 32, 32], 3).eval()
    randomise_params(model, 8, scale=0.3)
    save_checkpoint(tmp_path / "ckpt", model, method="lst", model_config=config, layers=[0, 1, 2],
                    layer_widths=[32, 32, 32], store=tiny_store)
    loaded, meta = load_checkpoint(tmp_path / "ckpt")
    assert isinstance(loaded, LSTClassifier) and meta["method"] == "lst"
    hs, mask = random_inputs([3, 5, 1], widths=(32, 32, 32), seed=8)
    torch.testing.assert_close(loaded.eval()(hs, mask), model(hs, mask), atol=0, rtol=0)
    torch.testing.assert_close(loaded.side.gates(), model.side.gates(), atol=0, rtol=0)


def test_fit_reduces_loss_and_checkpoint_reloads(tiny_store, tmp_path):
    config = TrainConfig(method="lst", model={"reduction": 4, "num_heads": 2}, lr=3e-3, epochs=4, batch_size=8,
                         warmup=0.0, device="cpu", seed=0)
    result = fit("lst", tiny_store, config, tmp_path, loader_config=LOADER, progress=False)
    losses = [r["train_loss"] for r in result.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    loaded, meta = load_checkpoint(result.checkpoint)
    assert meta["method"] == "lst" and meta["layers"] == [0, 1, 2] and meta["model"]["num_heads"] == 2
    assert not torch.allclose(loaded.side.gates(), torch.full((2,), 0.5))  # the trained gates were saved
    assert_checkpoint_rebuilds(config, tiny_store, result.checkpoint, result.test_metrics, LOADER)


RECIPE_TRAIN = """
[train.lst]
method = "lst"
lr = 1e-3
epochs = 1
batch_size = 8
device = "cpu"
model = { reduction = 8, num_heads = 4 }
"""


def test_a_recipe_with_an_lst_run_trains_one_epoch(tiny_store, tmp_path):
    path = write_store_recipe(tmp_path / "tiny-lst.toml", tiny_store.url, tmp_path / "work", RECIPE_TRAIN)
    recipe = load_recipe(str(path))
    assert recipe.train["lst"].method == "lst" and recipe.train["lst"].model == {"reduction": 8, "num_heads": 4}
    (result,) = train_stage(recipe, progress=False)
    assert result.method == "lst" and len(result.history) == 1
    assert result.test_metrics["n"] == tiny_store.num_examples("test")
    loaded, meta = load_checkpoint(tmp_path / "work" / "checkpoints" / "lst")
    assert meta["layers"] == [0, 1, 2] and loaded.side.side_dim == 4


def test_recipe_options_are_validated():
    document = {"source": {"path": "x.csv"}, "backbone": {"model": "m"},
                "train": {"lst": {"method": "lst", "model": {"reduction": 0}}}}
    with pytest.raises(ValueError, match="reduction must be >= 1"):
        build_recipe(document)
    # the shipped recipe takes an LST run as an override, without editing the file
    recipe = load_recipe("tweets-minilm", ["train.lst.method=lst", "train.lst.model={reduction=8}", "train.lst.lr=1e-3"])
    assert recipe.train["lst"].method == "lst" and "unipt" in recipe.train
