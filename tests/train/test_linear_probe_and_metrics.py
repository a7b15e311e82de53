"""Linear probe pooling, classification metrics, layer resolution and the method registry."""

from __future__ import annotations

import pytest
import torch

from unipt.train import METHODS, LinearProbe, LinearProbeConfig, UniPTConfig, classification_metrics, get_method, resolve_layers
from unipt.train._metrics import confusion_matrix


# --------------------------------------------------------------------------- linear probe
def _probe(pooling: str, normalize: bool, width: int = 3, labels: int = 2) -> LinearProbe:
    probe = LinearProbe(LinearProbeConfig(layer=-1, pooling=pooling, normalize=normalize), [width], labels)
    with torch.no_grad():
        probe.classifier.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 1.0]]))
        probe.classifier.bias.copy_(torch.tensor([0.25, -1.0]))
    return probe


H = torch.tensor(
    [
        [[1.0, 2.0, 3.0], [3.0, 4.0, 5.0], [100.0, -100.0, 7.0]],  # 2 real tokens, 1 padded (garbage)
        [[-2.0, 0.0, 4.0], [9.0, 9.0, 9.0], [9.0, 9.0, 9.0]],  # 1 real token
    ]
)
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)


def test_linear_probe_mean_pooling_by_hand():
    probe = _probe("mean", normalize=False)
    logits = probe([H], MASK)
    # pooled: example 0 = mean of its 2 real tokens = [2, 3, 4]; example 1 = [-2, 0, 4]
    expected = torch.tensor(
        [
            [2.0 - 4.0 + 0.25, 0.5 * 2 + 2 * 3 + 4 - 1.0],
            [-2.0 - 4.0 + 0.25, 0.5 * -2 + 0 + 4 - 1.0],
        ]
    )
    torch.testing.assert_close(logits, expected)


def test_linear_probe_cls_pooling_by_hand():
    probe = _probe("cls", normalize=False)
    logits = probe([H], MASK)
    # pooled = first token: [1, 2, 3] and [-2, 0, 4]
    expected = torch.tensor([[1.0 - 3.0 + 0.25, 0.5 + 4 + 3 - 1.0], [-2.0 - 4.0 + 0.25, -1.0 + 0 + 4 - 1.0]])
    torch.testing.assert_close(logits, expected)


def test_linear_probe_normalize_applies_layernorm_without_affine():
    probe = _probe("mean", normalize=True)
    assert not any(name.startswith("norm") for name, _ in probe.named_parameters())
    pooled = torch.tensor([[2.0, 3.0, 4.0], [-2.0, 0.0, 4.0]])
    mu = pooled.mean(-1, keepdim=True)
    var = pooled.var(-1, unbiased=False, keepdim=True)
    normed = (pooled - mu) / torch.sqrt(var + 1e-5)
    expected = normed @ probe.classifier.weight.T + probe.classifier.bias
    torch.testing.assert_close(probe([H], MASK), expected)


def test_linear_probe_ignores_padding_and_rejects_several_layers():
    probe = _probe("mean", normalize=True)
    h2 = H.clone()
    h2[~MASK] = -1e3
    torch.testing.assert_close(probe([h2], MASK), probe([H], MASK))
    with pytest.raises(ValueError, match="exactly one layer"):
        LinearProbe(LinearProbeConfig(), [3, 3], 2)
    with pytest.raises(ValueError, match="pooling"):
        LinearProbeConfig(pooling="max")
    assert LinearProbeConfig(layer=4).layers == [4]


# --------------------------------------------------------------------------- metrics
def test_classification_metrics_by_hand():
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0])
    # class 3 is never predicted (F1 = 0, still counted); class 4 never occurs at all (skipped)
    cm = confusion_matrix(pred, target, 5)
    assert cm.tolist() == [
        [2, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 2, 0, 0],
        [1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ]
    out = classification_metrics(pred, target, num_labels=5)
    assert out["n"] == 8
    assert out["accuracy"] == pytest.approx(5 / 8)
    # per-class F1 = 2 tp / (support + predicted): 4/6, 2/4, 4/5, 0/1
    assert out["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 4 / 5 + 0.0) / 4)


def test_classification_metrics_edge_cases():
    perfect = classification_metrics(torch.tensor([1, 0, 1]), torch.tensor([1, 0, 1]), num_labels=3)
    assert perfect == {"accuracy": 1.0, "macro_f1": 1.0, "n": 3}
    # all predictions one class: F1 of class 0 = 2*2/(2+4), class 1 = 0
    one = classification_metrics(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 1, 1]), num_labels=2)
    assert one["accuracy"] == pytest.approx(0.5)
    assert one["macro_f1"] == pytest.approx((4 / 6 + 0) / 2)
    empty = classification_metrics(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 3)
    assert empty == {"accuracy": 0.0, "macro_f1": 0.0, "n": 0}


# --------------------------------------------------------------------------- layer resolution
STORED = [0, 2, 4, 6]


def test_resolve_layers_all_and_indices():
    assert resolve_layers("all", STORED) == STORED
    assert resolve_layers([-1], STORED) == [6]
    assert resolve_layers([-4, -2, -1], STORED) == [0, 4, 6]
    assert resolve_layers([2, 6], STORED) == [2, 6]
    assert resolve_layers((0, -1), STORED) == [0, 6]


def test_resolve_layers_errors():
    with pytest.raises(ValueError, match=r"layer 3 is not in the store; it holds layers \[0, 2, 4, 6\]"):
        resolve_layers([0, 3], STORED)
    with pytest.raises(ValueError, match=r"layer -5 is not in the store"):
        resolve_layers([-5], STORED)
    with pytest.raises(ValueError, match="'all'"):
        resolve_layers("last", STORED)


# --------------------------------------------------------------------------- method registry
def test_get_method_known_and_unknown():
    assert get_method("unipt").config_cls is UniPTConfig
    assert get_method("linear_probe").config_cls is LinearProbeConfig
    with pytest.raises(ValueError) as info:
        get_method("lora")
    msg = str(info.value)
    assert "'lora'" in msg
    for name in METHODS:
        assert name in msg
    assert "linear_probe" in msg and "unipt" in msg


def test_make_config_rejects_unknown_keys_naming_valid_ones():
    method = get_method("unipt")
    cfg = method.make_config({"reduction": 4, "layers": [0, -1]})
    assert isinstance(cfg, UniPTConfig) and cfg.reduction == 4 and cfg.layers == [0, -1]
    with pytest.raises(ValueError) as info:
        method.make_config({"reduction": 2, "bogus": 1, "r": 3})
    msg = str(info.value)
    assert "bogus" in msg and "'r'" in msg
    for valid in ("reduction", "out_dim", "layers", "dropout", "eps"):
        assert valid in msg
    with pytest.raises(ValueError, match="pooling"):
        get_method("linear_probe").make_config({"poolin": "cls"})
    # known keys still pass through the config's own validation
    with pytest.raises(ValueError, match="reduction must be"):
        method.make_config({"reduction": 0})
