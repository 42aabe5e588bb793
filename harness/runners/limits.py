"""Limits on the processes that run a segmenter: ``--timeout`` and ``--memory`` per case, a child that dies
with its parent, and how such a process's death is described.

Used by the native runner's isolated worker (:mod:`harness.runners.isolated`) and the ``subprocess``
runner; the ``docker`` runner limits its containers through the engine instead.

* **Dies with its parent.** Each child is started with Linux's ``PR_SET_PDEATHSIG`` set to SIGKILL (in
  ``preexec_fn``, before ``exec``), so a harness killed by SIGKILL (or the OOM killer) takes its children
  with it. Linux sends that signal when the *thread* that started the child ends, so children are started
  from the driver's main thread.
* **Memory.** ``--memory`` puts each child in a memory cgroup of its own where this process can make one
  (:mod:`harness.runners.cgroups`: resident memory, as docker's limit; past it the kernel's OOM killer
  ends the child and counts the kill in the group). Elsewhere it is applied as ``RLIMIT_AS`` in the
  child: a cap on its *address space* (virtual memory), not its resident memory. An allocation past it
  fails (Python raises MemoryError) instead of the kernel killing the process. Runtimes that reserve
  large virtual areas up front (some GPU drivers, JITs, allocators with big arenas, many threads'
  stacks) can hit that cap while using far less physical memory; give them a larger ``--memory`` or run
  them where cgroups can be made. Records and messages say which applied (``1 GiB (cgroup)``, ``1 GiB
  (RLIMIT_AS)``).
* **Out of memory, only with evidence.** A failure is put down to memory only when the limit says so (the
  cgroup's count of OOM kills; under RLIMIT_AS a failed allocation: MemoryError, ENOMEM, bad_alloc, or an
  address space that reached it) or the kernel logged an OOM kill of that very process (``dmesg``, where
  this process may read it; else nothing is said about memory).
"""
from __future__ import annotations

import ctypes
import os
import re
import resource
import signal
import subprocess
from dataclasses import dataclass
from typing import Callable

from harness.runners.base import RunnerError
from harness.runners.cgroups import MemoryCgroup, use_cgroup

PR_SET_PDEATHSIG = 1

try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: preexec_fn must not load libraries
except (OSError, AttributeError):  # not Linux
    _prctl = None

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", re.IGNORECASE)
MIN_MEMORY = 64 * 1024 ** 2


def parse_memory(text: str) -> int:
    """Bytes of a memory size as docker writes them: ``4g``, ``512m``, ``1.5G``, ``512MB``, ``1073741824``
    (k, m, g, t are powers of 1024)."""
    match = _SIZE.fullmatch(str(text))
    if not match:
        raise RunnerError(f"--memory {text!r}: expected a size such as 4g, 512m or 1073741824")
    value = int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2).lower() or " "))
    if value < MIN_MEMORY:
        raise RunnerError(f"--memory {text!r}: a Python process needs more than that; give at least 64m")
    return value


def format_bytes(value: int) -> str:
    """``4 GiB``, ``1.5 GiB``, ``512 MiB``."""
    for unit, size in (("TiB", 1024 ** 4), ("GiB", 1024 ** 3), ("MiB", 1024 ** 2)):
        if value >= size:
            return f"{value / size:.4g} {unit}"
    return f"{value} bytes"


@dataclass(frozen=True)
class Limits:
    """The per-case limits of a run: ``timeout`` seconds and ``memory`` bytes (None: no limit)."""

    timeout: float | None = None
    memory: int | None = None
    cgroup: bool = False  # ``memory`` enforced by a cgroup per child (else RLIMIT_AS)

    @classmethod
    def of(cls, config) -> "Limits":
        if config.timeout is not None and config.timeout <= 0:
            raise RunnerError(f"--timeout must be positive, got {config.timeout}")
        memory = parse_memory(config.memory) if config.memory else None
        return cls(config.timeout, memory, bool(memory) and use_cgroup())

    @property
    def mechanism(self) -> str:
        return "cgroup" if self.cgroup else "RLIMIT_AS"

    @property
    def memory_label(self) -> str:
        return f"--memory {format_bytes(self.memory)} ({self.mechanism})" if self.memory else ""

    def new_cgroup(self) -> MemoryCgroup | None:
        """A fresh memory cgroup for one child under a cgroup limit, else None."""
        if not (self.memory and self.cgroup):
            return None
        try:
            return MemoryCgroup.create(self.memory)
        except OSError as exc:
            raise RunnerError(f"could not make a memory cgroup for {self.memory_label}: {exc}") from None

    def cgroup_problem(self, group: MemoryCgroup | None) -> str | None:
        """The kernel's word that the cgroup limit ended a process of ``group``, or None."""
        if group is None or group.oom_kills() == 0:
            return None
        return f"exceeded {self.memory_label}: the kernel's OOM killer ended it (the cgroup's own count)"

    def timeout_problem(self) -> str:
        return f"exceeded --timeout {self.timeout:g} s (killed)"

    def memory_problem(self, detail: str) -> str:
        return f"exceeded {self.memory_label}: {detail}"

    def failed_allocation(self, text: str) -> bool:
        """Whether ``text`` (an error, a log) reports a failed allocation, which under ``--memory`` is the
        address-space limit at work: Python's MemoryError, torch's and C's ENOMEM, C++'s bad_alloc. (Under a
        cgroup an allocation does not fail at the limit: the kernel kills the process instead.)"""
        return bool(self.memory) and not self.cgroup and any(sign in text for sign in _ALLOCATION_FAILED)

    def reached_memory(self, vm_peak_kb: int | None) -> bool:
        """Whether an address space that peaked at ``vm_peak_kb`` was at the limit (within 64 MiB or 5%:
        the allocation that failed is not counted in the peak)."""
        if not self.memory or self.cgroup or vm_peak_kb is None:
            return False
        return vm_peak_kb * 1024 >= self.memory - max(64 * 1024 ** 2, self.memory // 20)

    def record_fields(self) -> dict:
        """What a case's record says about the limits it ran under."""
        out: dict = {}
        if self.timeout:
            out["timeout_s"] = self.timeout
        if self.memory:
            out["memory_limit"] = f"{format_bytes(self.memory)} ({self.mechanism})"
        return out


_ALLOCATION_FAILED = ("MemoryError", "Cannot allocate memory", "can't allocate memory", "bad_alloc")


def child_setup(memory: int | None = None, cgroup_procs: str | None = None) -> Callable[[], None]:
    """A ``preexec_fn`` for ``subprocess.Popen``: SIGKILL the child when this process (its starting thread)
    dies; then either join the memory cgroup whose ``cgroup.procs`` file is ``cgroup_procs``, or cap the
    address space at ``memory`` bytes. Runs between fork and exec: no imports, no locks."""
    parent = os.getpid()
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = None
    if memory and not cgroup_procs:
        cap = memory if hard == resource.RLIM_INFINITY else min(memory, hard)

    def setup() -> None:
        if _prctl is not None:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above: do not outlive it
            os.kill(os.getpid(), signal.SIGKILL)
        if cgroup_procs:
            fd = os.open(cgroup_procs, os.O_WRONLY)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)
        if cap is not None:
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    return setup


def exit_text(returncode: int) -> str:
    """``exited with status 3`` or ``was killed by signal SIGKILL`` (a Popen return code)."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"was killed by signal {name}"
    return f"exited with status {returncode}"


def proc_status_kb(pid: int, field: str) -> int | None:
    """A ``/proc/<pid>/status`` size in kB (``VmHWM``, ``VmPeak``); None when gone or a zombie."""
    key = field.encode() + b":"
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def process_name(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return None


_DMESG_TIME = re.compile(r"^\[\s*(\d+\.\d+)\]")


def kernel_oom_kill(pid: int, name: str | None, since: float) -> str | None:
    """The kernel's log line recording an out-of-memory kill of process ``pid`` (named ``name``) at or after
    ``since`` (``time.monotonic()``, the clock of the kernel log's timestamps), or None: no such line, or
    the log is not readable here. The PID and the name must both match, and the time, since a process in
    a PID namespace (a container) may share its number with an unrelated process of the host."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5, errors="replace")
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    wanted = re.compile(rf"(Killed process {pid} \((?P<name>[^)]*)\)|oom-kill:.*[,\s]pid={pid},)")
    for line in reversed(out.stdout.splitlines()):
        found = wanted.search(line)
        if not found:
            continue
        stamp = _DMESG_TIME.match(line)
        if stamp and float(stamp.group(1)) < since - 1.0:
            continue
        comm = (name or "")[:15]  # the kernel's name of a process: at most 15 characters
        if comm and (found.group("name") or comm) != comm:
            continue
        if comm and "task=" in line and f"task={comm}," not in line:
            continue
        return line.split("]", 1)[-1].strip()
    return None
