"""The ``subprocess`` runner: one ``harness predict`` process per case (per step of a case with ``--protocol
interactive``: :mod:`harness.interactive.external`), timed end to end.

The child is ``python -m harness.cli predict --model NAME -i IN -o OUT`` with the run's options. Peak
memory: the child's ``VmHWM`` (its peak resident set), polled from ``/proc/<pid>/status`` every few
milliseconds until it exits. The kernel keeps that high-water mark itself, so peaks between polls
count; only growth in the last poll interval before the exit can be missed. (``wait4``'s
``ru_maxrss`` is not used: Linux carries the parent's own high-water mark over into the child at
``exec``, so it reports at least the parent's peak.) See :mod:`harness.runners.external` for what
is timed and checked.

Limits (:mod:`harness.runners.limits`): ``--timeout`` kills the child's process group after that many
seconds; ``--memory`` puts the child in a memory cgroup of its own where one can be made (the kernel's
OOM kill in that group is the evidence), else caps its address space (``RLIMIT_AS``: a MemoryError in
its log, or an address space that reached the cap); either way the error names the limit. The child
is killed if this process dies (``PR_SET_PDEATHSIG``), even by SIGKILL. Its inputs and outputs folders
are in ``OUT``, named ``.case.<pid>-<random>.medsam-harness.tmp`` (the pid is this process's): removed
after each case, also on Ctrl-C; a run killed outright leaves one, which the next run in that ``OUT``
removes (:func:`harness.atomic.sweep_temp_files`).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from harness.choices import entry_name, variant_tags
from harness.results import update_models
from harness.runners.base import FunctionSession, Runner, RunnerError, Target
from harness.runners.external import TIMING_MODE, Outcome, describe_model, run_external_case, with_log
from harness.runners.limits import Limits, child_setup, exit_text, kernel_oom_kill, proc_status_kb, process_name


class _ChildPeak(threading.Thread):
    """Poll a child's kernel-kept peak RSS (VmHWM) and peak address space (VmPeak) until stopped; ``kb`` and
    ``vm_kb`` are the last (largest) values. (A zombie has no memory lines.)"""

    def __init__(self, pid: int, interval_s: float = 0.005):
        super().__init__(daemon=True)
        self.pid, self.interval_s, self.kb, self.vm_kb = pid, interval_s, None, None
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            kb = proc_status_kb(self.pid, "VmHWM")
            if kb is not None:
                self.kb = max(self.kb or 0, kb)
            vm_kb = proc_status_kb(self.pid, "VmPeak")
            if vm_kb is not None:
                self.vm_kb = max(self.vm_kb or 0, vm_kb)
            if self._stop_event.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


class SubprocessExecutor:
    """One ``harness predict`` process per case. The child finds the segmenter among the installed
    plugins (entry points), as ``harness run`` on the command line does; a plugin registered only in
    this process (``run(config, plugins=...)``) is unknown to it, and each case fails saying so."""

    runner = "subprocess"
    what = "harness predict"
    memory_method = "VmHWM of the child process, polled every 5 ms"

    def __init__(self, model: str, config, threads: int):
        self.model, self.config, self.threads = model, config, threads
        self.limits = Limits.of(config)
        self.work_dir = config.out_dir  # the case folders: in OUT, swept there after a kill (see above)

    def command(self, inputs: Path, outputs: Path) -> list[str]:
        c = self.config
        cmd = [sys.executable, "-m", "harness.cli", "predict", "--model", self.model, "-i", str(inputs),
               "-o", str(outputs), "--threads", str(self.threads), "--device", c.device, "--path", c.path,
               "--precision", c.precision, "--backend", c.backend]
        for name, path in c.weights.items():
            cmd += ["--weights", f"{name}={path}"]
        if c.weights_dir is not None:
            cmd += ["--weights-dir", str(c.weights_dir)]
        if c.allow_pickle:
            cmd.append("--allow-pickle")
        return cmd

    def execute(self, inputs: Path, outputs: Path, work: Path) -> Outcome:
        log_path = work / "predict.log"
        timeout = self.limits.timeout
        group = self.limits.new_cgroup()  # under a cgroup limit: this case's own group
        try:
            return self._execute(log_path, inputs, outputs, timeout, group)
        finally:
            if group is not None:
                group.remove()

    def _execute(self, log_path: Path, inputs: Path, outputs: Path, timeout, group) -> Outcome:
        with log_path.open("wb") as log_fh:
            start = time.perf_counter()
            proc = subprocess.Popen(self.command(inputs, outputs), stdin=subprocess.DEVNULL, stdout=log_fh,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=child_setup(self.limits.memory, group.procs_file if group else None))
            started_at = time.monotonic()
            name = process_name(proc.pid)
            peak = _ChildPeak(proc.pid)
            peak.start()
            timed_out = threading.Event()

            def kill() -> None:
                timed_out.set()
                _killpg(proc.pid)

            timer = threading.Timer(timeout, kill) if timeout else None
            if timer:
                timer.start()
            try:
                os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
                seconds = time.perf_counter() - start
            finally:
                if timer:
                    timer.cancel()
                peak.stop()
                # an interrupted (Ctrl-C) child, and whatever an exited one left running in its process group
                # (not reaped yet, its id still names the group): nothing outlives the case
                _killpg(proc.pid)
                proc.wait()
        code = proc.returncode
        log = log_path.read_text(errors="replace")
        peak_mb = peak.kb / 1024.0 if peak.kb else None
        problem = None
        if timed_out.is_set():
            problem = self.limits.timeout_problem()
        elif code != 0:
            problem = f"{self.what} {exit_text(code)}"
            by_cgroup = self.limits.cgroup_problem(group)
            if by_cgroup:
                problem += f"; {by_cgroup}"
            elif self.limits.failed_allocation(log) or self.limits.reached_memory(peak.vm_kb):
                problem = self.limits.memory_problem(problem)
            elif code < 0:
                oom = kernel_oom_kill(proc.pid, name, started_at)
                if oom:
                    problem += f"; the kernel killed it for lack of memory: {oom}"
            problem = with_log(problem, log)
        return Outcome(seconds, code, peak_mb, self.memory_method if peak_mb else None, log, problem)


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class SubprocessRunner(Runner):
    name = "subprocess"
    timing_mode = TIMING_MODE
    label = "subprocess"
    order = 10
    description = "one `harness predict` process per case, timed end to end"

    def check(self, config) -> None:
        Limits.of(config)  # a bad --timeout or --memory stops the run before any work

    describe_prompts = False  # the models.json facts include the prompts the loaded segmenter takes

    def case_function(self, executor, entry: str, segmenter: str, config, threads: int, spec=None,
                      info: dict | None = None):
        """What runs one case of ``entry`` (the record it returns; ``info``: the entry's models.json facts):
        here one run of ``executor`` (:func:`run_external_case`); the interactive protocol's sibling runs
        its steps instead."""
        return lambda case_path: run_external_case(executor, entry, segmenter, case_path, config, threads)

    def entry_facts(self, config, spec=None) -> dict:
        """Fields added to the entry's models.json facts (the interactive protocol's sibling adds its own)."""
        return {}

    def targets(self, specs, config, plugins, threads: int, log=print) -> list[Target]:
        out = []
        for spec in specs:
            entry = entry_name(spec, config)

            def open_(spec=spec, entry=entry) -> FunctionSession:
                info = describe_model(spec, config, plugins, threads, variant_tags(spec, config),
                                      prompts=self.describe_prompts)
                update_models(config.out_dir, entry, {**info, "runner": self.name, "timing_mode": TIMING_MODE,
                                                      **self.entry_facts(config, spec)})
                executor = SubprocessExecutor(spec.name, config, threads)
                return FunctionSession(self.case_function(executor, entry, spec.name, config, threads, spec, info))

            out.append(Target(entry, open_, runner=self.name, timing_mode=TIMING_MODE))
        return out


def check_timeout(config) -> None:
    """``--timeout``, where a runner honours it, must be positive."""
    if config.timeout is not None and config.timeout <= 0:
        raise RunnerError(f"--timeout must be positive, got {config.timeout}")
