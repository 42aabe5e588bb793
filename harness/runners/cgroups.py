"""Memory cgroups for the processes that run a segmenter (``--memory`` on the native runner's isolated
worker and on the ``subprocess`` runner).

A cgroup limits *resident* memory (the kernel's own accounting, page cache of the group included), and the
kernel records each out-of-memory kill it makes in the group: the harness can then say "out of memory" with
the kernel's word for it. Each child gets a group of its own, made inside this process's own memory cgroup
(so the limits above it still hold) and removed when the child is done:

* cgroup v1 (a ``memory`` hierarchy, e.g. ``/sys/fs/cgroup/memory``): ``memory.limit_in_bytes`` (and
  ``memory.memsw.limit_in_bytes``, memory plus swap, where swap accounting is on), the peak from
  ``memory.max_usage_in_bytes``, the kills from ``oom_kill`` in ``memory.oom_control``;
* cgroup v2 (the unified hierarchy): ``memory.max`` and ``memory.swap.max``, the peak from ``memory.peak``
  (Linux 5.19+), the kills from ``oom_kill`` in ``memory.events``; this needs the ``memory`` controller
  enabled for this process's cgroup's children (a delegated subtree, e.g. under systemd
  ``Delegate=yes``).

Where neither can be made (no write access, no memory controller, not Linux) the harness falls back to
``RLIMIT_AS`` (:mod:`harness.runners.limits`), a cap on address space rather than resident memory.
``HARNESS_MEMORY_LIMIT=rlimit`` forces that fallback; ``=cgroup`` makes a missing cgroup an error.
The child joins its group itself, between fork and exec (:func:`harness.runners.limits.child_setup`),
so nothing it allocates is charged elsewhere.
"""
from __future__ import annotations

import os
import secrets
import signal
import time
from functools import lru_cache
from pathlib import Path

from harness.runners.base import RunnerError

CGROUP_ROOT = Path("/sys/fs/cgroup")
MODE_ENV = "HARNESS_MEMORY_LIMIT"
MODES = ("auto", "cgroup", "rlimit")
PREFIX = "medsam-harness-"


def memory_limit_mode() -> str:
    """``auto`` (a cgroup where one can be made, else RLIMIT_AS), ``cgroup`` or ``rlimit``, from
    ``$HARNESS_MEMORY_LIMIT``."""
    mode = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise RunnerError(f"{MODE_ENV}={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def _own_paths() -> tuple[Path | None, Path | None]:
    """This process's memory cgroup folder under cgroup v1 and under cgroup v2 (None where absent)."""
    v1 = v2 = None
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if "memory" in controllers.split(","):
            base = CGROUP_ROOT / "memory"
            if (base / rel / "memory.limit_in_bytes").exists():
                v1 = base / rel
        elif controllers == "" and (CGROUP_ROOT / "cgroup.controllers").exists():
            v2 = CGROUP_ROOT / rel
    return v1, v2


def _write(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _field(path: Path, key: str) -> int:
    """``key N`` in a flat-keyed cgroup file (``memory.events``, ``memory.oom_control``); 0 when absent."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _sweep(parent: Path | None) -> None:
    """Remove the empty groups a harness process that no longer runs left in ``parent`` (one killed
    outright cannot remove its own); a group still in use, or another user's, stays."""
    if parent is None:
        return
    try:
        children = [p for p in parent.iterdir() if p.name.startswith(PREFIX) and p.is_dir()]
    except OSError:
        return
    for child in children:
        pid = child.name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            try:
                child.rmdir()  # only an empty group can go
            except OSError:
                pass


class MemoryCgroup:
    """One child's memory cgroup: made with a limit, joined by the child, read for its peak and its OOM
    kills, and removed (:meth:`remove`) when the child is done."""

    def __init__(self, path: Path, version: int, limit: int):
        self.path, self.version, self.limit = path, version, limit

    @classmethod
    def create(cls, limit: int) -> "MemoryCgroup":
        """A new group limited to ``limit`` bytes inside this process's own memory cgroup; OSError (or
        RunnerError) when none can be made here."""
        v1, v2 = _own_paths()
        _sweep(v1)
        _sweep(v2)
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        if v1 is not None:
            path = v1 / name
            path.mkdir()
            group = cls(path, 1, limit)
            try:
                _write(path / "memory.limit_in_bytes", str(limit))
                if (path / "memory.memsw.limit_in_bytes").exists():  # no swapping past the limit either
                    try:
                        _write(path / "memory.memsw.limit_in_bytes", str(limit))
                    except OSError:
                        pass
            except BaseException:
                group.remove()
                raise
            return group
        if v2 is not None:
            control = v2 / "cgroup.subtree_control"
            try:
                enabled = control.read_text().split()
            except OSError as exc:
                raise OSError(f"cannot read {control}: {exc}") from None
            if "memory" not in enabled:
                raise OSError(f"the memory controller is not enabled for the children of {v2} "
                              "(a delegated cgroup v2 subtree is needed)")
            path = v2 / name
            path.mkdir()
            group = cls(path, 2, limit)
            try:
                _write(path / "memory.max", str(limit))
                if (path / "memory.swap.max").exists():
                    try:
                        _write(path / "memory.swap.max", "0")
                    except OSError:
                        pass
            except BaseException:
                group.remove()
                raise
            return group
        raise OSError("no memory cgroup of this process was found (/proc/self/cgroup)")

    @property
    def procs_file(self) -> str:
        """The file a process writes its PID to, to join the group."""
        return str(self.path / "cgroup.procs")

    def peak_bytes(self) -> int | None:
        """The group's peak memory use so far (None where the kernel does not keep one)."""
        return _read_int(self.path / ("memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"))

    def oom_kills(self) -> int:
        """How many processes of the group the kernel's OOM killer has ended."""
        if self.version == 1:
            return _field(self.path / "memory.oom_control", "oom_kill")
        return _field(self.path / "memory.events", "oom_kill")

    def remove(self) -> None:
        """Kill what is still in the group, then remove it (a group can go only once it is empty)."""
        for attempt in range(100):
            try:
                pids = [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
            except FileNotFoundError:
                return
            except (OSError, ValueError):
                pids = []
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.02)  # its last processes are still exiting


@lru_cache(maxsize=1)
def _probe() -> str | None:
    """None when this process can make memory cgroups, else why not (made and removed once, then cached)."""
    try:
        MemoryCgroup.create(1024 ** 3).remove()
    except (OSError, RunnerError) as exc:
        return str(exc) or type(exc).__name__
    return None


def use_cgroup() -> bool:
    """Whether ``--memory`` limits children with a cgroup here (see the module docstring)."""
    mode = memory_limit_mode()
    if mode == "rlimit":
        return False
    why_not = _probe()
    if why_not is not None and mode == "cgroup":
        raise RunnerError(f"{MODE_ENV}=cgroup, but no memory cgroup can be made here: {why_not}")
    return why_not is None
