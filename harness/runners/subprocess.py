"""The ``subprocess`` runner: one ``harness predict`` process per case, timed end to end.

The child is ``python -m harness.cli predict --model NAME -i IN -o OUT`` with the run's options. Peak
memory: the child's ``VmHWM`` (its peak resident set), polled from ``/proc/<pid>/status`` every few
milliseconds until it exits. The kernel keeps that high-water mark itself, so peaks between polls
count; only growth in the last poll interval before the exit can be missed. (``wait4``'s
``ru_maxrss`` is not used: Linux carries the parent's own high-water mark over into the child at
``exec``, so it reports at least the parent's peak.) See :mod:`harness.runners.external` for what
is timed and checked.
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


def _vmhwm_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None  # a zombie has no memory lines


class _ChildPeak(threading.Thread):
    """Poll a child's kernel-kept peak RSS (VmHWM) until stopped; ``kb`` is the last (largest) value."""

    def __init__(self, pid: int, interval_s: float = 0.005):
        super().__init__(daemon=True)
        self.pid, self.interval_s, self.kb = pid, interval_s, None
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            kb = _vmhwm_kb(self.pid)
            if kb is not None:
                self.kb = max(self.kb or 0, kb)
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
        timeout = self.config.timeout
        with log_path.open("wb") as log_fh:
            start = time.perf_counter()
            proc = subprocess.Popen(self.command(inputs, outputs), stdin=subprocess.DEVNULL, stdout=log_fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
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
                if proc.poll() is None:  # interrupted (Ctrl-C) before it finished: leave nothing behind
                    _killpg(proc.pid)
                    proc.wait()
        code = proc.returncode
        log = log_path.read_text(errors="replace")
        peak_mb = peak.kb / 1024.0 if peak.kb else None
        problem = None
        if timed_out.is_set():
            problem = f"timed out after {timeout:g} s (killed)"
        elif code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            problem = with_log(f"{self.what} was killed by {name}"
                                + (" (out of memory?)" if -code == signal.SIGKILL else ""), log)
        elif code != 0:
            problem = with_log(f"{self.what} exited with status {code}", log)
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
        check_timeout(config)

    def targets(self, specs, config, plugins, threads: int, log=print) -> list[Target]:
        out = []
        for spec in specs:
            entry = entry_name(spec, config)

            def open_(spec=spec, entry=entry) -> FunctionSession:
                info = describe_model(spec, config, plugins, threads, variant_tags(spec, config))
                update_models(config.out_dir, entry, {**info, "runner": self.name, "timing_mode": TIMING_MODE})
                executor = SubprocessExecutor(spec.name, config, threads)
                return FunctionSession(lambda case_path: run_external_case(executor, entry, spec.name, case_path,
                                                                           config, threads))

            out.append(Target(entry, open_, runner=self.name, timing_mode=TIMING_MODE))
        return out


def check_timeout(config) -> None:
    """``--timeout``, where a runner honours it, must be positive."""
    if config.timeout is not None and config.timeout <= 0:
        raise RunnerError(f"--timeout must be positive, got {config.timeout}")
