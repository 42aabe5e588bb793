"""The ray runner (``harness run --runner ray``): the same records, segs and metrics as the native runner,
cases spread over the nodes of a cluster, workers that die mid-case replaced and their case retried once,
a killed driver resumed, and no Ray process left behind.

Every Ray instance here is bound to 127.0.0.1 and lives in a temporary ``RAY_TMPDIR``; every process it
starts carries a marker in its environment, so that the fixture can check and sweep them (by PID) after
each test. Test-only segmenters (``sleepy``, ``crashy``, ``hangy``) come from a throwaway plugin installed through an
entry point on ``PYTHONPATH``, so that the Ray workers find it as they find any installed plugin.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")

from harness.hookspecs import hookimpl  # noqa: E402
from harness.pluginmanager import HarnessPlugins  # noqa: E402
from harness.results import read_models, read_records  # noqa: E402
from harness.run import RunConfig, run  # noqa: E402
from harness.runners.base import RunnerError  # noqa: E402
from harness.runners.ray import RayRunner, loopback_only, processes_with_env  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "harness" / "demo"
MARKER = "HARNESS_RAY_TEST"
TEST_LIMIT_S = 240  # no test here may run longer (SIGALRM); subprocesses have their own timeouts

PLUGIN = '''
"""Test-only segmenters for the ray runner's tests (box fill, slowed down or crashing)."""
import os
import signal
import time

from harness import SegmenterSpec, hookimpl
from plugins.boxfill import BoxFill


class Sleepy(BoxFill):
    def segment(self, case):
        time.sleep(float(os.environ.get("RAYTEST_SLEEP", "1")))
        return super().segment(case)


class Hangy(BoxFill):
    def segment(self, case):
        hang = os.environ.get("RAYTEST_HANG")
        if hang and hang in case.name:
            time.sleep(600)  # far past any --timeout of the tests
        return super().segment(case)


class Crashy(BoxFill):
    def segment(self, case):
        crash = os.environ.get("RAYTEST_CRASH")
        if crash and crash in case.name:
            os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies mid-case
        return super().segment(case)


@hookimpl
def harness_segmenters():
    return [
        SegmenterSpec(name="sleepy", title="Box fill, slowly", family="baseline", load=lambda options: Sleepy()),
        SegmenterSpec(name="crashy", title="Box fill, or a crash", family="baseline", load=lambda options: Crashy()),
        SegmenterSpec(name="hangy", title="Box fill, or a hang", family="baseline", load=lambda options: Hangy()),
    ]
'''

def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().split(")")[-1].split()[0] != "Z":
                    out.append(pid)
        except OSError:
            pass
    return out


def _ray_processes(token: str) -> list[int]:
    """The live processes started under this test's marker (Ray's, the reaper, drivers), not pytest itself."""
    return _alive([pid for pid in processes_with_env(MARKER, token) if pid != os.getpid()])


def _wait_gone(token: str, seconds: float = 30.0) -> list[int]:
    end = time.monotonic() + seconds
    left = _ray_processes(token)
    while left and time.monotonic() < end:
        time.sleep(0.25)
        left = _ray_processes(token)
    return left


@pytest.fixture(autouse=True)
def _time_limit():
    def expired(signum, frame):
        raise TimeoutError(f"test ran over {TEST_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TEST_LIMIT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def ray_env(monkeypatch):
    """A marked, private environment for the Ray processes of one test; swept afterwards, whatever happened."""
    import ray

    token = uuid.uuid4().hex
    tmp = Path(tempfile.mkdtemp(prefix="hrt-", dir="/tmp"))  # short: Ray's socket paths live under it
    plugin_dir = tmp / "plugin"
    (plugin_dir / "raytest_plugin-0.1.dist-info").mkdir(parents=True)
    (plugin_dir / "raytest_plugin.py").write_text(PLUGIN)
    (plugin_dir / "raytest_plugin-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: raytest-plugin\nVersion: 0.1\n")
    (plugin_dir / "raytest_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[harness]\nraytest = raytest_plugin\n")
    monkeypatch.setenv(MARKER, token)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp))
    monkeypatch.setenv("TMPDIR", str(tmp))  # the workers' temporary case folders
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(plugin_dir), os.environ.get("PYTHONPATH")])))
    monkeypatch.syspath_prepend(str(plugin_dir))
    monkeypatch.delenv("HARNESS_LOAD_PLUGINS", raising=False)
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        yield {"token": token, "tmp": tmp}
    finally:
        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):  # what a failed test left: by PID, marked ones only
                for pid in _ray_processes(token):
                    try:
                        os.kill(pid, sig)
                    except OSError:
                        pass
                if not _wait_gone(token, 5.0):
                    break
            shutil.rmtree(tmp, ignore_errors=True)
            if threads is not None:
                torch.set_num_threads(threads)


def _data_2d(tmp_path: Path) -> Path:
    """The demo set's 2D cases (a few seconds each for litemedsam), with their ground truth."""
    data = tmp_path / "data2d"
    for sub in ("imgs", "gts"):
        (data / sub).mkdir(parents=True)
        for path in (DEMO / sub).glob("2DBox_*.npz"):
            shutil.copy(path, data / sub / path.name)
    return data


def _config(models, data: Path, out: Path, **ray_options) -> RunConfig:
    return RunConfig(models=list(models), data_dir=data, out_dir=out, runner="ray", progress=False, threads=1,
                     runner_options={"ray": ray_options})


def _by_case(out: Path, model: str) -> dict[str, dict]:
    return {r["case"]: r for r in read_records(out / "results.jsonl") if r["model"] == model}


def _assert_once(out: Path) -> list[dict]:
    records = read_records(out / "results.jsonl")
    pairs = [(r["model"], r["case"]) for r in records]
    assert len(pairs) == len(set(pairs)), f"a (model, case) recorded twice: {sorted(pairs)}"
    return records


def _assert_same_as_native(ray_out: Path, native_out: Path, entry: str, native_entry: str) -> None:
    ours, native = _by_case(ray_out, entry), _by_case(native_out, native_entry)
    assert sorted(ours) == sorted(native) and native
    for case, theirs in native.items():
        mine = ours[case]
        assert mine["status"] == theirs["status"] == "ok", (mine["error"], theirs["error"])
        for key in ("dsc", "nsd", "dsc_per_label", "nsd_per_label", "modality", "dim", "n_boxes", "backend"):
            assert mine[key] == theirs[key], (case, key)
        assert set(theirs) <= set(mine)  # the native runner's fields, plus node
        mine_segs = np.load(ray_out / mine["segs"])["segs"]
        theirs_segs = np.load(native_out / theirs["segs"])["segs"]
        assert mine_segs.dtype == theirs_segs.dtype and np.array_equal(mine_segs, theirs_segs), case
        assert mine["runner"] == "ray" and mine["timing_mode"] == "distributed"
        assert mine["node"]["id"] and mine["node"]["hostname"] and mine["seconds"] is not None


def _listening_beyond_loopback(token: str) -> list[str]:
    import psutil

    ours = set(_ray_processes(token))
    wide = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in ours:
            if conn.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1"):
                wide.append(f"{conn.laddr.ip}:{conn.laddr.port} (pid {conn.pid})")
    return wide


# --- 4. no Ray installed ----------------------------------------------------------------------------------


def test_check_without_ray_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # find_spec answers None for a blocked module
    config = _config(["boxfill"], DEMO, tmp_path / "out")
    with pytest.raises(RunnerError, match=r"--runner ray needs Ray: pip install -e '\.\[ray\]'"):
        RayRunner().check(config)


def test_options_are_checked_before_any_work(tmp_path):
    runner = RayRunner()
    for options, message in [({"workers": 0}, "--ray-workers"), ({"cpus_per_worker": 0}, "--ray-cpus-per-worker"),
                             ({"exclusive": True, "workers": 2}, "--ray-exclusive"), ({"nodes": 2}, "unknown")]:
        with pytest.raises(RunnerError, match=message):
            runner.check(_config(["boxfill"], DEMO, tmp_path / "out", **options))
    config = _config(["boxfill"], DEMO, tmp_path / "out")
    config.timeout = 0
    with pytest.raises(RunnerError, match="--timeout must be positive"):
        runner.check(config)


# --- 1. the same results as the native runner ---------------------------------------------------------------


@pytest.mark.slow  # 5-10 s on 2 cores: out of the fast set (durations, 2026-12-07)
def test_boxfill_through_the_cli_matches_native(ray_env, tmp_path):
    """``harness run --runner ray --ray-workers 2``: every demo case, the native runner's DSC, NSD and segs;
    a local instance that listens on 127.0.0.1 only and leaves no process behind."""
    from harness.cli import main

    native = tmp_path / "native"
    assert run(RunConfig(models=["boxfill"], data_dir=DEMO, out_dir=native, progress=False, threads=1)).ok
    out = tmp_path / "ray"
    seen = {}

    def look():  # while the run is on: what listens, and where
        end = time.monotonic() + 60
        while time.monotonic() < end and not seen.get("done"):
            wide = _listening_beyond_loopback(ray_env["token"])
            if _ray_processes(ray_env["token"]):
                seen.setdefault("checked", 0)
                seen["checked"] += 1
                seen.setdefault("wide", []).extend(wide)
            time.sleep(0.2)

    watcher = threading.Thread(target=look, daemon=True)
    watcher.start()
    try:
        code = main(["run", "--models", "boxfill", "--runner", "ray", "--ray-workers", "2", "--threads", "1",
                     "--data", str(DEMO), "--out", str(out), "--no-progress"])
    finally:
        seen["done"] = True
        watcher.join()
    assert code == 0
    records = _assert_once(out)
    assert len(records) == 6
    _assert_same_as_native(out, native, "boxfill[ray]", "boxfill")
    assert seen.get("checked") and not seen.get("wide"), seen
    assert not list(ray_env["tmp"].glob("harness-ray-*")), "a worker left a temporary case folder"
    info = read_models(out)["boxfill[ray]"]
    assert info["runner"] == "ray" and info["timing_mode"] == "distributed" and info["ray"]["workers"] == 2
    assert not _wait_gone(ray_env["token"]), "Ray processes left after the run"


@pytest.mark.slow
def test_litemedsam_matches_native(ray_env, tmp_path):
    """The real model on the demo's 2D cases: bit-identical segs, equal metrics (one thread each, as natively)."""
    data = _data_2d(tmp_path)
    native = tmp_path / "native"
    assert run(RunConfig(models=["litemedsam"], data_dir=data, out_dir=native, progress=False, threads=1)).ok
    out = tmp_path / "ray"
    report = run(_config(["litemedsam"], data, out, workers=2))
    assert report.ok, report
    assert len(_assert_once(out)) == 3
    _assert_same_as_native(out, native, "litemedsam[ray]", "litemedsam")
    assert not _wait_gone(ray_env["token"])


# --- 2. a two-node cluster ----------------------------------------------------------------------------------


@pytest.mark.slow  # starts a second Ray node
def test_two_node_cluster_records_each_node(ray_env, tmp_path, monkeypatch):
    """Two Ray nodes on this machine (1 CPU each), joined by address: cases land on both, each record names
    its node; the runner only disconnects from a cluster it joined."""
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAYTEST_SLEEP", "0.3")  # the nodes' workers inherit it: both get cases
    with loopback_only():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        cluster.add_node(num_cpus=1)
    try:
        cluster.wait_for_nodes()
        out = tmp_path / "out"
        report = run(_config(["sleepy"], DEMO, out, address=cluster.address))
        assert report.ok, report
        records = _assert_once(out)
        assert len(records) == 6 and all(r["status"] == "ok" for r in records)
        assert len({r["node"]["id"] for r in records}) == 2
        assert len(read_models(out)["sleepy[ray]"]["ray"]["nodes"]) == 2
        assert not ray.is_initialized()  # disconnected; the cluster itself still runs
        assert cluster.remaining_processes_alive()
    finally:
        cluster.shutdown()
    assert not _wait_gone(ray_env["token"])


# --- 3. lost workers and a killed driver --------------------------------------------------------------------


def _kill_first_busy_worker(token: str, after_s: float, killed: list) -> threading.Thread:
    """SIGKILL the first worker process seen segmenting, ``after_s`` into its case."""

    def watch():
        seen: dict[int, float] = {}
        end = time.monotonic() + 90
        while time.monotonic() < end:
            for pid in _ray_processes(token):
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
                except OSError:
                    continue
                if title.startswith(b"ray::SegmenterWorker.segment"):
                    first = seen.setdefault(pid, time.monotonic())
                    if time.monotonic() - first >= after_s:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                        return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow  # SIGKILLs a Ray worker and waits for its replacement
def test_worker_killed_mid_case_is_replaced_and_the_case_retried(ray_env, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYTEST_SLEEP", "1")
    out = tmp_path / "out"
    killed: list[int] = []
    lines: list[str] = []
    killer = _kill_first_busy_worker(ray_env["token"], 0.4, killed)
    report = run(_config(["sleepy"], DEMO, out, workers=2), log=lines.append)
    killer.join(timeout=5)
    assert killed, "no worker was seen segmenting"
    assert report.ok, report
    records = _assert_once(out)
    assert sorted(r["case"] for r in records) == sorted(p.name for p in (DEMO / "imgs").glob("*.npz"))
    assert all(r["status"] == "ok" and r["node"]["id"] for r in records)
    assert any("died; starting a new one" in line for line in lines), lines
    assert not _wait_gone(ray_env["token"])


@pytest.mark.slow  # SIGKILLs two Ray workers
def test_a_case_that_kills_its_worker_twice_is_an_error_naming_the_node(ray_env, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYTEST_CRASH", "US_hc18")
    out = tmp_path / "out"
    report = run(_config(["crashy"], DEMO, out, workers=2))
    assert report.errors == 1 and report.done == 5, report
    records = _assert_once(out)
    bad = [r for r in records if r["status"] != "ok"]
    assert [r["case"] for r in bad] == ["2DBox_US_hc18-158.npz"]
    error = bad[0]["error"]
    node = bad[0]["node"]
    assert error.startswith(f"while segmenting on node {node['hostname']} ({node['id']}): the Ray worker died 2 times")
    assert bad[0]["runner"] == "ray" and bad[0]["modality"] == "US"
    assert not _wait_gone(ray_env["token"])


@pytest.mark.slow  # waits out a --timeout of 4 s and starts a replacement worker
def test_a_case_past_timeout_is_an_error_and_its_worker_replaced(ray_env, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYTEST_HANG", "US_hc18")
    out = tmp_path / "out"
    lines: list[str] = []
    config = _config(["hangy"], DEMO, out, workers=2)
    config.timeout = 4.0
    started = time.monotonic()
    report = run(config, log=lines.append)
    assert time.monotonic() - started < 120, "the hung case was not cut off"
    assert report.errors == 1 and report.done == 5, report
    records = _assert_once(out)
    bad = [r for r in records if r["status"] != "ok"]
    assert [r["case"] for r in bad] == ["2DBox_US_hc18-158.npz"]
    node = bad[0]["node"]
    assert bad[0]["error"].startswith(f"while segmenting on node {node['hostname']} ({node['id']}): exceeded "
                                      "--timeout 4 s (the Ray worker was killed"), bad[0]["error"]
    assert all(r["status"] == "ok" for r in records if r is not bad[0])
    assert any("ran past --timeout 4 s and was killed; starting a new one" in line for line in lines), lines
    assert not _wait_gone(ray_env["token"])


@pytest.mark.slow
def test_killed_driver_resumes_each_case_once_and_leaves_no_ray_process(ray_env, tmp_path):
    """``python -m harness.cli run --runner ray`` SIGKILLed after its first record, then run again: every
    case exactly once, and none of the first run's Ray processes outlives the second."""
    out = tmp_path / "out"
    env = {**os.environ, "RAYTEST_SLEEP": "1.5"}
    cmd = [sys.executable, "-m", "harness.cli", "run", "--models", "sleepy,boxfill", "--runner", "ray",
           "--ray-workers", "2", "--data", str(DEMO), "--out", str(out), "--no-progress", "--threads", "1"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end and not read_records(out / "results.jsonl"):
            assert first.poll() is None, "the first run ended before its first record"
            time.sleep(0.1)
        assert read_records(out / "results.jsonl"), "no record within 120 s"
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    partial = read_records(out / "results.jsonl")
    assert 1 <= len(partial) < 12
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr[-3000:]
    records = _assert_once(out)
    assert len(records) == 12 and all(r["status"] == "ok" for r in records)
    assert {r["model"] for r in records} == {"sleepy[ray]", "boxfill[ray]"}
    assert f"{len(partial)} already finished" in second.stdout
    assert not _wait_gone(ray_env["token"]), "Ray processes of the killed run (or the second) are left"


# --- loading, exclusive nodes, shared data ------------------------------------------------------------------


@pytest.mark.slow  # 5-10 s on 2 cores: out of the fast set (durations, 2026-12-07)
def test_a_plugin_only_the_driver_knows_fails_in_open(ray_env, tmp_path):
    """Workers load segmenters from the installed plugins; one registered in the driver alone is reported as
    a model that did not run, saying why."""
    import plugins.boxfill as boxfill
    from harness import SegmenterSpec

    class DriverOnly:
        @hookimpl
        def harness_segmenters(self):
            return [SegmenterSpec(name="driveronly", title="Driver only", family="baseline", load=boxfill.load)]

    plugins = HarnessPlugins()
    plugins.register(DriverOnly(), "driveronly")
    out = tmp_path / "out"
    report = run(_config(["driveronly", "boxfill"], DEMO, out, workers=1), plugins=plugins)
    assert set(report.failed_models) == {"driveronly[ray]"}
    message = report.failed_models["driveronly[ray]"]
    assert "not installed on Ray node" in message and "registered only in the driver process" in message
    assert report.done == 6  # the other model ran
    assert not _wait_gone(ray_env["token"])


def test_exclusive_nodes_and_shared_data(ray_env, tmp_path):
    """``--ray-exclusive``: one worker per node holding all its CPUs, records timed in-process with the node
    named; ``--ray-shared-data``: workers read the driver's paths; same segs as natively."""
    native = tmp_path / "native"
    assert run(RunConfig(models=["boxfill"], data_dir=DEMO, out_dir=native, progress=False, threads=1)).ok
    out = tmp_path / "out"
    report = run(_config(["boxfill"], DEMO, out, exclusive=True, shared_data=True))
    assert report.ok, report
    records = _assert_once(out)
    assert len(records) == 6
    assert all(r["timing_mode"] == "in-process" and r["node"]["id"] for r in records)
    assert len({r["node"]["id"] for r in records}) == 1
    info = read_models(out)["boxfill[ray]"]
    assert info["timing_mode"] == "in-process" and info["ray"]["workers"] == 1 and info["ray"]["exclusive"]
    for case, theirs in _by_case(native, "boxfill").items():
        mine = _by_case(out, "boxfill[ray]")[case]
        assert mine["dsc"] == theirs["dsc"] and mine["nsd"] == theirs["nsd"]
        assert np.array_equal(np.load(out / mine["segs"])["segs"], np.load(native / theirs["segs"])["segs"])
    assert not _wait_gone(ray_env["token"])


def test_more_workers_than_the_cluster_holds_is_refused(ray_env, tmp_path):
    report = run(_config(["boxfill"], DEMO, tmp_path / "out", workers=64))
    assert "cannot hold 64 worker(s)" in report.failed_models["boxfill[ray]"]
    assert not _wait_gone(ray_env["token"])


def test_a_new_worker_sweeps_the_case_folders_of_killed_ones(tmp_path, monkeypatch):
    """A worker killed while it loads a case leaves its temporary folder; the next worker on the node
    removes it (its PID is gone), and leaves a live process's folder alone."""
    from harness.runners import ray as ray_runner

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"harness-ray-{dead.pid}-abc"
    live = tmp_path / f"harness-ray-{os.getpid()}-def"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "case.npz").write_bytes(b"x")
    ray_runner._sweep_temp_dirs()
    assert not stale.exists() and live.exists()
