"""UniPT side network (transformer variant) against an independent, loop-based reference of DESIGN.md."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import conftest
from conftest import pad_with_garbage, random_hidden, reference_layer_norm, reference_linear
from unipt.train import UniPT, UniPTClassifier, UniPTConfig

WIDTHS = (12, 7, 20, 16)  # layers of different widths; the last (16) is the anchor


# --------------------------------------------------------------------------- reference implementation
def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_M(X) = sum_n M_n X_n / max(sum_n M_n, 1); x (B, N, m), mask (B, N)."""
    total = (x * mask[:, :, None]).sum(1)
    return total / mask.sum(1, keepdim=True).clamp_min(1.0)


def _l1n(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / x.abs().sum(-1, keepdim=True).clamp_min(eps)


def reference_unipt(model: UniPT, hidden_states, mask, *, return_parts: bool = False):
    """DESIGN.md, "The UniPT side network", steps 1-5, with a plain Python loop over target layers."""
    M = mask.to(hidden_states[0].dtype)
    # 1. X_l = LayerNorm_l(Linear_l(H_l))
    xs = [reference_layer_norm(reference_linear(h, seq[0]), seq[1]) for seq, h in zip(model.down, hidden_states)]
    # 2. anchor
    A = xs[-1]
    a = _masked_mean(A, M)
    n = A.shape[1]
    eye = torch.eye(n, dtype=A.dtype)
    zs, cs, ps = [], [], []
    for X in xs[:-1]:
        # 3. S_l = relu(A X_l^T) * M[:, None, :]; P_l = l1n(S_l) + I; Z_l = P_l X_l
        S = torch.relu(A @ X.transpose(1, 2)) * M[:, None, :]
        P = _l1n(S, model.eps) + eye
        zs.append(P @ X)
        ps.append(P)
        # 4. t_l = mean_M(X_l); c_l = g(a * t_l)
        t = _masked_mean(X, M)
        cs.append(reference_linear(a * t, model.gate).squeeze(-1))
    alpha = torch.softmax(torch.stack(cs, dim=1), dim=1)  # (B, L)
    Z = sum(alpha[:, l, None, None] * zs[l] for l in range(len(zs)))
    # 5. O = A + Proj(Z); Y = up(relu(O))
    O = A + reference_layer_norm(reference_linear(Z, model.proj[0]), model.proj[1])
    Y = reference_linear(torch.relu(O), model.up)
    if return_parts:
        return Y, {"xs": xs, "P": ps, "alpha": alpha, "Z": Z}
    return Y


# --------------------------------------------------------------------------- helpers
def random_inputs(lengths, widths=WIDTHS, n=None, seed=0, dtype=torch.float64):
    return random_hidden(lengths, widths, n, seed, dtype)


def randomise_params(module: torch.nn.Module, seed: int = 0) -> None:
    conftest.randomise_params(module, seed, scale=0.3)


def make_model(widths=WIDTHS, seed=0, **kwargs) -> UniPT:
    torch.manual_seed(seed)
    model = UniPT(widths, **kwargs).double().eval()
    randomise_params(model, seed)
    return model


class CaptureInput:
    """Forward pre-hook that records the input of a module (here: Z entering Proj)."""

    def __init__(self, module):
        self.value = None
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.value = args[0].detach().clone()


# --------------------------------------------------------------------------- equations
@pytest.mark.parametrize("reduction", [1, 2, 3])
def test_matches_reference_on_ragged_batch(reduction):
    model = make_model(reduction=reduction)
    hs, mask = random_inputs([5, 1, 3, 5, 2], seed=reduction)
    y = model(hs, mask)
    y_ref = reference_unipt(model, hs, mask)
    assert y.shape == y_ref.shape == (5, 5, WIDTHS[-1])
    real = mask[..., None].expand_as(y)
    torch.testing.assert_close(y[real], y_ref[real], atol=1e-5, rtol=1e-5)
    # the whole tensor (padded rows included) follows the same function
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_matches_reference_float32_and_bool_or_float_mask():
    torch.manual_seed(1)
    model = UniPT(WIDTHS, reduction=2).eval()
    randomise_params(model, 1)
    hs, mask = random_inputs([4, 2, 3], seed=1, dtype=torch.float32)
    y_ref = reference_unipt(model, hs, mask)
    torch.testing.assert_close(model(hs, mask), y_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model(hs, mask.float()), y_ref, atol=1e-5, rtol=1e-4)


def test_matches_reference_with_non_prefix_mask_and_two_layers():
    model = make_model(widths=(9, 6), reduction=2, seed=3)
    hs, _ = random_inputs([6, 6], widths=(9, 6), seed=3)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(model(hs, mask), reference_unipt(model, hs, mask), atol=1e-5, rtol=1e-5)


def test_reference_is_not_trivially_equal():
    """Guards the reference check itself: dropping the identity term or the key mask changes the output."""
    model = make_model()
    hs, mask = random_inputs([5, 2, 4], seed=4)
    y = model(hs, mask)
    _, parts = reference_unipt(model, hs, mask, return_parts=True)
    z_no_identity = sum(parts["alpha"][:, l, None, None] * (parts["P"][l] - torch.eye(5)) @ parts["xs"][l]
                        for l in range(len(WIDTHS) - 1))
    cap = CaptureInput(model.proj)
    model(hs, mask)
    assert not torch.allclose(cap.value, z_no_identity, atol=1e-3)
    torch.testing.assert_close(cap.value, parts["Z"], atol=1e-8, rtol=1e-8)
    assert y.abs().max() > 1e-2


# --------------------------------------------------------------------------- shapes
def test_default_output_width_is_last_layer_width():
    model = make_model()
    hs, mask = random_inputs([3, 2], seed=5)
    y = model(hs, mask)
    assert y.shape == (2, 3, WIDTHS[-1])
    assert model.out_dim == WIDTHS[-1]
    assert model.mapped_dim == WIDTHS[-1] // 2


@pytest.mark.parametrize("out_dim,reduction,m", [(24, 2, 12), (24, 4, 6), (30, 1, 30), (10, 3, 3), (8, 16, 1)])
def test_out_dim_and_reduction_set_widths(out_dim, reduction, m):
    model = make_model(out_dim=out_dim, reduction=reduction)
    assert model.out_dim == out_dim and model.mapped_dim == m
    for seq, d in zip(model.down, WIDTHS):
        assert seq[0].weight.shape == (m, d)
        assert seq[1].weight.shape == (m,)
    assert model.gate.weight.shape == (1, m)
    assert model.proj[0].weight.shape == (m, m)
    assert model.up.weight.shape == (out_dim, m)
    hs, mask = random_inputs([4, 1, 2], seed=6)
    y = model(hs, mask)
    assert y.shape == (3, 4, out_dim)
    torch.testing.assert_close(y, reference_unipt(model, hs, mask), atol=1e-5, rtol=1e-5)


def test_classifier_uses_config():
    cfg = UniPTConfig(reduction=4, out_dim=20, dropout=0.0)
    clf = UniPTClassifier(cfg, WIDTHS, num_labels=5).double().eval()
    assert clf.side.out_dim == 20 and clf.side.mapped_dim == 5
    hs, mask = random_inputs([3, 1], seed=7)
    assert clf(hs, mask).shape == (2, 5)


# --------------------------------------------------------------------------- padding and masking
def test_padding_invariance_side_network_and_classifier():
    torch.manual_seed(0)
    clf = UniPTClassifier(UniPTConfig(reduction=2, dropout=0.1), WIDTHS, num_labels=3).double().eval()
    randomise_params(clf, 8)
    hs, mask = random_inputs([4, 1, 3], seed=8)
    hs2, mask2 = pad_with_garbage(hs, mask, extra=5, seed=9)
    y, y2 = clf.side(hs, mask), clf.side(hs2, mask2)
    assert y2.shape == (3, 9, WIDTHS[-1])
    torch.testing.assert_close(y2[:, :4][mask], y[mask], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(clf(hs2, mask2), clf(hs, mask), atol=1e-10, rtol=1e-10)
    # each example alone, unpadded, gives the same logits as inside the padded batch
    logits = clf(hs2, mask2)
    for i, n in enumerate([4, 1, 3]):
        alone = clf([h[i : i + 1, :n] for h in hs], mask[i : i + 1, :n])
        torch.testing.assert_close(alone, logits[i : i + 1], atol=1e-10, rtol=1e-10)


def test_padded_key_values_do_not_matter():
    model = make_model()
    hs, mask = random_inputs([5, 3, 2], seed=10)
    hs_b = [h.clone() for h in hs]
    g = torch.Generator().manual_seed(11)
    for h in hs_b:
        h[~mask] = torch.randn(int((~mask).sum()), h.shape[-1], generator=g, dtype=h.dtype) * 100
    assert not torch.equal(hs_b[0], hs[0])
    y, y_b = model(hs, mask), model(hs_b, mask)
    torch.testing.assert_close(y_b[mask], y[mask], atol=1e-10, rtol=1e-10)


def test_masked_key_column_gets_zero_weight():
    """A key column masked for every example contributes nothing: removing it entirely gives the same outputs."""
    model = make_model(seed=12)
    hs, _ = random_inputs([6, 6, 6], seed=12)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[:, 2] = False  # column 2 masked everywhere (a hole, not trailing padding)
    mask[1, 5] = False
    keep = [0, 1, 3, 4, 5]
    cap = CaptureInput(model.proj)
    y = model(hs, mask)
    z = cap.value
    y_removed = model([h[:, keep] for h in hs], mask[:, keep])
    z_removed = cap.value
    torch.testing.assert_close(y[:, keep], y_removed, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(z[:, keep], z_removed, atol=1e-10, rtol=1e-10)
    # and the reference's attention rows give column 2 exactly zero weight (l1n part of P, off the diagonal)
    _, parts = reference_unipt(model, hs, mask, return_parts=True)
    for P in parts["P"]:
        attn = P - torch.eye(6)
        assert torch.all(attn[:, :, 2][:, [0, 1, 3, 4, 5]] == 0)
        # rows over real keys sum to 1 (l1 normalised) unless every score is zero
        sums = attn[mask].sum(-1)
        assert torch.all(((sums - 1).abs() < 1e-9) | (sums == 0))


def test_masked_means_ignore_padding():
    """t_l and a only see real tokens: with two target layers, alpha (hence Z) is padding-independent."""
    model = make_model(widths=(5, 8, 6), seed=13)
    hs, mask = random_inputs([3, 1], widths=(5, 8, 6), seed=13)
    hs2, mask2 = pad_with_garbage(hs, mask, extra=4, seed=14)
    _, parts = reference_unipt(model, hs, mask, return_parts=True)
    _, parts2 = reference_unipt(model, hs2, mask2, return_parts=True)
    torch.testing.assert_close(parts["alpha"], parts2["alpha"], atol=1e-10, rtol=1e-10)
    cap = CaptureInput(model.proj)
    model(hs2, mask2)
    torch.testing.assert_close(cap.value[:, :3][mask], parts["Z"][mask], atol=1e-10, rtol=1e-10)


# --------------------------------------------------------------------------- identity term
def test_identity_term_when_scores_are_all_zero():
    """With A . X_l^T <= 0 everywhere, S_l = 0, so P_l = I and Z = X_0 exactly (single target layer)."""
    model = make_model(widths=(10, 7), reduction=1, seed=15)
    m = model.mapped_dim
    with torch.no_grad():
        # anchor A = all ones (LN weight 0, bias 1)
        model.down[1][1].weight.zero_()
        model.down[1][1].bias.fill_(1.0)
        # X_0 = w * normalised - 0.5: the normalised part sums to 0 over features, so A . X_0 = -0.5 m < 0
        model.down[0][1].weight.fill_(1.3)
        model.down[0][1].bias.fill_(-0.5)
    hs, mask = random_inputs([4, 2, 3], widths=(10, 7), seed=15)
    x0 = reference_layer_norm(reference_linear(hs[0], model.down[0][0]), model.down[0][1])
    anchor = torch.ones(m, dtype=torch.float64)
    assert torch.all(x0 @ anchor < 0)
    assert x0.std() > 0.5  # X_0 is not a constant: the check below is not vacuous
    cap = CaptureInput(model.proj)
    y = model(hs, mask)
    torch.testing.assert_close(cap.value, x0, atol=1e-10, rtol=1e-10)  # Z = alpha(=1) * (0 + I) X_0
    torch.testing.assert_close(y, reference_unipt(model, hs, mask), atol=1e-10, rtol=1e-10)


def test_identity_term_plus_attention_with_single_target():
    """Z = l1n(S) X_0 + X_0: check against the explicit formula for one target layer."""
    model = make_model(widths=(10, 7), reduction=1, seed=16)
    hs, mask = random_inputs([4, 3], widths=(10, 7), seed=16)
    with torch.no_grad():
        x0 = reference_layer_norm(reference_linear(hs[0], model.down[0][0]), model.down[0][1])
        a = reference_layer_norm(reference_linear(hs[1], model.down[1][0]), model.down[1][1])
    expected = []
    for b in range(2):
        rows = []
        for q in range(4):
            s = torch.stack([torch.relu(a[b, q] @ x0[b, k]) * mask[b, k] for k in range(4)])
            w = s / max(float(s.abs().sum()), 1e-8)
            rows.append((w[:, None] * x0[b]).sum(0) + x0[b, q])
        expected.append(torch.stack(rows))
    cap = CaptureInput(model.proj)
    model(hs, mask)
    torch.testing.assert_close(cap.value, torch.stack(expected), atol=1e-10, rtol=1e-10)


# --------------------------------------------------------------------------- gradients
def test_gradients_reach_every_parameter():
    torch.manual_seed(17)
    clf = UniPTClassifier(UniPTConfig(reduction=2, dropout=0.1), WIDTHS, num_labels=4).train()
    randomise_params(clf, 17)
    hs, mask = random_inputs([5, 2, 4, 1], seed=17, dtype=torch.float32)
    hs = [h.requires_grad_() for h in hs]
    labels = torch.tensor([0, 3, 1, 2])
    loss = F.cross_entropy(clf(hs, mask), labels)
    loss.backward()
    names = [name for name, _ in clf.named_parameters()]
    assert any(n.startswith("side.gate") for n in names) and any(n.startswith("head.") for n in names)
    assert len(names) == 2 * 2 * len(WIDTHS) + 2 + 4 + 2 + 2
    for name, p in clf.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if name != "side.gate.bias":  # softmax over layers is shift-invariant: the shared bias has ~0 gradient
            assert p.grad.abs().max() > 0, name
    for h in hs:
        assert h.grad is not None and torch.isfinite(h.grad).all()
        assert torch.all(h.grad[~mask] == 0)  # padded hidden states cannot influence the loss


# --------------------------------------------------------------------------- validation
def test_config_validation():
    with pytest.raises(ValueError, match="reduction"):
        UniPTConfig(reduction=0)
    with pytest.raises(ValueError, match="at least 2 layers"):
        UniPTConfig(layers=[3])
    with pytest.raises(ValueError, match="at least 2 layers"):
        UniPTConfig(layers=[])
    with pytest.raises(ValueError, match="'all'"):
        UniPTConfig(layers="last")
    with pytest.raises(ValueError, match="out_dim"):
        UniPTConfig(out_dim=0)
    with pytest.raises(ValueError, match="dropout"):
        UniPTConfig(dropout=1.0)
    assert UniPTConfig(layers=[0, -1]).layers == [0, -1]
    assert UniPTConfig().reduction == 2 and UniPTConfig().layers == "all"


def test_model_rejects_single_layer():
    with pytest.raises(ValueError, match="at least 2 layers"):
        UniPT([16])
