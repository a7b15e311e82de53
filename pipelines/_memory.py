"""Peak memory of a block of work, above what the process already held when the block started.

    with PeakMemory(device) as peak:
        train(...)
    peak.bytes            # the most memory the block needed on top of the loaded model and data

On a GPU this is ``torch.cuda.max_memory_allocated`` (after ``reset_peak_memory_stats``) minus what was
allocated at the start. On a CPU it is the process's resident set size (RSS), sampled by a background
thread every ``interval`` seconds and whenever the caller calls :meth:`PeakMemory.sample` (e.g. right
before ``loss.backward()``, when the autograd graph holds every activation), minus the RSS at the start.
``/proc/self/status``'s VmHWM cannot be reset, so it would report the high-water mark of model loading
instead of training; sampling is the honest measure. Before the baseline is taken, garbage is collected
and glibc is asked to hand freed heap pages back to the OS (``malloc_trim``), so memory that training
reuses from earlier, already-freed allocations still shows up as growth.

On a CPU it also tracks the peak of the bytes the program has *allocated* (glibc's ``mallinfo2``: heap bytes in
use plus mmapped blocks), sampled alike: the CPU analogue of ``torch.cuda.max_memory_allocated``. RSS also
counts what the allocator keeps after a free (glibc keeps freed heap blocks for reuse, and tensors whose
size changes from batch to batch fragment the heap), which on a CPU can exceed what training needs at any
moment: measured on the demo store, a streaming UniPT epoch peaked at ~660 MB of RSS above idle but ~400 MB
when glibc was told to return every large block (``MALLOC_MMAP_THRESHOLD_=131072``, at 2x the step time).

One-off process costs land in the first block that pays them: the first backward pass, the first
optimiser step, lazily loaded kernels and thread pools (≈ 8–18 MB on the 2-core CPU box, tiny models).
To compare methods, measure each in a fresh process, or after the same warm-up in each.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading

import psutil
import torch


class PeakMemory:
    """Context manager measuring the peak memory a block needs above the process's memory at its start."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.005):
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"PeakMemory measures 'cpu' (process RSS) or 'cuda' devices, got {self.device}")
        if interval <= 0:
            raise ValueError(f"interval must be positive seconds, got {interval}")
        self.interval = interval
        self.baseline_bytes = 0  # RSS (CPU) or allocated bytes (CUDA) when the block started
        self.peak_bytes = 0  # the highest RSS sampled / max_memory_allocated during the block
        self.baseline_allocated = self.peak_allocated = 0  # CPU: glibc's allocated bytes (0 where unknown)
        self.samples = 0  # RSS readings taken (CPU)
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        """Peak memory during the block above the memory held at its start (never negative)."""
        return max(0, self.peak_bytes - self.baseline_bytes)

    @property
    def allocated_bytes(self) -> int | None:
        """Peak allocated bytes above the start: CUDA's max_memory_allocated, or on a CPU glibc's count of
        bytes in use (None where the C library does not report it)."""
        if self.device.type == "cuda":
            return self.bytes
        if _mallinfo2 is None:
            return None
        return max(0, self.peak_allocated - self.baseline_allocated)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = self.peak_bytes = torch.cuda.memory_allocated(self.device)
            return self
        gc.collect()
        _trim_heap()
        self.baseline_bytes = self.peak_bytes = self._rss()
        self.baseline_allocated = self.peak_allocated = _allocated()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample_until_stopped, name="unipt-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.sample()

    def sample(self) -> None:
        """Take one reading now (CPU); call it where memory peaks so a short spike is never missed."""
        if self.device.type == "cuda":
            return  # the CUDA allocator tracks its own peak exactly
        rss, allocated = self._rss(), _allocated()
        with self._lock:
            self.samples += 1
            self.peak_bytes = max(self.peak_bytes, rss)
            self.peak_allocated = max(self.peak_allocated, allocated)

    def _rss(self) -> int:
        return int(self._process.memory_info().rss)

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _find_mallinfo2():
    name = ctypes.util.find_library("c")
    try:
        function = ctypes.CDLL(name).mallinfo2 if name else None
    except (OSError, AttributeError):  # not glibc >= 2.33
        return None
    if function is not None:
        function.restype = _Mallinfo2
    return function


_mallinfo2 = _find_mallinfo2()


def _allocated() -> int:
    """Bytes the program has allocated through malloc and not freed: heap blocks in use (every arena) plus
    mmapped blocks; 0 where glibc's mallinfo2 is missing."""
    if _mallinfo2 is None:
        return 0
    info = _mallinfo2()
    return int(info.uordblks + info.hblkhd)


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc only; elsewhere a no-op)."""
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return
    trim(0)
