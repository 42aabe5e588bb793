"""The native runner's isolated mode (``--isolate``, and whenever ``--timeout`` or ``--memory`` is given):
the segmenter runs in a worker process that loads it once and segments the cases sent to it.

Nothing a segmenter does there can end or stall the run: ``sys.exit`` is an error record like any other
exception; ``os._exit``, a crash or a kill ends only the worker, and the case it was segmenting becomes an
error record ("the segmenter's worker exited with status 7 / was killed by signal SIGSEGV while segmenting
this case") while the next case starts a fresh worker; a case that runs past ``--timeout`` gets its worker
killed ("exceeded --timeout 30 s"); ``--memory`` limits the worker with a memory cgroup of its own where
one can be made, else caps its address space (``RLIMIT_AS``; see :mod:`harness.runners.limits` for what
each does and does not measure), and going past it is an error record naming the limit. The worker dies with the driver (``PR_SET_PDEATHSIG``).

Timing is the native runner's (timing mode ``in-process``): ``seconds`` and ``peak_rss_mb`` are measured
inside the worker around ``Segmenter.segment`` alone, as :func:`harness.runners.native.run_case` measures
them; sending the case and the segs between the processes is not counted. The worker finds the segmenter
among the installed plugins (entry points, ``HARNESS_LOAD_PLUGINS``) and loads it with the same
:class:`~harness.plugin_api.LoadOptions` as a native run; a plugin registered only in the driver process
(``run(config, plugins=...)``) is unknown to it, and the entry fails to load, saying so.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from harness.runners.base import CaseRunError, Session
from harness.runners.limits import Limits, child_setup, exit_text, kernel_oom_kill, proc_status_kb, process_name

STOP_GRACE_S = 2.0


class WorkerLoadError(RuntimeError):
    """The segmenter could not be loaded in the isolated worker (the loader's own error, or the worker's death)."""


@dataclass
class Segmented:
    segs: object
    seconds: float
    peak_rss_mb: float | None
    memory_method: str


class _VmPeak(threading.Thread):
    """Poll a process's peak address space (``VmPeak``, kept by the kernel for its whole life) until stopped:
    whether it reached ``--memory`` while this case ran. :meth:`stop` returns the peak in kB if it grew since
    the start, else None (an earlier case's peak says nothing about this one)."""

    def __init__(self, pid: int, fresh: bool = False, interval_s: float = 0.01):
        super().__init__(daemon=True)
        self.pid, self.interval_s, self.kb = pid, interval_s, None
        self.first = 0 if fresh else proc_status_kb(pid, "VmPeak") or 0  # fresh: a process just started
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            kb = proc_status_kb(self.pid, "VmPeak")
            if kb is not None:
                self.kb = max(self.kb or 0, kb)
            if self._stop_event.wait(self.interval_s):
                return

    def stop(self) -> int | None:
        self._stop_event.set()
        self.join()
        return self.kb if self.kb is not None and self.kb > self.first else None


class IsolatedWorker:
    """One worker process with the segmenter loaded; :meth:`segment` sends it a case."""

    def __init__(self, model: str, options, limits: Limits):
        self.limits = limits
        self.busy = False  # a case is in the worker now
        self.cgroup = limits.new_cgroup()  # under a cgroup limit: the worker's own group, removed in kill()
        parent_end, child_end = multiprocessing.Pipe(duplex=True)
        fd = child_end.fileno()
        # its own session: a terminal's Ctrl-C reaches the driver, which stops the worker itself
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "harness.runners.worker", str(fd)], pass_fds=(fd,),
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=child_setup(limits.memory,
                                                                self.cgroup.procs_file if self.cgroup else None))
        except BaseException:
            if self.cgroup:
                self.cgroup.remove()
            raise
        child_end.close()
        self.conn = parent_end
        self.started_at = time.monotonic()
        self.name = process_name(self.proc.pid)
        peak = _VmPeak(self.proc.pid, fresh=True) if limits.memory and not limits.cgroup else None
        if peak:
            peak.start()
        try:
            self.conn.send(("load", model, options))
            reply = self.conn.recv()
        except (EOFError, OSError):
            vm_peak = peak.stop() if peak else None
            peak = None
            raise WorkerLoadError(self._death("while loading the model", vm_peak)) from None
        except BaseException:  # Ctrl-C or SIGTERM while it loads
            self.kill()
            raise
        finally:
            if peak:
                peak.stop()
        if reply[0] != "ready":
            self.close()
            raise WorkerLoadError(reply[1])
        self.described = reply[1]

    def alive(self) -> bool:
        """Whether the worker still runs; an exited one is left unreaped, so that :meth:`kill` can still
        reach its process group (what the segmenter started) by its id."""
        if self.proc.returncode is not None:
            return False
        try:
            return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
        except ChildProcessError:
            return self.proc.poll() is None

    def segment(self, case, case_path: Path) -> Segmented:
        """The case segmented in the worker, or :class:`CaseRunError` naming the case file and what ended it
        (the segmenter's exception, the worker's death, a limit)."""
        peak = _VmPeak(self.proc.pid) if self.limits.memory and not self.limits.cgroup else None
        if peak:
            peak.start()
        vm_peak = None
        self.busy = True
        try:
            try:
                self.conn.send(("segment", case))
                if self.limits.timeout and not self.conn.poll(self.limits.timeout):
                    self.kill()
                    raise CaseRunError(case_path, f"{self.limits.timeout_problem()}; the next case runs in a "
                                                  "fresh worker")
                reply = self.conn.recv()
                self.busy = False  # (an interrupt before this line leaves it busy: close() then kills it)
            except (EOFError, OSError):
                vm_peak = peak.stop() if peak else None
                peak = None
                raise CaseRunError(case_path, self._death("while segmenting this case", vm_peak)) from None
        finally:
            if peak:
                vm_peak = peak.stop()
        if reply[0] == "ok":
            return Segmented(*reply[1:])
        _, type_name, message = reply
        problem = f"{type_name}: {message}"
        if self.limits.failed_allocation(problem) or self.limits.reached_memory(vm_peak):
            problem = self.limits.memory_problem(problem)
        raise CaseRunError(case_path, problem)

    def _death(self, doing: str, vm_peak: int | None) -> str:
        """Why the worker is gone, after it died: its exit, and memory only with evidence."""
        deadline = time.monotonic() + 10
        while self.alive() and time.monotonic() < deadline:  # the socket closed as it exits
            time.sleep(0.01)
        by_cgroup = self.limits.cgroup_problem(self.cgroup)  # read before kill() removes the group
        self.kill()  # its process group's leftovers too; a worker that closed the socket but lives on ends here
        code = self.proc.returncode
        text = f"the segmenter's worker {exit_text(code)} {doing}"
        if by_cgroup:
            text += f"; {by_cgroup}"
        elif self.limits.reached_memory(vm_peak):
            text += f"; its address space had reached {self.limits.memory_label}"
        elif code < 0:
            oom = kernel_oom_kill(self.proc.pid, self.name, self.started_at)
            if oom:
                text += f"; the kernel killed it for lack of memory: {oom}"
        return text + ("; the next case runs in a fresh worker" if "segmenting" in doing else "")

    def kill(self) -> None:
        """SIGKILL the worker and its process group (whatever the segmenter started), then reap it."""
        if self.proc.returncode is None:  # not reaped yet: its id is still its own
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait()
        self.conn.close()
        if self.cgroup is not None:
            self.cgroup.remove()

    def close(self) -> None:
        """Ask an idle worker to stop, and kill it if it does not within :data:`STOP_GRACE_S`; kill a busy
        one (the run was interrupted in the middle of a case)."""
        if self.alive() and not self.busy:
            try:
                self.conn.send(("stop",))
            except OSError:
                pass
            deadline = time.monotonic() + STOP_GRACE_S
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.01)
        self.kill()


class IsolatedSession(Session):
    """The cases of one entry through an isolated worker, restarted (the model loaded again) after a death."""

    def __init__(self, model: str, options, limits: Limits, run_case):
        self.model, self.options, self.limits, self._run_case = model, options, limits, run_case
        self.worker: IsolatedWorker | None = IsolatedWorker(model, options, limits)

    @property
    def described(self) -> dict:
        return self.worker.described

    def segment(self, case, case_path: Path) -> Segmented:
        if self.worker is None or not self.worker.alive():
            if self.worker is not None:
                self.worker.kill()
            self.worker = None
            try:
                self.worker = IsolatedWorker(self.model, self.options, self.limits)
            except WorkerLoadError as exc:
                raise CaseRunError(case_path, f"the segmenter's worker could not be restarted: {exc}") from None
        try:
            return self.worker.segment(case, case_path)
        finally:
            if not self.worker.alive():
                self.worker.kill()
                self.worker = None

    def run_one(self, case_path: Path) -> dict:
        return self._run_case(self, case_path)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None

