"""scripts/dockerd-local.sh's start-up hygiene, without a Docker engine: a containerd PID file left by an
earlier engine (a reboot, a SIGKILL) whose PID now belongs to another process made a new dockerd wait for
a containerd that did not exist ("timeout waiting for containerd to start"); the script removes such a
file and never signals the process that owns the PID now."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "dockerd-local.sh"


def _run(state: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HARNESS_DOCKER_DIR=str(state), HARNESS_DOCKER_WAIT_S="5")
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)


def test_a_stale_containerd_pid_file_is_removed_and_its_pid_left_alone(tmp_path):
    state = tmp_path / "d"
    cdir = state / "exec" / "containerd"
    cdir.mkdir(parents=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (cdir / "containerd.pid").write_text(str(bystander.pid))
        (cdir / "containerd.sock").write_text("")  # a leftover in the socket's place
        done = _run(state, "stop")
        assert done.returncode == 0, done.stderr
        assert "not running" in done.stderr and "stale containerd PID file" in done.stderr
        assert not (cdir / "containerd.pid").exists() and not (cdir / "containerd.sock").exists()
        assert bystander.poll() is None  # the process that owns the PID now was not signalled
    finally:
        bystander.kill()
        bystander.wait()


def test_status_of_a_state_folder_without_an_engine(tmp_path):
    done = _run(tmp_path / "empty", "status")
    assert done.returncode == 3 and "not running" in done.stderr and done.stdout == ""
