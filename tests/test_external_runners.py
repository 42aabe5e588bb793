"""The subprocess and docker runners, `harness predict`, and the runner-overhead leaderboard section.

Docker tests (marker ``docker``) need an engine (the ``docker_client`` fixture skips without one, or
fails when HARNESS_REQUIRE_DOCKER=1); they build the harness's images of boxfill and litemedsam once
per module and run a few small demo cases (two 2D, one tiny 3D).
"""
from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest

from harness.cases import load_case
from harness.choices import choice_defaults
from harness.results import ResultsStore, read_records, update_models
from harness.run import RunConfig, check_config, run
from harness.runners.base import CaseRunError, RunnerError
from harness.runners.docker import image_entry_name, parse_memory
from harness.runners.external import TIMING_MODE, Outcome, read_output, run_external_case
from helpers import DEMO, harness_cli, install_fake_plugin
from leaderboard import render_markdown, summary_json
from leaderboard.tables import load_results, runner_overhead

# two 2D cases and the smallest 3D one: the fastest demo cases that still cover both dims
SMALL = ["2DBox_US_hc18-158.npz", "2DBox_Microscopy_dsb2018-t1.npz", "3DBox_PET_sts024.npz"]


def small_data(root: Path, names=SMALL) -> Path:
    for sub in ("imgs", "gts"):
        (root / sub).mkdir(parents=True)
        for name in names:
            shutil.copy(DEMO / sub / name, root / sub / name)
    return root


def latest(out: Path) -> dict[tuple[str, str], dict]:
    return {(r["model"], r["case"]): r for r in read_records(out / "results.jsonl")}


def segs_of(out: Path, record: dict) -> np.ndarray:
    with np.load(out / record["segs"]) as npz:
        return npz["segs"]


def assert_same_segs(out: Path, entry: str, native: str, cases) -> None:
    recs = latest(out)
    for case in cases:
        a, b = recs[(entry, case)], recs[(native, case)]
        assert a["status"] == "ok", a["error"]
        np.testing.assert_array_equal(segs_of(out, a), segs_of(out, b))
        assert a["dsc"] == b["dsc"] and a["nsd"] == b["nsd"]


# --------------------------------------------------------------------------------------------- subprocess

def test_subprocess_runner_matches_native_and_times_end_to_end(tmp_path):
    data, out = small_data(tmp_path / "data"), tmp_path / "out"
    assert run(RunConfig(models=["boxfill"], data_dir=data, out_dir=out, progress=False)).done == 3
    report = run(RunConfig(models=["boxfill"], data_dir=data, out_dir=out, runner="subprocess", progress=False))
    assert report.done == 3 and report.ok
    assert_same_segs(out, "boxfill[subprocess]", "boxfill", SMALL)
    recs = latest(out)
    for case in SMALL:
        sub, native = recs[("boxfill[subprocess]", case)], recs[("boxfill", case)]
        assert sub["timing_mode"] == TIMING_MODE == "end-to-end" and sub["runner"] == "subprocess"
        assert sub["exit_code"] == 0 and sub["segmenter"] == "boxfill"
        # a whole interpreter start + plugin load per case, against a few microseconds of box filling
        assert sub["seconds"] > 0.2 > native["seconds"]
        assert sub["memory_method"].startswith("VmHWM of the child") and 20 < sub["peak_rss_mb"] < 2000
    models = json.loads((out / "models.json").read_text())
    assert models["boxfill[subprocess]"]["tags"] == ["subprocess"] and models["boxfill[subprocess]"]["params"] == 0
    # resumable like the native runner
    again = run(RunConfig(models=["boxfill"], data_dir=data, out_dir=out, runner="subprocess", progress=False))
    assert again.done == 0 and again.skipped == 3
    cells = overhead_row(render_markdown(out), "Box fill (baseline)")
    # columns of the runners present only: in-process, subprocess, subprocess - in-process
    assert len(cells) == 5 and cells[1] == "3" and cells[4].startswith("+")


def overhead_row(board: str, method: str) -> list[str]:
    """The cells of ``method``'s row in the leaderboard's runner-overhead table."""
    section = board.split("## Runner overhead", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in section.splitlines() if line.startswith(f"| {method} "))
    return [c.strip() for c in row.strip("|").split("|")]


def test_subprocess_bad_cases_are_errors_and_the_run_goes_on(tmp_path):
    data, out = small_data(tmp_path / "data", SMALL[:2]), tmp_path / "out"
    (data / "imgs" / "2DBox_US_corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    report = run(RunConfig(models=["boxfill"], data_dir=data, out_dir=out, runner="subprocess", progress=False))
    assert report.done == 2 and report.errors == 1
    rec = latest(out)[("boxfill[subprocess]", "2DBox_US_corrupt.npz")]
    assert rec["status"] == "error" and str(data / "imgs" / "2DBox_US_corrupt.npz") in rec["error"]
    assert "npz" in rec["error"] and rec["runner"] == "subprocess"


FAILING_PLUGIN = textwrap.dedent(
    '''
    """Fails on microscopy cases, sleeps on ultrasound ones, box-fills the rest."""
    import time
    import numpy as np
    from harness import SegmenterSpec, hookimpl

    class Picky:
        def segment(self, case):
            if case.modality == "Microscopy":
                raise RuntimeError("picky model refuses microscopy")
            if case.modality == "US":
                time.sleep(60)
            return np.ones(case.spatial_shape, np.uint16)

        def describe(self):
            return {"params": 1, "flops": 1, "weights": None}

    @hookimpl
    def harness_segmenters():
        return [SegmenterSpec(name="picky", title="Picky", family="test", load=lambda o: Picky())]
    '''
)


@pytest.mark.slow  # over 10 s on 2 cores (fast-set durations, 2026-12-07)
def test_subprocess_child_failure_and_timeout_are_errors_with_the_log(tmp_path):
    env = install_fake_plugin(tmp_path / "site", "picky_plugin", FAILING_PLUGIN, "picky", "0.1", "picky")
    data, out = small_data(tmp_path / "data"), tmp_path / "out"
    result = harness_cli(["run", "--models", "picky", "--runner", "subprocess", "--timeout", "8", "--data", str(data),
                          "--out", str(out), "--no-progress"], env=env, timeout=300)
    # case errors do not stop the run (the PET case still runs), but the exit status says some failed
    assert result.returncode == 1 and "2 case(s) ended in error" in result.stderr, result.stderr
    recs = latest(out)
    micro = recs[("picky[subprocess]", "2DBox_Microscopy_dsb2018-t1.npz")]
    assert micro["status"] == "error" and "harness predict exited with status 1" in micro["error"]
    assert "picky model refuses microscopy" in micro["error"]  # the child's log tail
    assert str(data / "imgs" / "2DBox_Microscopy_dsb2018-t1.npz") in micro["error"]
    us = recs[("picky[subprocess]", "2DBox_US_hc18-158.npz")]
    assert us["status"] == "error" and "exceeded --timeout 8 s" in us["error"] and 8 <= us["seconds"] < 30
    pet = recs[("picky[subprocess]", "3DBox_PET_sts024.npz")]
    assert pet["status"] == "ok" and segs_of(out, pet).max() == 1


class _WritesWrong:
    """An executor whose 'model' writes a given file into the outputs folder (no process at all)."""

    runner, what = "subprocess", "the stand-in"

    def __init__(self, write):
        self.write = write

    def execute(self, inputs, outputs, work):
        (case_file,) = list(inputs.iterdir())
        self.write(outputs, case_file.name)
        return Outcome(seconds=0.5, exit_code=0, peak_mb=10.0, memory_method="test")


@pytest.mark.parametrize("write, expected", [
    (lambda out, name: None, "wrote no output named 2DBox_US_hc18-158.npz (the outputs folder is empty)"),
    (lambda out, name: np.savez(out / "seg_0.npz", segs=np.zeros((2, 2), np.uint16)),
     "wrote no output named 2DBox_US_hc18-158.npz (it wrote seg_0.npz)"),
    (lambda out, name: np.savez(out / name, masks=np.zeros((2, 2), np.uint16)), "missing key 'segs'"),
    (lambda out, name: np.savez(out / name, segs=np.zeros((5, 7), np.uint16)), "does not match the expected"),
    (lambda out, name: np.savez(out / name, segs=np.zeros((540, 800), np.float32)), "dtype float32"),
])
def test_missing_misnamed_or_malformed_output_is_an_error_naming_the_case(tmp_path, write, expected):
    data, out = small_data(tmp_path / "data", SMALL[:1]), tmp_path / "out"
    case_path = data / "imgs" / SMALL[0]
    assert load_case(case_path).spatial_shape == (540, 800)
    config = RunConfig(models=["x"], data_dir=data, out_dir=out, runner="subprocess")
    rec = run_external_case(_WritesWrong(write), "x[subprocess]", "x", case_path, config, 2)
    assert rec["status"] == "error" and expected in rec["error"], rec["error"]
    assert rec["error"].startswith(f"while reading the output of the stand-in: {case_path}: ")
    assert rec["seconds"] == 0.5  # the run itself was timed


def test_read_output_accepts_any_integer_labels(tmp_path):
    case = load_case(DEMO / "imgs" / SMALL[0])
    np.savez(tmp_path / case.name, segs=np.ones(case.spatial_shape, np.int32))
    assert read_output(tmp_path, case, case.path, "it").dtype == np.int32
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaseRunError, match="outputs folder is empty"):
        read_output(tmp_path / "empty", case, case.path, "it")


def test_runner_settings_are_checked_before_any_work(tmp_path):
    base = dict(models=["boxfill"], data_dir=DEMO, out_dir=tmp_path)
    with pytest.raises(RunnerError, match="needs --runner docker"):
        check_config(RunConfig(**base, runner="subprocess", image="team.tar.gz"))
    auto = choice_defaults()["backend"]  # openvino where installed, else torch
    with pytest.raises(RunnerError, match=rf"as built \(the defaults: fast, fp32, {auto}\); --path faithful cannot be passed"):
        check_config(RunConfig(**base, runner="docker", path="faithful"))  # faithful runs torch: not a second change
    other = "torch" if auto == "openvino" else "onnxruntime"
    with pytest.raises(RunnerError, match=rf"--backend {other} cannot be passed"):
        check_config(RunConfig(**base, runner="docker", backend=other))
    check_config(RunConfig(**base, runner="docker", backend=auto))  # the default, named
    with pytest.raises(RunnerError, match="--timeout must be positive"):
        check_config(RunConfig(**base, timeout=-5))
    with pytest.raises(RunnerError, match="--memory 'lots'"):
        check_config(RunConfig(**base, memory="lots"))
    with pytest.raises(RunnerError, match="unknown runner"):
        check_config(RunConfig(**base, runner="kubernetes"))
    with pytest.raises(RunnerError, match="--memory"):
        check_config(RunConfig(**base, runner="docker", memory="lots"))
    assert parse_memory("8G") == 8 * 1024 ** 3 and parse_memory("64m") == 64 * 1024 ** 2
    assert parse_memory("512MB") == 512 * 1024 ** 2 and parse_memory("16777216") == 16777216
    with pytest.raises(RunnerError, match="at least 6 MiB"):
        parse_memory("4m")
    assert image_entry_name("team:latest", {"boxfill"}) == "team"
    assert image_entry_name("registry:5000/org/team", set()) == "team"
    assert image_entry_name("boxfill:latest", {"boxfill"}) == "boxfill[docker]"
    cli = harness_cli(["run", "--models", "boxfill", "--runner", "subprocess", "--image", "x.tar.gz", "--out",
                       str(tmp_path / "o")])
    assert cli.returncode == 2 and "needs --runner docker" in cli.stderr
    isolate = harness_cli(["run", "--models", "boxfill", "--runner", "subprocess", "--isolate", "--out",
                           str(tmp_path / "o")])
    assert isolate.returncode != 0 and "--isolate is the native runner's" in isolate.stderr


def test_docker_runner_without_an_engine_is_a_clear_error(tmp_path):
    import os

    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    result = harness_cli(["run", "--models", "boxfill", "--runner", "docker", "--limit", "1", "--out",
                          str(tmp_path / "out")], env=env)
    assert result.returncode == 2 and "--runner docker: no docker engine" in result.stderr
    assert "no-engine.sock" in result.stderr


# --------------------------------------------------------------------------------------------- harness predict

def test_predict_cli_segments_a_folder_and_reports_bad_files(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in SMALL:
        shutil.copy(DEMO / "imgs" / name, inputs / name)
    (inputs / "2DBox_US_broken.npz").write_bytes(b"garbage")
    outputs = tmp_path / "outputs"
    result = harness_cli(["predict", "--model", "boxfill", "-i", str(inputs), "-o", str(outputs)])
    assert result.returncode == 1
    assert f"{inputs / '2DBox_US_broken.npz'}: not an npz file" in result.stderr
    assert "1 of 4 cases failed: 2DBox_US_broken.npz" in result.stderr
    assert sorted(p.name for p in outputs.iterdir()) == sorted(SMALL)
    from plugins.boxfill import BoxFill

    for name in SMALL:
        with np.load(outputs / name) as npz:
            assert list(npz.files) == ["segs"] and npz["segs"].dtype == np.uint16
            np.testing.assert_array_equal(npz["segs"], BoxFill().segment(load_case(inputs / name)))
    clean = tmp_path / "clean"
    clean.mkdir()
    shutil.copy(DEMO / "imgs" / SMALL[0], clean / SMALL[0])
    ok = harness_cli(["predict", "--model", "boxfill", "-i", str(clean), "-o", str(tmp_path / "o2")])
    assert ok.returncode == 0 and (tmp_path / "o2" / SMALL[0]).is_file()
    bad_weights = harness_cli(["predict", "--model", "boxfill", "--weights", str(tmp_path / "nope.pth"), "-i",
                               str(clean), "-o", str(tmp_path / "o3")])
    assert bad_weights.returncode == 2 and "no such file" in bad_weights.stderr
    unknown = harness_cli(["predict", "--model", "nosuch", "-i", str(clean), "-o", str(tmp_path / "o4")])
    assert unknown.returncode == 2 and "unknown segmenter 'nosuch'" in unknown.stderr


# --------------------------------------------------------------------------------------------- leaderboard

def _rec(model, case, runner, seconds, status="ok"):
    return {"model": model, "segmenter": "m", "case": case, "modality": "US", "dim": "2D", "dsc": 0.5, "nsd": 0.5,
            "dsc_per_label": [0.5], "seconds": seconds, "peak_rss_mb": 100, "runner": runner, "threads": 2,
            "timing_mode": "in-process" if runner == "native" else "end-to-end", "status": status,
            "error": None if status == "ok" else "boom"}


def test_leaderboard_runner_overhead_on_shared_cases(tmp_path):
    with ResultsStore(tmp_path) as store:
        for case, native, sub, dock in (("c1", 1.0, 3.0, 3.5), ("c2", 2.0, 4.5, 5.5), ("c3", 3.0, 6.0, None)):
            store.append(_rec("m", case, "native", native))
            store.append(_rec("m[subprocess]", case, "subprocess", sub))
            if dock is not None:
                store.append(_rec("m[docker]", case, "docker", dock))
        store.append(_rec("m[docker]", "c3", "docker", None, status="error"))
        store.append(_rec("m[fast]", "c1", "native", 0.5))  # another variant: its own group, one runner only
    update_models(tmp_path, "m", {"segmenter": "m", "title": "Model M", "tags": []})
    update_models(tmp_path, "m[subprocess]", {"segmenter": "m", "title": "Model M", "tags": ["subprocess"]})
    update_models(tmp_path, "m[docker]", {"segmenter": "m", "title": "Model M", "tags": ["docker"]})
    update_models(tmp_path, "m[fast]", {"segmenter": "m", "title": "Model M", "tags": ["fast"]})
    overhead = runner_overhead(*load_results(tmp_path))
    assert len(overhead) == 1
    row = overhead.iloc[0]
    assert row["cases"] == 2  # c3 failed in docker: only c1, c2 are shared
    assert row["native"] == 1.5 and row["subprocess"] == 3.75 and row["docker"] == 4.5
    assert row["subprocess-native"] == 2.25 and row["docker-subprocess"] == 0.75 and row["docker-native"] == 3.0
    cells = overhead_row(render_markdown(tmp_path), "Model M")
    assert cells == ["Model M", "2", "1.50s", "3.75s", "4.50s", "+2.25s", "+0.75s", "+3.00s"]
    assert summary_json(tmp_path)["runner_overhead"][0]["docker-subprocess"] == 0.75


# --------------------------------------------------------------------------------------------- docker

LM_CASES = ["2DBox_US_hc18-158.npz", "2DBox_Endoscopy_kvasir-cju0rx1ida.npz"]  # LiteMedSAM's fastest demo cases

# A foreign team's submission: no harness, no numpy, only the Debian base's python3. It box-fills the
# case as the boxfill plugin does (so its segs must equal the native boxfill's exactly); with MODE=bad it
# misbehaves by modality instead: a misnamed output (US), a wrong shape (Microscopy), a crash (PET).
TEAM_PREDICT = textwrap.dedent(
    r'''
    import array, ast, io, math, os, struct, sys, zipfile

    IN, OUT = "/workspace/inputs", "/workspace/outputs"
    MODE = open("/workspace/mode").read().strip()
    CODES = {"<i8": "q", "<i4": "i", "<i2": "h", "|i1": "b", "<u8": "Q", "<u4": "I", "<u2": "H", "|u1": "B",
             "<f8": "d", "<f4": "f"}

    def read_npy(raw):
        major = raw[6]
        size = 2 if major == 1 else 4
        hlen = int.from_bytes(raw[8:8 + size], "little")
        header = ast.literal_eval(raw[8 + size:8 + size + hlen].decode("latin1"))
        return header, raw[8 + size + hlen:]

    def write_npz(path, shape, values):
        header = repr({"descr": "<u2", "fortran_order": False, "shape": tuple(shape)}).encode("latin1")
        pad = 64 - (10 + len(header) + 1) % 64
        npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header) + pad + 1) + header + b" " * pad + b"\n"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("segs.npy", npy + values.tobytes())

    for name in sorted(os.listdir(IN)):
        with zipfile.ZipFile(os.path.join(IN, name)) as z:
            imgs_header, _ = read_npy(z.read("imgs.npy"))
            box_header, box_raw = read_npy(z.read("boxes.npy"))
        boxes = array.array(CODES[box_header["descr"]], box_raw)
        shape = imgs_header["shape"]
        dims = 2 if name.startswith("2D") else 3
        spatial = shape[:2] if dims == 2 else shape
        segs = array.array("H", bytes(2 * math.prod(spatial)))
        width = 4 if dims == 2 else 6
        for i in range(len(boxes) // width):
            b = boxes[i * width:(i + 1) * width]
            lo, hi = (b[:2], b[2:]) if dims == 2 else (b[:3], b[3:])
            spans = [(max(0, math.floor(l)), min(n, math.ceil(h) + 1)) for l, h, n in zip(lo, hi, spatial[::-1])]
            xs, ys = spans[0], spans[1]
            zs = spans[2] if dims == 3 else (0, 1)
            row = array.array("H", [i + 1]) * (xs[1] - xs[0])
            for z in range(*zs):
                for y in range(*ys):
                    start = (z * spatial[-2] + y) * spatial[-1] + xs[0]
                    segs[start:start + len(row)] = row
        target = os.path.join(OUT, name)
        if MODE == "bad" and "_US_" in name:
            target = os.path.join(OUT, "seg_" + name)
        if MODE == "bad" and "_Microscopy_" in name:
            spatial, segs = (2, 2), array.array("H", [0, 0, 0, 1])
        if MODE == "bad" and "_PET_" in name:
            print("team model: cannot handle PET", file=sys.stderr)
            sys.exit(3)
        write_npz(target, spatial, segs)
        print("wrote", target)
    '''
)


def _build_team_image(client, tag: str, mode: str) -> str:
    """A tiny non-root image on the harness's Debian base, running TEAM_PREDICT as its predict.sh."""
    import io
    import tarfile

    from harness.container.base_image import ensure_base_image

    base = ensure_base_image(client, log=lambda _: None)
    dockerfile = (f"FROM {base}\nWORKDIR /workspace\nCOPY predict.sh team_predict.py mode /workspace/\n"
                  "USER 1000:1000\n")
    files = {"Dockerfile": dockerfile, "predict.sh": "python3 /workspace/team_predict.py\n",
             "team_predict.py": TEAM_PREDICT, "mode": mode}
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(text.encode()), 0o644
            tar.addfile(info, io.BytesIO(text.encode()))
    context.seek(0)
    client.images.build(fileobj=context, custom_context=True, tag=tag, network_mode="none", rm=True)
    return tag


@pytest.fixture(scope="module")
def docker_images(docker_client, harness_images):
    """The harness's images of boxfill and litemedsam (the session's ``harness_images``) and two tiny
    team images, by tag."""
    tags = {model: info.tag for model, info in harness_images.items()}
    tags["team"] = _build_team_image(docker_client, "medsam-harness-test/team-good:latest", "good")
    tags["bad"] = _build_team_image(docker_client, "medsam-harness-test/team-bad:latest", "bad")
    yield tags
    for key in ("team", "bad"):
        docker_client.images.remove(tags[key], force=True)


def _our_leftovers(client) -> tuple[list, list]:
    """Case containers of the docker runner still present, and cgroup parents it left behind."""
    from harness.runners.docker import EVALUATION_LABEL

    containers = client.containers.list(all=True, filters={"label": EVALUATION_LABEL})
    cgroups = list(Path("/sys/fs/cgroup").glob("*/medsamharness*")) + list(Path("/sys/fs/cgroup").glob("medsamharness*"))
    return containers, cgroups


@pytest.mark.docker
def test_docker_boxfill_limit_3_matches_native_via_cli(tmp_path, docker_images, docker_client):
    out = tmp_path / "out"
    native = harness_cli(["run", "--models", "boxfill", "--limit", "3", "--out", str(out), "--no-progress"])
    assert native.returncode == 0, native.stderr
    result = harness_cli(["run", "--models", "boxfill", "--runner", "docker", "--limit", "3", "--out", str(out),
                          "--no-progress"], timeout=600)
    assert result.returncode == 0, result.stderr
    recs = latest(out)
    cases = sorted(c for m, c in recs if m == "boxfill[docker]")
    assert len(cases) == 3 and {c[:2] for c in cases} == {"2D", "3D"}
    assert_same_segs(out, "boxfill[docker]", "boxfill", cases)
    for case in cases:
        rec = recs[("boxfill[docker]", case)]
        assert rec["runner"] == "docker" and rec["timing_mode"] == "end-to-end"
        assert rec["image"] == docker_images["boxfill"] and rec["memory_limit"] == "8G"
        # python + numpy + the harness, charged to the container's cgroup: tens of MB, under the 8G limit
        assert rec["memory_method"].startswith("cgroup v") and 20 < rec["peak_rss_mb"] < 8 * 1024
        assert rec["seconds"] > 0.3
    models = json.loads((out / "models.json").read_text())
    assert models["boxfill[docker]"]["image"] == docker_images["boxfill"] and models["boxfill[docker]"]["image_id"]
    assert "| Box fill (baseline) [docker]" in result.stdout and "## Runner overhead" in result.stdout
    assert _our_leftovers(docker_client) == ([], [])


@pytest.mark.docker
def test_docker_litemedsam_matches_native_side_by_side_with_subprocess(tmp_path, docker_images):
    data, out = small_data(tmp_path / "data", LM_CASES), tmp_path / "out"
    for runner in ("native", "subprocess", "docker"):
        report = run(RunConfig(models=["litemedsam"], data_dir=data, out_dir=out, runner=runner, threads=2,
                               progress=False))
        assert report.done == 2 and report.ok, (runner, report)
    assert_same_segs(out, "litemedsam[docker]", "litemedsam", LM_CASES)
    assert_same_segs(out, "litemedsam[subprocess]", "litemedsam", LM_CASES)
    recs = latest(out)
    for case in LM_CASES:
        rec = recs[("litemedsam[docker]", case)]
        # torch, the model and the case in the container's cgroup: hundreds of MB, under the 8G limit
        assert 200 < rec["peak_rss_mb"] < 8 * 1024 and rec["image"] == docker_images["litemedsam"]
        assert rec["seconds"] > recs[("litemedsam", case)]["seconds"]
    cells = overhead_row(render_markdown(out), "LiteMedSAM")
    assert cells[1] == "2" and all(c.endswith("s") and c != "-" for c in cells[2:])
    print("\n" + render_markdown(out).split("## Runner overhead", 1)[1].split("\n## ", 1)[0])


@pytest.mark.docker
def test_docker_out_of_memory_and_timeout_are_errors_and_leave_nothing_behind(tmp_path, docker_images,
                                                                             docker_client):
    data = small_data(tmp_path / "data", LM_CASES[:1])
    image = docker_images["litemedsam"]  # by its tag: no model load on the host, the same containers
    oom = run(RunConfig(models=[], image=image, data_dir=data, out_dir=tmp_path / "oom", runner="docker",
                        memory="64m", progress=False))
    assert oom.errors == 1 and not oom.failed_models
    rec = read_records(tmp_path / "oom" / "results.jsonl")[-1]
    assert rec["model"] == "litemedsam[docker]"  # an image named like a segmenter is never a native entry
    assert rec["status"] == "error" and rec["memory_limit"] == "64m"
    assert "while running the container" in rec["error"] and str(data / "imgs" / LM_CASES[0]) in rec["error"]
    assert "out of memory" in rec["error"] and "64m memory limit" in rec["error"]
    assert rec["peak_rss_mb"] is not None and 50 < rec["peak_rss_mb"] <= 64.5
    slow = run(RunConfig(models=[], image=image, data_dir=data, out_dir=tmp_path / "slow", runner="docker",
                         timeout=1, progress=False))
    assert slow.errors == 1
    rec = read_records(tmp_path / "slow" / "results.jsonl")[-1]
    assert rec["status"] == "error" and "timed out after 1 s (container killed)" in rec["error"]
    assert 1 <= rec["seconds"] < 10
    assert _our_leftovers(docker_client) == ([], [])


@pytest.mark.docker
def test_team_tarball_round_trip(tmp_path, docker_images, docker_client):
    from harness.container.archives import export_image

    data, out = small_data(tmp_path / "data"), tmp_path / "out"
    tarball = export_image(docker_client, docker_images["team"], tmp_path / "team.tar.gz", "team", log=lambda _: None)
    docker_client.images.remove("team:latest")  # the engine must get it from the tarball
    try:
        assert run(RunConfig(models=["boxfill"], data_dir=data, out_dir=out, progress=False)).ok
        result = harness_cli(["run", "--image", str(tarball), "--data", str(data), "--out", str(out),
                              "--no-progress"], timeout=600)
        assert result.returncode == 0, result.stderr
        assert_same_segs(out, "team", "boxfill", SMALL)
        recs = latest(out)
        assert all(recs[("team", c)]["runner"] == "docker" and recs[("team", c)]["image"] == "team:latest"
                   for c in SMALL)
        models = json.loads((out / "models.json").read_text())
        assert models["team"]["title"] == "team:latest" and models["team"]["tags"] == ["docker"]
        assert "| team:latest [docker]" in result.stdout
        # the same submission as a tag
        again = run(RunConfig(models=[], data_dir=data, out_dir=tmp_path / "out2", runner="docker",
                              image="team:latest", progress=False))
        assert again.done == 3 and again.ok
    finally:
        docker_client.images.remove("team:latest", force=True)


@pytest.mark.docker
def test_team_image_misbehaving_outputs_are_errors(tmp_path, docker_images, docker_client):
    data, out = small_data(tmp_path / "data"), tmp_path / "out"
    report = run(RunConfig(models=[], data_dir=data, out_dir=out, runner="docker", image=docker_images["bad"],
                           progress=False))
    assert report.errors == 3 and report.done == 0
    errors = {c: r["error"] for (m, c), r in latest(out).items()}
    us, micro, pet = (errors[name] for name in SMALL)
    assert "wrote no output named 2DBox_US_hc18-158.npz (it wrote seg_2DBox_US_hc18-158.npz)" in us
    assert "segs shape (2, 2) does not match the expected (" in micro
    assert "the container exited with status 3" in pet and "team model: cannot handle PET" in pet
    for name in SMALL:
        assert str(data / "imgs" / name) in errors[name]
    assert _our_leftovers(docker_client) == ([], [])
    # an image without /bin/bash: created, but it cannot start; an error, and the container is removed
    import io
    import tarfile

    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, text in {"Dockerfile": "FROM scratch\nCOPY predict.sh /workspace/predict.sh\n",
                           "predict.sh": "echo hi\n"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
    context.seek(0)
    docker_client.images.build(fileobj=context, custom_context=True, tag="medsam-harness-test/nobash:latest",
                               network_mode="none", rm=True)
    try:
        nobash = run(RunConfig(models=[], data_dir=data, out_dir=tmp_path / "o1", runner="docker", limit=1,
                               image="medsam-harness-test/nobash:latest", progress=False))
    finally:
        docker_client.images.remove("medsam-harness-test/nobash:latest", force=True)
    assert nobash.errors == 1
    rec = read_records(tmp_path / "o1" / "results.jsonl")[0]
    assert rec["error"].startswith(f"while running the container: {data / 'imgs'}") and "/bin/bash" in rec["error"]
    assert _our_leftovers(docker_client) == ([], [])
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b not really gzip")
    result = harness_cli(["run", "--image", str(junk), "--data", str(data), "--out", str(tmp_path / "o2")])
    assert result.returncode == 2 and f"--image {junk}: cannot load it" in result.stderr
    missing = harness_cli(["run", "--image", "no-such-team:latest", "--data", str(data), "--out",
                           str(tmp_path / "o3")])
    assert missing.returncode == 2 and "the engine has no such image" in missing.stderr
