"""Find, and after a run stop, the processes that carry a marker in their environment.

The Ray runner sets ``HARNESS_RAY_INSTANCE=<token>`` in the environment of the local Ray instance it starts
(Ray's processes inherit it from the driver, its workers from the raylet). It starts this module as a
child process (``python -m harness.runners.reaper TOKEN DRIVER_PID NAME``) that waits for its stdin to
close: the run closed it (Ray was shut down) or the run's process died. It then gives a clean shutdown
three seconds, and stops whatever still carries the marker with SIGTERM, then SIGKILL.
"""
from __future__ import annotations

import os
import signal
import sys
import time


def processes_with_env(name: str, value: str) -> list[int]:
    """PIDs of the processes (of this user) whose environment holds ``name=value``."""
    mark, found = f"{name}={value}".encode(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    if mark in fh.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def reap(name: str, value: str, spare: tuple[int, ...], grace_s: float = 3.0) -> None:
    """Stop the processes marked ``name=value`` (except ``spare``): wait ``grace_s`` for them to end on
    their own, then SIGTERM, then SIGKILL, waiting ``grace_s`` after each."""
    def owned() -> list[int]:
        return [pid for pid in processes_with_env(name, value) if pid not in spare]

    def wait() -> None:
        end = time.monotonic() + grace_s
        while owned() and time.monotonic() < end:
            time.sleep(0.1)

    wait()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in owned():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        wait()


def main(argv: list[str]) -> None:
    token, driver, name = argv[0], int(argv[1]), argv[2]
    sys.stdin.buffer.read()  # EOF: the run closed its end (it shut Ray down), or its process died
    reap(name, token, spare=(os.getpid(), driver))


if __name__ == "__main__":
    main(sys.argv[1:])
