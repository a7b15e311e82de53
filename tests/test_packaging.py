"""The wheel ships every subpackage: pyproject.toml lists them by name (the folders are mapped, not found),
so a new method folder that is not listed would import in an editable install and be missing from a wheel."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {}
    for package, folder in setuptools["package-dir"].items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            relative = init.parent.relative_to(ROOT / folder)
            folders[".".join([package, *relative.parts])] = init.parent
    missing = sorted(set(folders) - set(setuptools["packages"]))
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"
    stale = sorted(p for p in setuptools["packages"] if p not in folders
                   and not any(p == f"{pkg}.{sub}" for pkg in folders for sub in ("recipes",)))
    assert not stale, f"pyproject.toml lists packages with no folder: {stale}"
