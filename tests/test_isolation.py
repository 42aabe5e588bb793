"""Runaway plugins and child processes (issue 17, items 3 and 4): a segmenter that exits, hangs or allocates
without bound ends only its case, under the native runner's isolated worker and under the subprocess runner;
children die with a SIGKILLed harness and leave no temporary folder behind; deaths are described by what is
known (an exit status, a limit, the kernel's OOM record), never guessed."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from harness.atomic import TEMP_SUFFIX, sweep_temp_files
from harness.run import InFlight, RunConfig, check_config
from harness.runners import limits as limits_module
from harness.runners.base import RunnerError
from harness.runners.limits import Limits, exit_text, format_bytes, kernel_oom_kill, parse_memory
from helpers import DEMO, harness_cli, install_fake_plugin

# Box fill, except on the cases RUNAWAY names (case=what,...): exit (sys.exit(3)), _exit (os._exit(7)),
# hang (sleeps an hour), spawn (starts a helper process, then hangs), leave (starts one and returns), alloc
# (2 GB in 100 MB steps, each page written: resident memory, what a cgroup limit counts, and address
# space, what RLIMIT_AS counts). LOAD_SECONDS: a slow model load.
RUNAWAY_PLUGIN = textwrap.dedent(
    '''
    import os, sys, time
    import numpy as np
    from harness import SegmenterSpec, hookimpl

    BAD = dict(item.split("=", 1) for item in os.environ.get("RUNAWAY", "").split(",") if "=" in item)


    class Runaway:
        def segment(self, case):
            what = BAD.get(case.name)
            if what == "exit":
                sys.exit(3)
            if what == "_exit":
                os._exit(7)
            if what == "hang":
                time.sleep(3600)
            if what in ("spawn", "leave"):  # a helper process, then a hang (spawn) or a normal answer (leave)
                import subprocess
                helper = subprocess.Popen(["sleep", "3600"])
                with open(os.environ["SPAWNED_PID_FILE"], "w") as fh:
                    fh.write(str(helper.pid))
                if what == "spawn":
                    time.sleep(3600)
            if what == "alloc":
                held = []
                for _ in range(20):
                    block = np.empty(100 * 1024 * 1024, np.uint8)
                    block[::4096] = 1  # one byte per page: every page resident, quickly
                    held.append(block)
            segs = np.zeros(case.spatial_shape, np.uint16)
            for i, b in enumerate(case.boxes.astype(int)):
                if case.dim == 2:
                    segs[b[1]:b[3] + 1, b[0]:b[2] + 1] = i + 1
                else:
                    segs[b[2]:b[5] + 1, b[1]:b[4] + 1, b[0]:b[3] + 1] = i + 1
            return segs

        def describe(self):
            return {"params": 0, "flops": 0, "weights": None}


    def load(options):
        time.sleep(float(os.environ.get("LOAD_SECONDS", "0")))
        return Runaway()


    @hookimpl
    def harness_segmenters():
        return [SegmenterSpec(name="runaway", title="Runaway", family="test", load=load)]
    '''
)

GOOD = ["2DBox_Endoscopy_kvasir-cju0rx1ida.npz", "3DBox_PET_sts024.npz"]
BAD = {"2DBox_US_hc18-158.npz": "exit", "3DBox_CT_sts025.npz": "_exit", "3DBox_MR_sts012.npz": "hang",
       "2DBox_Microscopy_dsb2018-t1.npz": "alloc"}


@pytest.fixture()
def runaway_env(tmp_path):
    env = install_fake_plugin(tmp_path / "site", "runaway_plugin", RUNAWAY_PLUGIN, "runaway", "0.1", "runaway")
    env["RUNAWAY"] = ",".join(f"{case}={what}" for case, what in BAD.items())
    return env


def records(out: Path) -> dict[str, dict]:
    return {r["case"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def expected_error(what: str, runner: str, timeout: int) -> str:
    predict = runner == "subprocess"
    return {
        "exit": "harness predict exited with status 3" if predict else "SystemExit: 3",
        "_exit": "harness predict exited with status 7" if predict else
                 "the segmenter's worker exited with status 7 while segmenting this case",
        "hang": f"exceeded --timeout {timeout} s (killed)",
        "alloc": f"exceeded --memory 1 GiB ({mechanism()})",
    }[what]


def mechanism() -> str:
    """What enforces --memory for this test process's children: ``cgroup`` where one can be made here."""
    return Limits.of(RunConfig(models=["x"], data_dir=Path("."), out_dir=Path("."), memory="1g")).mechanism


def _run_all_faults(tmp_path, env, runner: str, timeout: int) -> None:
    out = tmp_path / f"out-{runner}"
    started = time.monotonic()
    result = harness_cli(["run", "--models", "runaway", "--runner", runner, "--timeout", str(timeout), "--memory", "1g",
                          "--data", str(DEMO), "--out", str(out), "--no-progress", "--bootstrap", "20"], env=env,
                         timeout=240)
    assert time.monotonic() - started < 120
    assert result.returncode == 1, result.stderr
    assert "4 case(s) ended in error" in result.stderr
    assert "| Runaway" in result.stdout and (out / "leaderboard.md").is_file()  # the run finished its board
    recs = records(out)
    assert set(recs) == set(GOOD) | set(BAD)
    for case in GOOD:
        assert recs[case]["status"] == "ok" and recs[case]["dsc"] is not None, recs[case]
        if runner == "native":
            assert recs[case]["seconds"] < 1.0  # the segmentation alone: no worker start, no model load (1.5 s)
    for case, what in BAD.items():
        rec = recs[case]
        assert rec["status"] == "error", rec
        assert expected_error(what, runner, timeout) in rec["error"], rec["error"]
        assert str(DEMO / "imgs" / case) in rec["error"]
    assert not list(out.glob(f".case.*{TEMP_SUFFIX}"))  # the case folders went with their cases
    assert all(r["timeout_s"] == timeout and r["memory_limit"] == f"1 GiB ({mechanism()})" for r in recs.values())
    if mechanism() == "cgroup":  # the kernel's OOM kill, counted in the child's own group
        assert "the kernel's OOM killer ended it" in recs["2DBox_Microscopy_dsb2018-t1.npz"]["error"]
    assert not _harness_cgroups()  # every child's group was removed with it
    if runner == "native":
        assert all(r["isolated"] and r["timing_mode"] == "in-process" for r in recs.values())
        assert recs[GOOD[0]]["peak_rss_mb"] > 0  # measured in the worker


@pytest.mark.slow
def test_native_isolated_worker_survives_exit_os_exit_hang_and_allocation(tmp_path, runaway_env):
    _run_all_faults(tmp_path, {**runaway_env, "LOAD_SECONDS": "1.5"}, "native", timeout=5)  # room for the alloc case to reach the limit on a busy machine


@pytest.mark.slow
def test_subprocess_runner_limits_name_the_limit(tmp_path, runaway_env):
    # the subprocess runner's time is end to end (process start and imports count): a roomier limit
    _run_all_faults(tmp_path, runaway_env, "subprocess", timeout=10)


def test_isolate_turns_os_exit_into_an_error_row_and_the_next_case_gets_a_fresh_worker(tmp_path, runaway_env):
    data, out = tmp_path / "data", tmp_path / "out"
    (data / "imgs").mkdir(parents=True)
    for case in ("3DBox_CT_sts025.npz", GOOD[0], "2DBox_US_hc18-158.npz"):
        shutil.copy(DEMO / "imgs" / case, data / "imgs" / case)
    result = harness_cli(["run", "--models", "runaway", "--isolate", "--data", str(data), "--out", str(out),
                          "--no-progress", "--bootstrap", "20"], env=runaway_env, timeout=120)
    assert result.returncode == 1 and "2 case(s) ended in error" in result.stderr, result.stderr
    recs = records(out)
    assert "the segmenter's worker exited with status 7 while segmenting this case" in recs["3DBox_CT_sts025.npz"]["error"]
    assert "SystemExit: 3" in recs["2DBox_US_hc18-158.npz"]["error"]
    assert recs[GOOD[0]]["status"] == "ok" and recs[GOOD[0]]["isolated"] is True
    assert not (out / ".inflight" / "runaway").is_dir() or not any((out / ".inflight" / "runaway").iterdir())


def test_sys_exit_in_process_is_an_error_row(tmp_path, runaway_env):
    """Without --isolate a segmenter's sys.exit is recorded for its case; the run goes on (os._exit cannot be)."""
    data, out = tmp_path / "data", tmp_path / "out"
    (data / "imgs").mkdir(parents=True)
    for case in ("2DBox_US_hc18-158.npz", GOOD[0]):
        shutil.copy(DEMO / "imgs" / case, data / "imgs" / case)
    result = harness_cli(["run", "--models", "runaway", "--data", str(data), "--out", str(out), "--no-progress",
                          "--bootstrap", "20"], env=runaway_env, timeout=120)
    assert result.returncode == 1, result.stderr
    recs = records(out)
    assert "SystemExit: 3" in recs["2DBox_US_hc18-158.npz"]["error"] and recs[GOOD[0]]["status"] == "ok"
    assert "isolated" not in recs[GOOD[0]]


def _descendants(pid: int, marker: str, timeout: float = 60) -> list[int]:
    """The live descendants of ``pid`` whose command line contains ``marker`` (waiting for one to appear)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = [p.pid for p in psutil.Process(pid).children(recursive=True) if marker in " ".join(p.cmdline())]
        except psutil.Error:
            found = []
        if found:
            return found
        time.sleep(0.1)
    return []


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("runner, marker", [("subprocess", "harness.cli predict"),
                                            ("native", "harness.runners.worker")])
def test_children_die_with_a_sigkilled_harness_and_the_next_run_sweeps_their_folder(tmp_path, runaway_env, runner,
                                                                                     marker):
    data, out = tmp_path / "data", tmp_path / "out"
    (data / "imgs").mkdir(parents=True)
    shutil.copy(DEMO / "imgs" / "3DBox_MR_sts012.npz", data / "imgs" / "3DBox_MR_sts012.npz")  # it hangs
    args = ["run", "--models", "runaway", "--runner", runner, "--data", str(data), "--out", str(out), "--no-progress",
            "--bootstrap", "20"] + (["--isolate"] if runner == "native" else [])
    parent = subprocess.Popen([sys.executable, "-m", "harness.cli", *args], env=runaway_env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    entry = "runaway[subprocess]" if runner == "subprocess" else "runaway"
    inflight = out / ".inflight" / entry / "3DBox_MR_sts012.npz"  # written once the model is loaded
    try:
        children = _descendants(parent.pid, marker)
        assert children, f"no {marker} process started"
        deadline = time.monotonic() + 60
        while not inflight.is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert inflight.is_file(), "the case never started"
        time.sleep(1.0)  # inside the case (its endless sleep) now
    finally:
        parent.kill()
        parent.wait()
    for pid in children:
        assert _gone(pid), f"{marker} (pid {pid}) outlived its SIGKILLed parent"
    if runner == "subprocess":
        left = list(out.glob(f".case.*{TEMP_SUFFIX}"))
        assert len(left) == 1 and left[0].is_dir()  # what a SIGKILL leaves; the next run removes it
        user = out / f".case.{os.getpid()}-mine{TEMP_SUFFIX}"  # a live process's (this test's): not swept
        user.mkdir()
        done = harness_cli(args + ["--timeout", "1"], env=runaway_env, timeout=120)
        assert done.returncode == 1 and "exceeded --timeout 1 s" in done.stderr, done.stderr
        assert not left[0].exists() and user.is_dir()


# --- units -------------------------------------------------------------------------------------------------


def test_memory_sizes_and_limit_texts():
    assert parse_memory("4g") == 4 * 1024 ** 3 and parse_memory("512M") == 512 * 1024 ** 2
    assert parse_memory("1.5G") == int(1.5 * 1024 ** 3) and parse_memory("1073741824") == 1024 ** 3
    for bad in ("lots", "4x", "-1g"):
        with pytest.raises(RunnerError, match="expected a size"):
            parse_memory(bad)
    with pytest.raises(RunnerError, match="at least 64m"):
        parse_memory("1m")
    assert format_bytes(4 * 1024 ** 3) == "4 GiB" and format_bytes(1536 * 1024 ** 2) == "1.5 GiB"
    limits = Limits(timeout=30, memory=4 * 1024 ** 3)
    assert limits.timeout_problem() == "exceeded --timeout 30 s (killed)"
    assert limits.memory_problem("MemoryError: x") == "exceeded --memory 4 GiB (RLIMIT_AS): MemoryError: x"
    assert limits.reached_memory(4 * 1024 ** 2 - 1000) and not limits.reached_memory(2 * 1024 ** 2)
    assert not Limits().reached_memory(10 ** 9)
    assert limits.failed_allocation("RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried ...")
    assert limits.failed_allocation("MemoryError: Unable to allocate 100. MiB") and not limits.failed_allocation("ok")
    assert not Limits().failed_allocation("MemoryError")  # no limit in force: nothing to name
    by_cgroup = Limits(memory=4 * 1024 ** 3, cgroup=True)
    assert by_cgroup.memory_label == "--memory 4 GiB (cgroup)"
    assert by_cgroup.record_fields() == {"memory_limit": "4 GiB (cgroup)"}
    # under a cgroup an allocation does not fail at the limit (the kernel kills instead): a MemoryError is not it
    assert not by_cgroup.failed_allocation("MemoryError: x") and not by_cgroup.reached_memory(4 * 1024 ** 2)
    assert by_cgroup.cgroup_problem(None) is None
    assert exit_text(3) == "exited with status 3" and exit_text(-9) == "was killed by signal SIGKILL"
    assert exit_text(-11) == "was killed by signal SIGSEGV"


def test_native_accepts_limits_and_refuses_bad_ones(tmp_path):
    base = dict(models=["boxfill"], data_dir=DEMO, out_dir=tmp_path)
    for runner in ("native", "subprocess"):
        check_config(RunConfig(**base, runner=runner, timeout=5, memory="2g"))
        with pytest.raises(RunnerError, match="--memory '2 apples'"):
            check_config(RunConfig(**base, runner=runner, memory="2 apples"))
        with pytest.raises(RunnerError, match="--timeout must be positive"):
            check_config(RunConfig(**base, runner=runner, timeout=0))


DMESG = """\
[ 100.000001] python invoked oom-killer: gfp_mask=0x140cca(GFP_HIGHUSER_MOVABLE|__GFP_COMP), order=0
[ 100.000002] oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=x,mems_allowed=0,task=python,pid=4242,uid=0
[ 100.000003] Memory cgroup out of memory: Killed process 4242 (python) total-vm:9999kB, anon-rss:8888kB
[ 150.000000] Memory cgroup out of memory: Killed process 5151 (other) total-vm:1kB, anon-rss:1kB
"""


def test_kernel_oom_record_needs_the_pid_the_name_and_the_time(monkeypatch):
    def fake_run(cmd, **kwargs):
        assert cmd == ["dmesg"]
        return subprocess.CompletedProcess(cmd, 0, DMESG, "")

    monkeypatch.setattr(limits_module.subprocess, "run", fake_run)
    found = kernel_oom_kill(4242, "python", since=90.0)
    assert found and "Killed process 4242 (python)" in found
    assert kernel_oom_kill(4242, "python", since=120.0) is None  # an older death of another process
    assert kernel_oom_kill(4242, "harness", since=90.0) is None  # same number, another name: not ours
    assert kernel_oom_kill(4243, "python", since=0.0) is None
    assert kernel_oom_kill(5151, None, since=0.0)

    def unreadable(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "dmesg: read kernel buffer failed: Operation not permitted")

    monkeypatch.setattr(limits_module.subprocess, "run", unreadable)
    assert kernel_oom_kill(4242, "python", since=0.0) is None


def test_twice_died_record_says_killed_or_crashed_and_memory_only_with_evidence(tmp_path, monkeypatch):
    case = DEMO / "imgs" / GOOD[0]
    inflight = InFlight(tmp_path)
    inflight.start("m", case)
    inflight.start("m", case)
    marker = (tmp_path / ".inflight" / "m" / case.name).read_text().splitlines()
    assert marker[0] == "2" and marker[1].split("\t")[0] == str(os.getpid()) and len(marker) == 3
    monkeypatch.setattr(limits_module, "kernel_oom_kill", lambda pid, name, since: None)
    text = inflight.previous_crash("m", case)["error"]
    assert "killed or crashed" in text and "memory" not in text.replace("--memory", "")
    monkeypatch.setattr(limits_module, "kernel_oom_kill",
                        lambda pid, name, since: f"Out of memory: Killed process {pid} ({name})")
    text = inflight.previous_crash("m", case)["error"]
    assert f"the kernel killed it for lack of memory: Out of memory: Killed process {os.getpid()}" in text
    inflight.abandon("m", case)  # an interrupt gives one attempt back
    assert (tmp_path / ".inflight" / "m" / case.name).read_text().splitlines()[0] == "1"
    assert inflight.previous_crash("m", case) is None
    (tmp_path / ".inflight" / "m" / case.name).write_text("2")  # a marker of an older harness: still counted
    assert "2 times" in inflight.previous_crash("m", case)["error"]


def test_sweep_removes_only_dead_runs_case_folders_in_out_itself(tmp_path):
    dead = 2 ** 22 + 4321  # above the default pid_max: no process has it
    stale = tmp_path / f".case.{dead}-abc{TEMP_SUFFIX}"
    (stale / "inputs").mkdir(parents=True)
    (stale / "inputs" / "x.npz").write_bytes(b"case")
    live = tmp_path / f".case.{os.getppid()}-def{TEMP_SUFFIX}"
    live.mkdir()
    deep = tmp_path / "segs" / "m" / f".case.{dead}-ghi{TEMP_SUFFIX}"  # folders are swept in OUT itself only
    deep.mkdir(parents=True)
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("the user's")
    link = tmp_path / f".case.{dead}-lnk{TEMP_SUFFIX}"
    link.symlink_to(target)
    user = tmp_path / ".case.tmp"
    user.mkdir()
    assert sweep_temp_files(tmp_path, recursive=("segs",)) == 1
    assert not stale.exists() and live.is_dir() and deep.is_dir() and user.is_dir()
    assert link.is_symlink() and (target / "keep").read_text() == "the user's"


def test_allocation_past_the_limit_in_the_worker_names_the_limit(tmp_path, runaway_env, monkeypatch):
    """The worker answers a MemoryError under --memory as exceeding the limit, and stays up for the next case."""
    from harness.cases import load_case
    from harness.runners.isolated import IsolatedSession
    from harness.runners.case import load_options
    from harness.pluginmanager import HarnessPlugins
    from harness.runners.base import CaseRunError

    for key in ("PYTHONPATH", "RUNAWAY"):
        monkeypatch.setenv(key, runaway_env[key])
    monkeypatch.delenv("HARNESS_LOAD_PLUGINS", raising=False)
    monkeypatch.setenv("HARNESS_MEMORY_LIMIT", "rlimit")  # the fallback where no cgroup can be made
    config = RunConfig(models=["boxfill"], data_dir=DEMO, out_dir=tmp_path, memory="1g")
    spec = HarnessPlugins().get("boxfill")
    session = IsolatedSession("runaway", load_options(spec, config, 1), Limits.of(config), run_case=None)
    try:
        pid = session.worker.proc.pid
        bad = DEMO / "imgs" / "2DBox_Microscopy_dsb2018-t1.npz"
        with pytest.raises(CaseRunError, match=r"exceeded --memory 1 GiB \(RLIMIT_AS\): MemoryError"):
            session.segment(load_case(bad), bad)
        good = DEMO / "imgs" / GOOD[0]
        done = session.segment(load_case(good), good)
        assert isinstance(done.segs, np.ndarray) and done.segs.max() >= 1
        assert session.worker.proc.pid == pid  # the same worker: a MemoryError is an answer, not a death
    finally:
        session.close()
    assert _gone(pid, timeout=5)


def test_sigterm_during_an_isolated_case_stops_cleanly_and_ends_the_worker(tmp_path, runaway_env):
    data, out = tmp_path / "data", tmp_path / "out"
    (data / "imgs").mkdir(parents=True)
    shutil.copy(DEMO / "imgs" / "3DBox_MR_sts012.npz", data / "imgs" / "3DBox_MR_sts012.npz")  # it hangs
    marker = out / ".inflight" / "runaway" / "3DBox_MR_sts012.npz"
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", "--models", "runaway", "--isolate", "--data",
                             str(data), "--out", str(out), "--no-progress", "--bootstrap", "20"], env=runaway_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        workers = _descendants(proc.pid, "harness.runners.worker")
        deadline = time.monotonic() + 60
        while not marker.is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert workers and marker.is_file(), "the case never started"
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM); finished cases are kept" in err
    assert not marker.exists()  # an interrupt, not a crash: the rerun segments the case as usual
    assert all(_gone(pid, timeout=5) for pid in workers)


def test_a_timeout_also_ends_what_the_segmenter_started(tmp_path, runaway_env):
    data, out, pid_file = tmp_path / "data", tmp_path / "out", tmp_path / "spawned.pid"
    (data / "imgs").mkdir(parents=True)
    shutil.copy(DEMO / "imgs" / GOOD[0], data / "imgs" / GOOD[0])
    env = {**runaway_env, "RUNAWAY": f"{GOOD[0]}=spawn", "SPAWNED_PID_FILE": str(pid_file)}
    result = harness_cli(["run", "--models", "runaway", "--timeout", "2", "--data", str(data), "--out", str(out),
                          "--no-progress", "--bootstrap", "20"], env=env, timeout=120)
    assert result.returncode == 1 and "exceeded --timeout 2 s" in result.stderr, result.stderr
    helper = int(pid_file.read_text())
    assert _gone(helper, timeout=5), "the segmenter's helper process outlived the timeout"


@pytest.mark.parametrize("runner", ["native", "subprocess"])
def test_helpers_a_segmenter_leaves_running_end_with_its_process(tmp_path, runaway_env, runner):
    data, out, pid_file = tmp_path / "data", tmp_path / "out", tmp_path / "spawned.pid"
    (data / "imgs").mkdir(parents=True)
    shutil.copy(DEMO / "imgs" / GOOD[0], data / "imgs" / GOOD[0])
    env = {**runaway_env, "RUNAWAY": f"{GOOD[0]}=leave", "SPAWNED_PID_FILE": str(pid_file)}
    args = ["run", "--models", "runaway", "--runner", runner, "--data", str(data), "--out", str(out), "--no-progress",
            "--bootstrap", "20"] + (["--isolate"] if runner == "native" else [])
    result = harness_cli(args, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert _gone(int(pid_file.read_text()), timeout=5), "the segmenter's helper process outlived the run"


def _harness_cgroups() -> list[Path]:
    """Memory cgroups the harness made for this test process's children and left behind."""
    from harness.runners.cgroups import PREFIX, _own_paths

    found = []
    for base in _own_paths():
        if base is not None and base.is_dir():
            found += [p for p in base.iterdir() if p.name.startswith(f"{PREFIX}")]
    return found


def test_allocation_past_a_cgroup_limit_is_the_kernels_oom_kill_named_as_the_limit(tmp_path, runaway_env, monkeypatch):
    """Where the harness can make memory cgroups (root on cgroup v1, or a delegated v2 subtree), --memory
    limits the worker's resident memory: past it the kernel's OOM killer ends the worker, the error names
    the limit with the group's own OOM count as the evidence, the next case gets a fresh worker, and the
    group is removed."""
    from harness.cases import load_case
    from harness.pluginmanager import HarnessPlugins
    from harness.runners.base import CaseRunError
    from harness.runners.case import load_options
    from harness.runners.cgroups import _probe
    from harness.runners.isolated import IsolatedSession

    if _probe() is not None:
        pytest.skip(f"no memory cgroup can be made here: {_probe()}")
    for key in ("PYTHONPATH", "RUNAWAY"):
        monkeypatch.setenv(key, runaway_env[key])
    monkeypatch.delenv("HARNESS_LOAD_PLUGINS", raising=False)
    monkeypatch.setenv("HARNESS_MEMORY_LIMIT", "cgroup")
    config = RunConfig(models=["boxfill"], data_dir=DEMO, out_dir=tmp_path, memory="512m")
    limits = Limits.of(config)
    assert limits.cgroup and limits.memory_label == "--memory 512 MiB (cgroup)"
    spec = HarnessPlugins().get("boxfill")
    session = IsolatedSession("runaway", load_options(spec, config, 1), limits, run_case=None)
    try:
        first = session.worker
        group = first.cgroup.path
        procs = (group / "cgroup.procs").read_text().split()
        assert str(first.proc.pid) in procs  # the worker joined its group before it ran anything
        bad = DEMO / "imgs" / "2DBox_Microscopy_dsb2018-t1.npz"
        with pytest.raises(CaseRunError) as err:
            session.segment(load_case(bad), bad)
        text = str(err.value)
        assert "was killed by signal SIGKILL while segmenting this case" in text, text
        assert "exceeded --memory 512 MiB (cgroup): the kernel's OOM killer ended it" in text, text
        assert str(bad) in text
        assert not group.exists()  # removed with its worker
        good = DEMO / "imgs" / GOOD[0]
        done = session.segment(load_case(good), good)
        assert done.segs.max() >= 1 and session.worker is not first  # a fresh worker, in a fresh group
        assert session.worker.cgroup.path != group
    finally:
        session.close()
    assert not _harness_cgroups()


def test_memory_limit_mode_is_read_from_the_environment(monkeypatch):
    from harness.runners.cgroups import memory_limit_mode, use_cgroup

    monkeypatch.setenv("HARNESS_MEMORY_LIMIT", "rlimit")
    assert memory_limit_mode() == "rlimit" and use_cgroup() is False
    monkeypatch.setenv("HARNESS_MEMORY_LIMIT", "sometimes")
    with pytest.raises(RunnerError, match="HARNESS_MEMORY_LIMIT='sometimes'"):
        memory_limit_mode()


def test_a_group_left_by_a_harness_killed_outright_is_swept_and_a_live_ones_kept():
    from harness.runners.cgroups import PREFIX, MemoryCgroup, _own_paths, _probe

    if _probe() is not None:
        pytest.skip(f"no memory cgroup can be made here: {_probe()}")
    parent = next(p for p in _own_paths() if p is not None)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a PID that no longer runs
    stale = parent / f"{PREFIX}{dead.pid}-deadbeef"
    stale.mkdir()
    mine = MemoryCgroup.create(256 * 1024 ** 2)  # sweeps first
    try:
        assert not stale.exists() and mine.path.is_dir()
        other = MemoryCgroup.create(256 * 1024 ** 2)  # this process is alive: its groups stay
        assert mine.path.is_dir()
        other.remove()
    finally:
        mine.remove()
        if stale.exists():
            stale.rmdir()
