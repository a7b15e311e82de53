"""UniPT side network (CNN variant) against an independent, loop-based reference of DESIGN.md."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unipt.train.unipt_cnn import UniPTCNN, UniPTCNNClassifier, UniPTCNNConfig, window_size

# MobileNetV2 stages at strides 4, 8, 16, 32 (channels 24, 32, 96, 320): (C, H, W) for a 224 and a 160 input
MOBILENET_224 = [(24, 56, 56), (32, 28, 28), (96, 14, 14), (320, 7, 7)]
MOBILENET_160 = [(24, 40, 40), (32, 20, 20), (96, 10, 10), (320, 5, 5)]
# tiny stage sets for the full-network reference: the same 8/4/2 windows; rectangular windows (H and W
# ratios differ); and a stage already on the anchor's grid (window 1×1)
SQUARE = [(5, 16, 16), (7, 8, 8), (6, 4, 4), (9, 2, 2)]
RECTANGULAR = [(6, 8, 12), (5, 4, 6), (8, 2, 2)]
SAME_GRID = [(4, 6, 9), (6, 3, 3), (7, 3, 3)]


# --------------------------------------------------------------------------- reference implementation
def _conv1x1(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """y[b, o, i, j] = Σ_c W[o, c] x[b, c, i, j] + bias[o]."""
    y = torch.einsum("oc,bcij->boij", conv.weight[:, :, 0, 0], x)
    return y if conv.bias is None else y + conv.bias[None, :, None, None]


def _linear(x: torch.Tensor, lin: torch.nn.Linear) -> torch.Tensor:
    return x @ lin.weight.T + lin.bias


def _batch_norm_eval(x: torch.Tensor, bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    def per_channel(v):
        return v[None, :, None, None]

    return (x - per_channel(bn.running_mean)) / torch.sqrt(per_channel(bn.running_var) + bn.eps) \
        * per_channel(bn.weight) + per_channel(bn.bias)


def reference_pool(model: UniPTCNN, k: int, stage: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Step 1 with an explicit nearest upsampling and a Python loop over examples and windows."""
    b, c, hk, wk = stage.shape
    h, w = anchor.shape[-2:]
    sh, sw = hk // h, wk // w
    assert sh * h == hk and sw * w == wk
    g = torch.relu(_conv1x1(anchor, model.guide[k]))  # (B, C_k, H, W)
    rows, cols = torch.arange(hk) // sh, torch.arange(wk) // sw
    g_up = g[:, :, rows][:, :, :, cols]  # nearest upsampling to (H_k, W_k), by index
    score = (g_up * stage).sum(dim=1)  # Σ_channels(G_k ⊙ C_k)           (B, H_k, W_k)
    pooled = torch.zeros(b, c, h, w, dtype=stage.dtype)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                window = (slice(i * sh, (i + 1) * sh), slice(j * sw, (j + 1) * sw))
                s = torch.relu(score[n][window])
                weights = s / s.abs().sum().clamp_min(model.eps) + 1.0 / (sh * sw)
                pooled[n, :, i, j] = (weights[None] * stage[n][(slice(None), *window)]).sum(dim=(1, 2))
    return pooled


def reference_unipt_cnn(model: UniPTCNN, maps, *, return_parts: bool = False):
    """DESIGN.md, the CNN variant, steps 1-5 in eval mode, looping over stages, layers and query cells."""
    anchor_map = maps[-1]
    pooled = [reference_pool(model, k, c, anchor_map) for k, c in enumerate(maps[:-1])]
    xs = [_batch_norm_eval(_conv1x1(x, seq[0]), seq[1]) for seq, x in zip(model.down, pooled + [anchor_map])]
    b, m, h, w = xs[-1].shape
    tokens = [x.reshape(b, m, h * w).transpose(1, 2) for x in xs]  # (B, N, m) each
    A = tokens[-1]
    zs, cs = [], []
    for X in tokens[:-1]:
        Z = torch.zeros_like(X)
        for n in range(b):
            for q in range(h * w):
                s = torch.relu(X[n] @ A[n, q])  # S_l[q, :]                   (N,)
                p = s / s.abs().sum().clamp_min(model.eps)
                Z[n, q] = p @ X[n] + X[n, q]  # (l1n(S_l) + I)[q, :] · X_l
        zs.append(Z)
        cs.append(_linear(A.mean(1) * X.mean(1), model.gate).squeeze(-1))
    alpha = torch.softmax(torch.stack(cs, dim=1), dim=1)  # (B, L)
    Z = sum(alpha[:, l, None, None] * zs[l] for l in range(len(zs)))
    Z = Z.transpose(1, 2).reshape(b, m, h, w)
    O = xs[-1] + _batch_norm_eval(_conv1x1(Z, model.proj[0]), model.proj[1])
    Y = _conv1x1(torch.relu(O), model.up)
    if return_parts:
        return Y, {"pooled": pooled, "alpha": alpha}
    return Y


# --------------------------------------------------------------------------- helpers
def channels(shapes):
    return [c for c, _, _ in shapes]


def random_maps(shapes, batch=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, h, w, generator=g, dtype=dtype) for c, h, w in shapes]


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter off its default init and give every BatchNorm random running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        for bn in module.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=g, dtype=bn.running_mean.dtype))
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g, dtype=bn.running_var.dtype) * 2 + 0.2)


def make_model(shapes, seed=0, dtype=torch.float64, **kwargs) -> UniPTCNN:
    torch.manual_seed(seed)
    model = UniPTCNN(channels(shapes), **kwargs).to(dtype).eval()
    randomise(model, seed)
    return model


# --------------------------------------------------------------------------- equations
@pytest.mark.parametrize("shapes", [SQUARE, RECTANGULAR, SAME_GRID], ids=["square", "rectangular", "same-grid"])
@pytest.mark.parametrize("reduction,out_dim", [(2, None), (1, 10), (3, 7)])
def test_matches_reference(shapes, reduction, out_dim):
    model = make_model(shapes, seed=reduction, reduction=reduction, out_dim=out_dim)
    maps = random_maps(shapes, batch=3, seed=reduction)
    y = model(maps)
    y_ref, parts = reference_unipt_cnn(model, maps, return_parts=True)
    e = out_dim or shapes[-1][0]
    assert y.shape == y_ref.shape == (3, e, shapes[-1][1], shapes[-1][2])
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    # the check is not vacuous: the output is far from 0, and every target stage's share of Z (alpha_l times
    # values of order 1) is many orders of magnitude above the tolerance
    assert y.abs().max() > 1e-2
    assert torch.all(parts["alpha"] > 1e-6)


def test_matches_reference_float32():
    model = make_model(SQUARE, seed=4, dtype=torch.float32)
    maps = random_maps(SQUARE, batch=2, seed=4, dtype=torch.float32)
    y_ref = reference_unipt_cnn(model.double(), [m.double() for m in maps])
    model.float()
    torch.testing.assert_close(model(maps), y_ref.float(), atol=1e-5, rtol=1e-5)


def test_pooled_stage_feeds_its_own_down_module():
    """The map entering down[k] is P_k for k < L and the raw anchor map for k = L."""
    model = make_model(RECTANGULAR, seed=5)
    maps = random_maps(RECTANGULAR, seed=5)
    seen = {}
    hooks = [down.register_forward_pre_hook(lambda mod, args, k=k: seen.__setitem__(k, args[0].clone()))
             for k, down in enumerate(model.down)]
    model(maps)
    for h in hooks:
        h.remove()
    _, parts = reference_unipt_cnn(model, maps, return_parts=True)
    for k in range(len(RECTANGULAR) - 1):
        torch.testing.assert_close(seen[k], parts["pooled"][k], atol=1e-10, rtol=1e-10)
    assert torch.equal(seen[len(RECTANGULAR) - 1], maps[-1])


# --------------------------------------------------------------------------- window pooling
@pytest.mark.parametrize("shapes,grid", [(MOBILENET_224, 7), (MOBILENET_160, 5)], ids=["224", "160"])
def test_window_pooling_at_two_input_resolutions(shapes, grid):
    """One network, real MobileNetV2 stage shapes: windows 8, 4, 2 onto a 7×7 (224) or 5×5 (160) grid."""
    model = make_model(MOBILENET_224, seed=6)  # built once; the input resolution is only seen at forward time
    maps = random_maps(shapes, batch=2, seed=grid)
    anchor = maps[-1]
    assert [window_size(m.shape, anchor.shape) for m in maps] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    for k, stage in enumerate(maps[:-1]):
        pooled = model.pool(k, stage, anchor)
        assert pooled.shape == (2, shapes[k][0], grid, grid)
        torch.testing.assert_close(pooled, reference_pool(model, k, stage, anchor), atol=1e-10, rtol=1e-10)
    assert model(maps).shape == (2, 320, grid, grid)
    clf = UniPTCNNClassifier(UniPTCNNConfig(dropout=0.0), channels(MOBILENET_160), num_labels=4).double().eval()
    assert clf(maps).shape == (2, 4)


def test_window_size_from_shapes():
    assert window_size((2, 24, 56, 56), (2, 320, 7, 7)) == (8, 8)
    assert window_size((40, 20), (5, 5)) == (8, 4)  # H and W ratios may differ
    assert window_size((3, 3), (3, 3)) == (1, 1)


def window_weight_probe(shapes, seed):
    """A model whose window weights can be read off its pooled maps.

    With the guide conv zero and its bias 1, G_k = 1, so the score is the channel sum of C_k. Channel 0 of
    C_k is all ones (pooled: the window's weight sum); channel 1 + p is the indicator of position p inside
    each window (pooled: the weight of position p); the remaining channels are random, so scores take
    both signs.
    """
    model = make_model(shapes, seed=seed)
    with torch.no_grad():
        for guide in model.guide:
            guide.weight.zero_()
            guide.bias.fill_(1.0)
    maps = random_maps(shapes, batch=2, seed=seed)
    anchor = maps[-1]
    sh, sw = window_size(maps[0].shape, anchor.shape)
    stage = maps[0]
    stage[:, 0] = 1.0
    for p in range(sh * sw):
        indicator = torch.zeros(sh, sw, dtype=stage.dtype)
        indicator[p // sw, p % sw] = 1.0
        stage[:, 1 + p] = indicator.repeat(anchor.shape[-2], anchor.shape[-1])
    return model, stage, anchor, (sh, sw)


@pytest.mark.parametrize("shapes", [[(1 + 4 + 3, 6, 4), (5, 3, 2)], [(1 + 6 + 2, 6, 6), (5, 2, 3)]],
                         ids=["2x2", "3x2"])
def test_window_weights_are_l1n_of_relu_scores_plus_uniform(shapes):
    """In every window: w = l1n(relu(s)) + 1/(s_h·s_w), so Σ w = 2 if some score is positive, else exactly 1."""
    model, stage, anchor, (sh, sw) = window_weight_probe(shapes, seed=20)
    h, w = anchor.shape[-2:]
    # make one window of example 0 all-negative (Σ_c C_k < 0 at each of its cells) and one all-positive
    stage[0, 1 + sh * sw:, :sh, :sw] = -10.0
    stage[0, 1 + sh * sw:, sh:2 * sh, :sw] = 10.0
    pooled = model.pool(0, stage, anchor)  # (B, C, H, W)
    weight_sum = pooled[:, 0]  # (B, H, W)
    weights = pooled[:, 1:1 + sh * sw]  # weight of each window position  (B, s_h·s_w, H, W)

    score = stage.sum(dim=1)  # G_k = 1: the score map is the channel sum   (B, H_k, W_k)
    windows = score.reshape(2, h, sh, w, sw).permute(0, 1, 3, 2, 4).reshape(2, h, w, sh * sw)
    positive = torch.relu(windows)
    any_positive = (windows > 0).any(dim=-1)
    assert any_positive.any() and not any_positive.all()  # both cases occur
    assert not any_positive[0, 0, 0] and torch.all(windows[0, 1, 0] > 0)

    torch.testing.assert_close(weight_sum, 1.0 + any_positive.to(weight_sum.dtype), atol=1e-12, rtol=0)
    expected = positive / positive.sum(-1, keepdim=True).clamp_min(1e-8) + 1.0 / (sh * sw)  # (B, H, W, s²)
    torch.testing.assert_close(weights, expected.permute(0, 3, 1, 2), atol=1e-12, rtol=0)
    assert torch.all(weights >= 1.0 / (sh * sw) - 1e-12)
    # a window with no positive score pools to its plain mean: weights 1/(s_h·s_w) each
    torch.testing.assert_close(pooled[0, :, 0, 0], stage[0, :, :sh, :sw].mean(dim=(1, 2)), atol=1e-12, rtol=0)


def test_no_positive_score_anywhere_is_average_pooling():
    """With G_k = 0 every score is 0: the pooled map is average pooling over the windows."""
    model = make_model(RECTANGULAR, seed=21)
    with torch.no_grad():
        for guide in model.guide:
            guide.weight.zero_()
            guide.bias.fill_(-1.0)
    maps = random_maps(RECTANGULAR, seed=21)
    for k, stage in enumerate(maps[:-1]):
        s = window_size(stage.shape, maps[-1].shape)
        torch.testing.assert_close(model.pool(k, stage, maps[-1]), F.avg_pool2d(stage, s), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("stage_hw,anchor_hw", [((15, 15), (7, 7)), ((14, 15), (7, 7)), ((15, 14), (7, 7)),
                                                ((3, 3), (7, 7)), ((0, 14), (7, 7))])
def test_refuses_non_divisible_shapes(stage_hw, anchor_hw):
    model = make_model([(4, *stage_hw), (6, *anchor_hw)], seed=22)
    maps = [torch.randn(2, 4, *stage_hw, dtype=torch.float64), torch.randn(2, 6, *anchor_hw, dtype=torch.float64)]
    shapes = rf"\(2, 4, {stage_hw[0]}, {stage_hw[1]}\).*\(2, 6, {anchor_hw[0]}, {anchor_hw[1]}\)"
    with pytest.raises(ValueError, match=shapes):
        model(maps)
    with pytest.raises(ValueError, match="whole multiples"):
        window_size(stage_hw, anchor_hw)


def test_refuses_wrong_maps_and_padded_mask():
    model = make_model(SQUARE, seed=23)
    maps = random_maps(SQUARE, seed=23)
    with pytest.raises(ValueError, match="expected 4 stage maps"):
        model(maps[1:])
    with pytest.raises(ValueError, match=r"stage 1 must be a \(2, 7, H, W\).*\(2, 8, 8, 8\)"):
        model([maps[0], torch.randn(2, 8, 8, 8, dtype=torch.float64), *maps[2:]])
    with pytest.raises(ValueError, match=r"stage 0 must be a \(2, 5"):
        model([maps[0][:1], *maps[1:]])
    with pytest.raises(ValueError, match=r"stage 2 must be a"):
        model([maps[0], maps[1], maps[2][0], maps[3]])
    clf = UniPTCNNClassifier(UniPTCNNConfig(), channels(SQUARE), num_labels=3).double().eval()
    assert clf(maps, torch.ones(2, 4, dtype=torch.bool)).shape == (2, 3)
    with pytest.raises(ValueError, match="no padding"):
        clf(maps, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool))


# --------------------------------------------------------------------------- widths and config
def test_widths_follow_config():
    clf = UniPTCNNClassifier(UniPTCNNConfig(reduction=4, out_dim=20, dropout=0.0), channels(SQUARE), num_labels=5)
    side = clf.side
    assert side.out_dim == 20 and side.mapped_dim == 5
    for conv, (c, _, _) in zip(side.guide, SQUARE[:-1]):
        assert conv.weight.shape == (c, SQUARE[-1][0], 1, 1)
    for seq, (c, _, _) in zip(side.down, SQUARE):
        assert seq[0].weight.shape == (5, c, 1, 1) and seq[0].bias is None and seq[1].num_features == 5
    assert side.gate.weight.shape == (1, 5)
    assert side.proj[0].weight.shape == (5, 5, 1, 1) and side.proj[1].num_features == 5
    assert side.up.weight.shape == (20, 5, 1, 1)
    default = UniPTCNN(channels(SQUARE))
    assert default.out_dim == SQUARE[-1][0] and default.mapped_dim == SQUARE[-1][0] // 2


def test_config_validation():
    with pytest.raises(ValueError, match="reduction"):
        UniPTCNNConfig(reduction=0)
    with pytest.raises(ValueError, match="out_dim"):
        UniPTCNNConfig(out_dim=0)
    with pytest.raises(ValueError, match="'all'.*'last'"):
        UniPTCNNConfig(layers="last")
    with pytest.raises(ValueError, match="at least 2 stages"):
        UniPTCNNConfig(layers=[3])
    with pytest.raises(ValueError, match=r"integer stage indices, got \['2'\]"):
        UniPTCNNConfig(layers=[1, "2"])
    with pytest.raises(ValueError, match="dropout"):
        UniPTCNNConfig(dropout=1.0)
    with pytest.raises(ValueError, match="eps"):
        UniPTCNNConfig(eps=0.0)
    assert UniPTCNNConfig(layers=[1, -1]).layers == [1, -1]
    assert UniPTCNNConfig().reduction == 2 and UniPTCNNConfig().layers == "all"
    with pytest.raises(ValueError, match="at least 2 stages"):
        UniPTCNN([16])


# --------------------------------------------------------------------------- training
def test_gradients_reach_every_parameter():
    torch.manual_seed(30)
    clf = UniPTCNNClassifier(UniPTCNNConfig(reduction=2, dropout=0.1), channels(SQUARE), num_labels=3).train()
    randomise(clf, 30)
    maps = [m.requires_grad_() for m in random_maps(SQUARE, batch=4, seed=30, dtype=torch.float32)]
    loss = F.cross_entropy(clf(maps), torch.tensor([0, 2, 1, 2]))
    loss.backward()
    names = [name for name, _ in clf.named_parameters()]
    # guide (w, b) x 3, down (conv w, BN w, b) x 4, gate (w, b), proj (conv w, BN w, b), up (w, b), head (w, b)
    assert len(names) == 2 * 3 + 3 * 4 + 2 + 3 + 2 + 2
    for name, p in clf.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if name != "side.gate.bias":  # softmax over stages is shift-invariant: the shared bias has ~0 gradient
            assert p.grad.abs().max() > 0, name
    for m in maps:
        assert m.grad is not None and torch.isfinite(m.grad).all() and m.grad.abs().max() > 0


def test_a_few_steps_reduce_the_loss():
    """Labels = which channel of the finest stage is shifted up; BatchNorm in train mode."""
    g = torch.Generator().manual_seed(31)
    shapes = [(4, 8, 8), (6, 4, 4), (8, 2, 2)]
    n = 32
    labels = torch.arange(n) % 4
    maps = [torch.randn(n, c, h, w, generator=g) * 0.5 for c, h, w in shapes]
    maps[0][torch.arange(n), labels] += 1.0
    torch.manual_seed(31)
    clf = UniPTCNNClassifier(UniPTCNNConfig(dropout=0.0), channels(shapes), num_labels=4).train()
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(clf(maps), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    clf.eval()
    with torch.no_grad():
        assert (clf(maps).argmax(-1) == labels).float().mean() >= 0.75
