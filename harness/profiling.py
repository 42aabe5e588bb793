"""Per-case peak memory of this process.

On Linux the kernel keeps the process's peak resident set size (``VmHWM`` in /proc/self/status)
and lets a process reset it by writing ``5`` to /proc/self/clear_refs. :class:`PeakRSS` resets it
before a case and reads it after, so each case gets its own high-water mark, exact and free of
sampling gaps. Where that interface is missing (other systems, restricted containers) it falls back
to a background thread sampling RSS with psutil every few milliseconds.

The figure is the whole process's peak RSS during the case: model weights, the interpreter and
the libraries count, as they do for the challenge's ``/usr/bin/time`` figures.
"""
from __future__ import annotations

import os
import platform
import sys
import threading
from pathlib import Path

import psutil

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for every figure that names its machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def default_threads() -> int:
    """CPUs this process may use (its affinity mask), the thread count a run pins by default."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def pin_threads(threads: int) -> None:
    """Pin torch's intra-op threads if torch is already loaded (segmenters that load it later pin it
    themselves from ``LoadOptions.threads``); this never imports torch."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def _read_hwm_kb() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class PeakRSS:
    """Context manager measuring the peak RSS (MB) reached inside the block: ``with PeakRSS() as p: ...; p.mb``."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.mb: float | None = None
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak = 0

    def __enter__(self) -> "PeakRSS":
        if _reset_hwm() and _read_hwm_kb() is not None:
            self.method = "VmHWM"
        else:
            self.method = "sampler"
            self._proc = psutil.Process()
            self._peak = self._proc.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.method == "VmHWM":
            self.mb = _read_hwm_kb() / 1024.0
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self.mb = self._peak / (1024.0 * 1024.0)
