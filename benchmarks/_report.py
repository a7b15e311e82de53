"""Shared by the benchmark scripts: describe the machine, replace a marked section of a Markdown file."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def section(name: str, lines: list[str]) -> str:
    return "\n".join([f"<!-- {name}:begin -->", *lines, f"<!-- {name}:end -->"])


def write_section(path: str | Path, name: str, text: str) -> None:
    """Replace the ``name`` section of the Markdown file at ``path`` (append it if absent)."""
    path = Path(path)
    document = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"<!-- {name}:begin -->.*?<!-- {name}:end -->", re.S)
    if pattern.search(document):
        document = pattern.sub(lambda _: text, document)
    else:
        document = document.rstrip() + "\n\n" + text + "\n"
    path.write_text(document)


def publish(name: str, lines: list[str], write: str | None) -> None:
    """Print the section, and replace it in the Markdown file ``write`` when given."""
    text = section(name, lines)
    print(text)
    if write:
        write_section(write, name, text)
