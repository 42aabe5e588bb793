"""The run driver (``harness run`` on the native runner): records, errors that do not stop the run, resume
after SIGKILL, leaderboard."""
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
import pytest

from harness.cases import discover_cases
from harness.results import ResultsStore, StoreLockedError, read_records
from harness.run import RunConfig, run
from helpers import DEMO, harness_cli, harness_popen, install_fake_plugin

REQUIRED_FIELDS = {"model", "case", "modality", "dim", "dsc", "nsd", "seconds", "peak_rss_mb", "timing_mode",
                   "status", "error"}


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_boxfill_run_records_and_segs(tmp_path):
    out = tmp_path / "out"
    report = run(RunConfig(models=["boxfill"], data_dir=DEMO, out_dir=out, progress=False))
    assert report.done == 6 and report.errors == 0 and report.ok
    records = lines(out)
    assert len(records) == 6
    for rec in records:
        assert REQUIRED_FIELDS <= set(rec)
        assert rec["status"] == "ok" and rec["error"] is None
        assert rec["timing_mode"] == "in-process" and rec["runner"] == "native"
        assert rec["seconds"] >= 0 and rec["peak_rss_mb"] > 0
        assert 0 < rec["dsc"] < 1 and 0 <= rec["nsd"] <= 1
        with np.load(out / rec["segs"]) as npz:
            assert npz["segs"].dtype == np.uint16
    assert {r["dim"] for r in records} == {"2D", "3D"}
    models = json.loads((out / "models.json").read_text())
    assert models["boxfill"]["params"] == 0


def test_rerun_skips_finished_pairs(tmp_path):
    out = tmp_path / "out"
    run(RunConfig(models=["boxfill"], data_dir=DEMO, out_dir=out, limit=2, progress=False))
    report = run(RunConfig(models=["boxfill"], data_dir=DEMO, out_dir=out, limit=2, progress=False))
    assert report.done == 0 and report.skipped == 2
    assert len(lines(out)) == 2


def test_bad_case_is_recorded_and_run_goes_on(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(DEMO, data, ignore=shutil.ignore_patterns("*.md", "*.json"))
    (data / "imgs" / "2DBox_US_broken.npz").write_bytes(b"garbage")
    np.savez(data / "imgs" / "2DBox_US_inverted.npz", imgs=np.zeros((20, 20, 3), np.uint8),
             boxes=np.array([[10, 2, 3, 8]]))
    out = tmp_path / "out"
    report = run(RunConfig(models=["boxfill"], data_dir=data, out_dir=out, progress=False))
    assert report.done == 6 and report.errors == 2
    errors = {r["case"]: r["error"] for r in lines(out) if r["status"] == "error"}
    assert "not an npz" in errors["2DBox_US_broken.npz"] and "2DBox_US_broken.npz" in errors["2DBox_US_broken.npz"]
    assert "inverted" in errors["2DBox_US_inverted.npz"]


def test_bad_ground_truth_is_an_error_naming_the_file(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(DEMO, data, ignore=shutil.ignore_patterns("*.md", "*.json"))
    case = "2DBox_US_hc18-158.npz"
    np.savez(data / "gts" / case, gts=np.zeros((3, 3), np.uint8))
    out = tmp_path / "out"
    run(RunConfig(models=["boxfill"], data_dir=data, out_dir=out, progress=False))
    rec = next(r for r in lines(out) if r["case"] == case)
    assert rec["status"] == "error" and "while scoring" in rec["error"] and "does not match" in rec["error"]
    assert rec["seconds"] is not None and (out / rec["segs"]).is_file()  # the segmentation itself is kept


def test_missing_gts_gives_unscored_ok_records(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(DEMO / "imgs", data / "imgs")
    out = tmp_path / "out"
    run(RunConfig(models=["boxfill"], data_dir=data, out_dir=out, limit=2, progress=False))
    assert all(r["status"] == "ok" and r["dsc"] is None for r in lines(out))


def test_store_is_locked_against_a_second_writer(tmp_path):
    with ResultsStore(tmp_path):
        with pytest.raises(StoreLockedError):
            ResultsStore(tmp_path)


def test_torn_last_line_is_repaired(tmp_path):
    with ResultsStore(tmp_path) as store:
        store.append({"model": "m", "case": "a", "status": "ok"})
    with (tmp_path / "results.jsonl").open("ab") as fh:
        fh.write(b'{"model": "m", "case": "b", "sta')
    with ResultsStore(tmp_path) as store:
        assert store.finished("m") == {"a"}
        store.append({"model": "m", "case": "b", "status": "ok"})
    assert [r["case"] for r in read_records(tmp_path / "results.jsonl")] == ["a", "b"]


SLOW_PLUGIN = textwrap.dedent(
    '''
    """Box fill that takes a while per case, so a test can kill the run in the middle."""
    import time
    import numpy as np
    from harness import SegmenterSpec, hookimpl

    class Slow:
        def segment(self, case):
            time.sleep(0.6)
            segs = np.zeros(case.spatial_shape, np.uint16)
            for i, b in enumerate(case.boxes.astype(int)):
                if case.dim == 2:
                    segs[b[1]:b[3] + 1, b[0]:b[2] + 1] = i + 1
                else:
                    segs[b[2]:b[5] + 1, b[1]:b[4] + 1, b[0]:b[3] + 1] = i + 1
            return segs

        def describe(self):
            return {"params": 0, "flops": 0, "weights": None}

    @hookimpl
    def harness_segmenters():
        return [SegmenterSpec(name="slowfill", title="Slow fill", family="test", load=lambda o: Slow())]
    '''
)


@pytest.mark.slow  # several `harness run` processes, killed and rerun
def test_resume_after_sigkill_loses_nothing_and_duplicates_nothing(tmp_path):
    env = install_fake_plugin(tmp_path / "site", "slowfill_plugin", SLOW_PLUGIN, "slowfill", "0.1", "slowfill")
    out = tmp_path / "out"
    args = ["run", "--models", "slowfill,boxfill", "--data", str(DEMO), "--out", str(out), "--no-progress"]
    proc = harness_popen(args, env=env)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if results.is_file() and len(results.read_bytes().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_with = read_records(results)
    assert 2 <= len(killed_with) < 12, "the run should have been killed in the middle"
    with results.open("ab") as fh:  # what a kill during a write would leave behind
        fh.write(b'{"model": "slowfill", "case": "torn')
    finished = harness_cli(args, env=env)
    assert finished.returncode == 0, finished.stderr
    records = lines(out)
    pairs = [(r["model"], r["case"]) for r in records]
    assert len(pairs) == len(set(pairs)) == 12
    assert records[: len(killed_with)] == killed_with  # nothing already finished was lost or rewritten
    assert all(r["status"] == "ok" for r in records)
    expected = {p.name for p in discover_cases(DEMO)}
    assert {c for m, c in pairs if m == "slowfill"} == expected


def test_unloadable_model_does_not_stop_the_others(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    out = tmp_path / "out"
    result = harness_cli(["run", "--models", "litemedsam,boxfill", "--weights", f"litemedsam={bad}", "--data",
                          str(DEMO), "--out", str(out), "--limit", "2", "--no-progress"])
    assert result.returncode == 1
    assert "litemedsam: not run:" in result.stderr and str(bad) in result.stderr
    assert {r["model"] for r in lines(out)} == {"boxfill"}


def test_cli_argument_errors(tmp_path):
    missing = harness_cli(["run", "--models", "boxfill", "--weights", "boxfill=/nonexistent.pth", "--out",
                           str(tmp_path)])
    assert missing.returncode != 0 and "no such file" in missing.stderr
    unknown = harness_cli(["run", "--models", "nosuchmodel", "--out", str(tmp_path)])
    assert unknown.returncode == 2 and "unknown segmenter 'nosuchmodel'" in unknown.stderr
    nodata = harness_cli(["run", "--models", "boxfill", "--data", str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert nodata.returncode == 2 and "no such data folder" in nodata.stderr


class _Flaky:
    """Raises on 2D cases, returns a wrong shape on 3D cases; describe() returns numpy/Path values."""

    def segment(self, case):
        if case.dim == 2:
            raise RuntimeError("model exploded")
        return np.zeros((1, 1), np.uint16)

    def describe(self):
        return {"params": np.int64(7), "flops": np.float32(1.5), "weights": Path("/weights/x.pth")}


def _plugins_with(*specs):
    from harness import SegmenterSpec, hookimpl
    from harness.pluginmanager import HarnessPlugins

    class Plugin:
        @hookimpl
        def harness_segmenters(self):
            return [SegmenterSpec(name=name, title=name, family="test", load=load) for name, load in specs]

    plugins = HarnessPlugins(load_entry_points=False)
    plugins.register(Plugin(), "test-plugin")
    return plugins


def test_model_errors_are_recorded_with_the_file_and_describe_values_are_json_safe(tmp_path):
    out = tmp_path / "out"
    plugins = _plugins_with(("flaky", lambda options: _Flaky()))
    report = run(RunConfig(models=["flaky"], data_dir=DEMO, out_dir=out, progress=False), plugins=plugins)
    assert report.errors == 6 and report.done == 0
    for rec in lines(out):
        assert rec["status"] == "error" and str(DEMO / "imgs" / rec["case"]) in rec["error"]
        if rec["dim"] == "2D":
            assert "while segmenting" in rec["error"] and "RuntimeError: model exploded" in rec["error"]
        else:
            assert "segs of shape (1, 1)" in rec["error"]
    models = json.loads((out / "models.json").read_text())
    assert models["flaky"]["params"] == 7 and models["flaky"]["weights"] == "/weights/x.pth"


def test_retry_errors_reruns_only_the_failed_pairs(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(DEMO, data, ignore=shutil.ignore_patterns("*.md", "*.json"))
    broken = data / "imgs" / "2DBox_US_hc18-158.npz"
    good_bytes = broken.read_bytes()
    broken.write_bytes(b"garbage")
    out = tmp_path / "out"
    config = RunConfig(models=["boxfill"], data_dir=data, out_dir=out, progress=False)
    assert run(config).errors == 1
    broken.write_bytes(good_bytes)
    assert run(config).done == 0  # errors count as finished unless asked
    config.retry_errors = True
    report = run(config)
    assert report.done == 1 and report.skipped == 5
    with ResultsStore(out) as store:
        latest = {r["case"]: r for r in store.records()}
    assert latest[broken.name]["status"] == "ok" and len(latest) == 6


def test_a_case_that_kills_the_process_twice_is_recorded_and_skipped(tmp_path):
    out = tmp_path / "out"
    cases = discover_cases(DEMO)
    first, second = cases[0].name, cases[1].name
    inflight = out / ".inflight" / "boxfill"
    inflight.mkdir(parents=True)
    (inflight / first).write_text("2")   # died twice in there: give up on it
    (inflight / second).write_text("1")  # died once (or was killed): run it again
    report = run(RunConfig(models=["boxfill"], data_dir=DEMO, out_dir=out, progress=False))
    assert report.errors == 1 and report.done == 5
    recs = {r["case"]: r for r in lines(out)}
    assert "died while segmenting this case, 2 times" in recs[first]["error"]
    assert recs[second]["status"] == "ok"
    assert not any(inflight.iterdir())


def test_leaderboard_command_rerenders_a_run(tmp_path):
    out = tmp_path / "out"
    run(RunConfig(models=["boxfill"], data_dir=DEMO, out_dir=out, limit=2, progress=False))
    target = tmp_path / "board.md"
    result = harness_cli(["leaderboard", str(out), "-o", str(target)])
    assert result.returncode == 0, result.stderr
    assert "| Box fill (baseline)" in target.read_text() and (out / "summary.json").is_file()
    missing = harness_cli(["leaderboard", str(tmp_path / "nothing")])
    assert missing.returncode != 0 and "results.jsonl not found" in missing.stderr


def test_temp_files_of_a_killed_writer_are_swept(tmp_path):
    dead = 2 ** 22 + 12345  # above the default pid_max: no process has it
    stale = tmp_path / "segs" / "boxfill" / f".2DBox_US_1.npz.{dead}-abc123.medsam-harness.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a file")
    top = tmp_path / f".results.jsonl.{dead}-x.medsam-harness.tmp"
    top.write_bytes(b"")
    alive = tmp_path / "segs" / f".a.npz.{os.getppid()}-y.medsam-harness.tmp"  # a live writer's: kept
    alive.write_bytes(b"")
    with ResultsStore(tmp_path):
        pass
    assert not stale.exists() and not top.exists() and alive.exists()


def test_user_files_named_like_temporaries_survive(tmp_path):
    """--out pointed at the data folder (or a parent of it): files the harness did not make survive, whatever
    their names, and nothing outside the folders a run writes is swept."""
    data = tmp_path / "data"
    shutil.copytree(DEMO, data)
    user_files = [data / "imgs" / ".scan_notes.tmp", data / "gts" / ".annot.tmp", data / "private" / "deep" /
                  ".draft.tmp", data / ".notes.tmp", data / "segs" / ".mine.tmp",
                  data / "private" / f".x.npz.{2 ** 22 + 7}-z.medsam-harness.tmp"]  # our name, not our folder
    for path in user_files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("the user's own")
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    for out in (data, tmp_path):  # --out is the data folder, then its parent
        run(RunConfig(models=["boxfill"], data_dir=data, out_dir=out, limit=2, progress=False))
    for path, content in before.items():
        assert path.is_file() and path.read_bytes() == content, f"{path} was changed or deleted"


def test_peak_rss_sampler_fallback(monkeypatch):
    import harness.profiling as profiling

    monkeypatch.setattr(profiling, "_reset_hwm", lambda: False)
    with profiling.PeakRSS() as peak:
        block = np.ones(30_000_000)  # 240 MB, held for a few sampling intervals
        time.sleep(0.05)
        del block
    assert peak.method == "sampler" and peak.mb > 200


@pytest.mark.slow  # several `harness run` processes, killed and rerun
def test_repeated_sigkill_at_random_moments_never_loses_or_duplicates(tmp_path):
    """Kill fast runs (about 20 ms per case) at random moments, so kills land inside segs writes,
    record appends and leaderboard writes too; then finish and check the store."""
    import random

    data = tmp_path / "data"
    for sub in ("imgs", "gts"):
        (data / sub).mkdir(parents=True)
        for src in sorted((DEMO / sub).glob("*.npz")):
            for k in range(5):
                shutil.copy(src, data / sub / src.name.replace(".npz", f"-copy{k}.npz"))
    out = tmp_path / "out"
    args = ["run", "--models", "boxfill", "--data", str(data), "--out", str(out), "--no-progress"]
    rng = random.Random(7)
    results = out / "results.jsonl"
    for _ in range(5):
        proc = harness_popen(args)
        before = len(read_records(results))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(read_records(results)) == before and proc.poll() is None:
            time.sleep(0.01)  # wait until this run is past start-up and writing
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    survived = read_records(results)
    finished = harness_cli(args)
    assert finished.returncode == 0, finished.stderr
    records = lines(out)
    assert records[: len(survived)] == survived
    pairs = [(r["model"], r["case"]) for r in records]
    assert len(pairs) == len(set(pairs)) == 30
    assert all(r["status"] == "ok" for r in records)
    for rec in records:
        with np.load(out / rec["segs"]) as npz:
            assert npz["segs"].dtype == np.uint16
    assert not list(out.rglob(".*.tmp"))


SLEEPY_PLUGIN = textwrap.dedent(
    '''
    import os, time
    import numpy as np
    from harness import SegmenterSpec, hookimpl


    class Slow:
        def segment(self, case):
            time.sleep(float(os.environ.get("SLOW_SECONDS", "0")))
            return np.zeros(case.spatial_shape, np.uint16)

        def describe(self):
            return {"params": 0, "flops": 0, "weights": None}


    @hookimpl
    def harness_segmenters():
        return [SegmenterSpec(name="slow", title="Slow", family="baseline", load=lambda options: Slow())]
    '''
)


@pytest.mark.slow  # 5-10 s on 2 cores: out of the fast set (durations, 2026-12-07)
def test_interrupts_are_not_crashes(tmp_path):
    """Ctrl-C twice and SIGTERM once on the same case: each stops the run cleanly, saying how to resume, and
    gives back the case's in-flight mark; the rerun then segments that case normally (no crash record)."""
    env = install_fake_plugin(tmp_path / "site", "slow_plugin", SLEEPY_PLUGIN, "slow-plugin", "0.1", "slow")
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    case = "2DBox_US_hc18-158.npz"
    shutil.copy(DEMO / "imgs" / case, data / "imgs" / case)
    out = tmp_path / "out"
    marker = out / ".inflight" / "slow" / case
    args = ["run", "--models", "slow", "--data", str(data), "--out", str(out), "--no-progress", "--bootstrap", "20"]
    for sig, code, said in ((signal.SIGINT, 130, "interrupted"), (signal.SIGINT, 130, "interrupted"),
                            (signal.SIGTERM, 143, "terminated (SIGTERM)")):
        # a child of a non-interactive, backgrounded shell (as CI may be) inherits SIGINT ignored, and Python then
        # keeps ignoring it: give the child the default disposition, as a terminal's foreground job has
        proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *args], env={**env, "SLOW_SECONDS": "60"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 60
            while not marker.is_file() and time.monotonic() < deadline:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.05)
            assert marker.is_file(), "the case never started"
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == code, err
        assert f"{said}; finished cases are kept, run the same command again to resume" in err
        assert not marker.exists(), "an interrupted case kept its in-flight mark"
    done = harness_cli(args, env={**env, "SLOW_SECONDS": "0"}, timeout=120)
    assert done.returncode == 0, done.stderr
    record = read_records(out / "results.jsonl")[-1]
    assert record["case"] == case and record["status"] == "ok"
