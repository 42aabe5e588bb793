"""The 2025 interactive protocol through the end-to-end runners (issue 18, item 3): `harness predict` on
2025-format inputs, `--runner subprocess` (one `harness predict` process per step) on two converted 3D
validation cases, `--runner docker` (one container per step) on one with boxfill and one with litemedsam
(clicks), and `harness build --protocol interactive`."""
from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest

from harness.interactive.external import INTERACTIVE_MEMORY, run_interactive_external_record
from harness.interactive.safe_npz import is_interactive_input, write_interactive_input
from harness.predict import predict
from harness.results import read_records
from harness.run import RunConfig, check_config, run
from harness.runners.external import Outcome
from helpers import plugins_with, harness_cli, install_fake_plugin

from helpers import INTERACTIVE_CASES as CASES


def records(out: Path) -> dict[tuple[str, str], dict]:
    return {(r["model"], r["case"]): r for r in read_records(out / "results.jsonl")}


def config(data, out, models=("boxfill",), **kw) -> RunConfig:
    return RunConfig(models=list(models), data_dir=data, out_dir=out, progress=False, protocol="interactive", **kw)


# ------------------------------------------------------------------------------------- harness predict

BOX_A = {"z_min": 1, "z_max": 3, "z_mid": 2, "z_mid_x_min": 2, "z_mid_y_min": 3, "z_mid_x_max": 9, "z_mid_y_max": 10}
BOX_B = {"z_min": 0, "z_max": 4, "z_mid": 2, "z_mid_x_min": 11, "z_mid_y_min": 1, "z_mid_x_max": 14, "z_mid_y_max": 6}


def _step_input(path: Path) -> np.ndarray:
    """A 2025 step input with two classes, three click steps: class 1 fg, bg, fg; class 2 none, fg, none."""
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (5, 16, 16), dtype=np.uint8)
    prev = np.zeros(imgs.shape, np.uint8)
    prev[1:4, 3:11, 2:10] = 1
    clicks = [{"fg": [[2, 5, 5], [3, 8, 8]], "bg": [[1, 4, 9]]}, {"fg": [[2, 3, 12]], "bg": []}]
    order = [["fg", "bg", "fg"], [None, "fg", None]]
    write_interactive_input(path, imgs, (2.0, 1.0, 1.0), boxes=[BOX_A, BOX_B], clicks=clicks, clicks_order=order,
                            prev_pred=prev)
    return prev


def test_predict_takes_a_2025_input_with_clicks_for_a_point_segmenter(tmp_path):
    inputs, outputs = tmp_path / "inputs", tmp_path / "outputs"
    inputs.mkdir()
    prev = _step_input(inputs / "3DBox_CT_step.npz")
    # a 2024-format case in the same folder is read as before
    np.savez_compressed(inputs / "3DBox_CT_old.npz", imgs=np.zeros((3, 8, 8), np.uint8),
                        boxes=np.array([[1, 1, 0, 5, 5, 2]]), spacing=np.array([1.0, 1.0, 1.0]))
    assert is_interactive_input(inputs / "3DBox_CT_step.npz") and not is_interactive_input(inputs / "3DBox_CT_old.npz")
    seen = {}

    def segment(case):
        seen[case.name] = case
        segs = np.zeros(case.spatial_shape, np.uint8)
        for label, clicks in (case.clicks or {}).items():
            for z, y, x, fg in clicks:
                if fg:
                    segs[z, y, x] = label
        return segs

    plugins = plugins_with("clicky", segment, prompts=frozenset({"box", "points", "mask"}))
    report = predict("clicky", inputs, outputs, plugins=plugins, log=lambda _: None)
    assert report.ok and sorted(report.written) == ["3DBox_CT_old.npz", "3DBox_CT_step.npz"]
    case = seen["3DBox_CT_step.npz"]
    # the clicks in the order the simulated user gave them (clicks_order), fg True / bg False
    assert case.clicks == {1: [(2, 5, 5, True), (1, 4, 9, False), (3, 8, 8, True)], 2: [(2, 3, 12, True)]}
    assert np.array_equal(case.prev_segs, prev)
    assert case.boxes.tolist() == [[2, 3, 1, 9, 10, 3], [11, 1, 0, 14, 6, 4]] and case.spacing == (2.0, 1.0, 1.0)
    with np.load(outputs / "3DBox_CT_step.npz") as npz:  # the same name, key segs, as the evaluator reads it
        segs = npz["segs"]
    assert segs.shape == (5, 16, 16) and segs[2, 5, 5] == 1 and segs[3, 8, 8] == 1 and segs[2, 3, 12] == 2
    assert segs[1, 4, 9] == 0
    old = seen["3DBox_CT_old.npz"]
    assert old.clicks is None and old.prev_segs is None and old.boxes.tolist() == [[1, 1, 0, 5, 5, 2]]


def test_predict_gives_a_box_only_segmenter_neither_clicks_nor_the_previous_mask(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    _step_input(inputs / "3DBox_CT_step.npz")
    seen = []
    plugins = plugins_with("boxy", lambda case: seen.append(case) or np.zeros(case.spatial_shape, np.uint8))
    assert predict("boxy", inputs, tmp_path / "out", plugins=plugins, log=lambda _: None).ok
    assert len(seen) == 1 and seen[0].clicks is None and seen[0].prev_segs is None and seen[0].n_boxes == 2


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_predict_refuses_a_malicious_pickle_in_a_2025_input_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    boxes = np.empty(1, dtype=object)
    boxes[0] = {"z_min": _Payload()}
    np.savez(inputs / "3DBox_CT_evil.npz", imgs=np.zeros((3, 8, 8), np.uint8), spacing=np.ones(3), boxes=boxes)
    seen = []
    plugins = plugins_with("boxy", lambda case: seen.append(case) or np.zeros(case.spatial_shape, np.uint8))
    report = predict("boxy", inputs, tmp_path / "out", plugins=plugins, log=lambda _: None)
    message = report.failed["3DBox_CT_evil.npz"]
    assert "refused global" in message and "system" in message and "3DBox_CT_evil.npz" in message
    assert not seen and not (tmp_path / "PWNED").exists() and not (tmp_path / "out" / "3DBox_CT_evil.npz").exists()


# -------------------------------------------------------------------------- the step function, no process

class _Scripted:
    """An executor without a process: box-fills each step's input, or fails at ``fail_at`` as told."""

    runner, what = "subprocess", "the stand-in"
    work_dir = None

    def __init__(self, fail_at: int | None = None, how: str = "exit"):
        self.fail_at, self.how, self.calls = fail_at, how, []

    def execute(self, inputs, outputs, work):
        from harness.interactive.safe_npz import read_interactive_input

        (case_file,) = list(inputs.iterdir())  # the step's input, alone in a fresh folder
        self.calls.append((inputs, case_file.name))
        step = len(self.calls)
        if step == self.fail_at and self.how == "exit":
            return Outcome(1.5, 1, 12.0, "test", log="Traceback...\nRuntimeError: boom", problem="exited with status 1")
        inp = read_interactive_input(case_file)
        segs = np.zeros(inp.shape, np.uint16)
        for i, b in enumerate(inp.boxes):
            segs[b["z_min"]:b["z_max"] + 1, b["z_mid_y_min"]:b["z_mid_y_max"] + 1,
                 b["z_mid_x_min"]:b["z_mid_x_max"] + 1] = i + 1
        if step == self.fail_at and self.how == "shape":
            segs = segs[:-1]
        if not (step == self.fail_at and self.how == "none"):
            np.savez_compressed(outputs / case_file.name, segs=segs)
        return Outcome(0.25 * step, 0, 10.0 * step, "test")


@pytest.mark.parametrize("how, words", [
    ("exit", "exited with status 1"),
    ("none", "wrote no output named"),
    ("shape", "does not match"),
])
def test_a_failing_step_is_the_cases_error_row_naming_the_step(converted, tmp_path, how, words):
    executor = _Scripted(fail_at=4, how=how)
    cfg = config(converted, tmp_path / "out", runner="subprocess")
    case = converted / "imgs" / CASES[1]
    rec = run_interactive_external_record(executor, "m[subprocess,interactive]", "m", case, cfg, 1)
    assert rec["status"] == "error" and len(executor.calls) == 4
    assert "step 4" in rec["error"] and words in rec["error"] and str(case) in rec["error"]
    assert not (tmp_path / "out" / ".interactive").exists()


def test_each_step_runs_once_on_its_own_input_with_end_to_end_times(converted, tmp_path):
    executor = _Scripted()
    cfg = config(converted, tmp_path / "out", runner="subprocess")
    rec = run_interactive_external_record(executor, "m[subprocess,interactive]", "m", converted / "imgs" / CASES[1],
                                          cfg, 1, prompts=["box"])
    assert rec["status"] == "ok", rec["error"]
    assert len(executor.calls) == 6 and len({inputs for inputs, _ in executor.calls}) == 6  # a fresh folder each
    assert {name for _, name in executor.calls} == {CASES[1]}
    assert rec["timing_mode"] == "end-to-end" and rec["seconds_per_step"] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    assert rec["seconds"] == pytest.approx(5.25) and rec["peak_rss_mb"] == 60.0 and rec["memory_method"] == "test"
    assert rec["exit_codes"] == [0] * 6 and rec["n_boxes"] >= 1 and rec["prompts"] == ["box"]


# ------------------------------------------------------------------------------ --runner subprocess

@pytest.mark.slow
def test_subprocess_runs_six_processes_per_case_with_the_natives_segs(converted, tmp_path):
    out = tmp_path / "out"
    assert run(config(converted, out)).errors == 0  # the native run, for comparison
    report = run(config(converted, out, runner="subprocess"))
    assert (report.done, report.errors) == (2, 0)
    recs = records(out)
    for name in CASES:
        r, native = recs[("boxfill[subprocess,interactive]", name)], recs[("boxfill[interactive]", name)]
        assert r["status"] == "ok", r["error"]
        assert r["runner"] == "subprocess" and r["timing_mode"] == "end-to-end" and r["protocol"] == "interactive"
        assert len(r["steps"]) == 6 and len(r["seconds_per_step"]) == 6 and r["exit_codes"] == [0] * 6
        # a process start, imports and the model load per step: far above the native step's segmentation
        assert min(r["seconds_per_step"]) > 0.2 and r["seconds"] == pytest.approx(sum(r["seconds_per_step"]))
        assert r["peak_rss_mb"] > 20 and r["memory_method"].startswith("VmHWM")
        assert [s["clicks"] for s in r["steps"]] == [s["clicks"] for s in native["steps"]]
        assert r["dsc_per_step"] == native["dsc_per_step"] and r["nsd_per_step"] == native["nsd_per_step"]
        with np.load(out / r["segs"]) as a, np.load(out / native["segs"]) as b:
            assert np.array_equal(a["all_segs"], b["all_segs"]) and a["all_segs"].shape[0] == 6
        print(f"\n{name}: subprocess seconds per step {[round(s, 2) for s in r['seconds_per_step']]}, "
              f"native {[round(s, 4) for s in native['seconds_per_step']]}, peak {r['peak_rss_mb']:.0f} MB")
    models = json.loads((out / "models.json").read_text())
    entry = models["boxfill[subprocess,interactive]"]
    assert entry["protocol"] == "interactive" and entry["runner"] == "subprocess" and entry["prompts"] == ["box"]
    assert not (out / ".interactive").exists() and not list(out.glob(".case.*"))
    again = run(config(converted, out, runner="subprocess"))  # resume: nothing runs again
    assert (again.done, again.skipped) == (0, 2)


CLICK_PLUGIN = textwrap.dedent(
    '''
    """Box-fills, and fails once the input carries two clicks per class (step 3)."""
    import numpy as np
    from harness import SegmenterSpec, hookimpl

    class Tired:
        def segment(self, case):
            if case.clicks and max(len(c) for c in case.clicks.values()) >= 2:
                raise RuntimeError("too many clicks for this model")
            segs = np.zeros(case.spatial_shape, np.uint8)
            for i, (x0, y0, z0, x1, y1, z1) in enumerate(case.boxes):
                segs[z0:z1 + 1, y0:y1 + 1, x0:x1 + 1] = i + 1
            return segs

        def describe(self):
            return {"params": 1, "flops": 1, "weights": None}

    @hookimpl
    def harness_segmenters():
        return [SegmenterSpec(name="tired", title="Tired", family="test", load=lambda o: Tired(),
                              prompts=frozenset({"box", "points"}))]
    '''
)


@pytest.mark.slow
def test_subprocess_a_step_whose_process_fails_is_an_error_row_naming_it(converted, tmp_path):
    env = install_fake_plugin(tmp_path / "site", "tired_plugin", CLICK_PLUGIN, "tired", "0.1", "tired")
    data = tmp_path / "data"
    for sub in ("imgs", "gts"):
        (data / sub).mkdir(parents=True)
        shutil.copy(converted / sub / CASES[1], data / sub / CASES[1])
    out = tmp_path / "out"
    result = harness_cli(["run", "--protocol", "interactive", "--models", "tired", "--runner", "subprocess",
                          "--data", str(data), "--out", str(out), "--no-progress"], env=env, timeout=600)
    assert result.returncode == 1, result.stderr
    rec = records(out)[("tired[subprocess,interactive]", CASES[1])]
    assert rec["status"] == "error" and rec["exit_codes"] == [0, 0, 1]
    assert "step 3" in rec["error"] and "harness predict exited with status 1" in rec["error"]
    assert "too many clicks for this model" in rec["error"]  # the child's log tail
    assert not (out / ".interactive").exists() and not list(out.glob(".case.*"))


# ----------------------------------------------------------------------------------- settings

def test_the_external_runners_take_the_protocol_and_docker_defaults_to_32g(tmp_path):
    cfg = config(tmp_path, tmp_path / "out", runner="subprocess", timeout=30.0, memory="4g")
    assert type(check_config(cfg)).__name__ == "InteractiveSubprocessRunner"
    cfg = config(tmp_path, tmp_path / "out", runner="docker")
    runner = check_config(cfg)
    assert type(runner).__name__ == "InteractiveDockerRunner" and runner.default_memory == INTERACTIVE_MEMORY == "32G"
    assert runner.foreign_entry("team:latest", set(), cfg) == "team[interactive]"
    assert runner.foreign_entry("boxfill:latest", {"boxfill"}, cfg) == "boxfill[docker,interactive]"
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ harness build

@pytest.mark.parametrize("command", ["build", "export"])
def test_build_protocol_interactive_makes_the_full_image_and_refuses_slim(tmp_path, monkeypatch, capsys, command):
    import harness.container.client as client_module
    import harness.container.model_image as model_image
    from harness.cli import main
    from harness.container.common import ImageInfo

    built = []

    def fake_build(model, **kw):
        built.append((model, kw))
        return ImageInfo(tag=f"medsam-harness/{model}:test", id="sha256:" + "0" * 64, size_bytes=1, model=model)

    monkeypatch.setattr(client_module, "connect", lambda: object())
    monkeypatch.setattr(model_image, "build_image", fake_build)
    monkeypatch.setattr("harness.container.archives.export_image", lambda *a, **k: None)
    which = ["--models", "litemedsam"] if command == "build" else ["--model", "litemedsam", "-o",
                                                                   str(tmp_path / "team.tar.gz")]
    if command == "export":
        (tmp_path / "team.tar.gz").write_bytes(b"x")
    # auto would pick the slim image for litemedsam; the protocol needs the full one, labelled
    assert main([command, *which, "--protocol", "interactive"]) == 0
    assert built == [("litemedsam", {"tag": None, "weights": None, "client": built[0][1]["client"],
                                      "log": built[0][1]["log"], "extra_weights": {},
                                      "labels": {"protocol": "interactive"}})]
    with pytest.raises(SystemExit, match="needs the full runtime"):
        main([command, *which, "--protocol", "interactive", "--runtime", "slim"])
    assert len(built) == 1


# ------------------------------------------------------------------------------------- --runner docker

@pytest.mark.docker
@pytest.mark.slow
def test_docker_runs_one_container_per_step_with_the_natives_segs(converted, tmp_path, harness_images,
                                                                  docker_client):
    data = tmp_path / "data"
    for sub in ("imgs", "gts"):
        (data / sub).mkdir(parents=True)
        shutil.copy(converted / sub / CASES[1], data / sub / CASES[1])
    out = tmp_path / "out"
    assert run(config(data, out)).errors == 0
    tag = harness_images["boxfill"].tag
    report = run(config(data, out, runner="docker", image=tag))  # the session's boxfill image, by tag
    assert (report.done, report.errors) == (1, 0)
    recs = records(out)
    r, native = recs[("boxfill[docker,interactive]", CASES[1])], recs[("boxfill[interactive]", CASES[1])]
    assert r["status"] == "ok", r["error"]
    assert r["runner"] == "docker" and r["timing_mode"] == "end-to-end" and r["image"] == tag
    assert r["memory_limit"] == "32G" and r["exit_codes"] == [0] * 6 and len(r["seconds_per_step"]) == 6
    assert r["memory_method"].startswith("cgroup v") and r["peak_rss_mb"] > 20
    assert r["dsc_per_step"] == native["dsc_per_step"]
    with np.load(out / r["segs"]) as a, np.load(out / native["segs"]) as b:
        assert np.array_equal(a["all_segs"], b["all_segs"])
    print(f"\ndocker seconds per step {[round(s, 2) for s in r['seconds_per_step']]}, peak {r['peak_rss_mb']:.0f} MB")
    from harness.runners.docker import EVALUATION_LABEL

    assert docker_client.containers.list(all=True, filters={"label": EVALUATION_LABEL}) == []


@pytest.mark.docker
@pytest.mark.slow
def test_docker_litemedsam_with_clicks_gives_the_natives_segs_at_every_step(converted, tmp_path, harness_images):
    """The harness's litemedsam image takes the clicks (points and the previous mask) in its fresh container
    at each step, as the model does natively: identical segs per step."""
    data = tmp_path / "data"
    for sub in ("imgs", "gts"):
        (data / sub).mkdir(parents=True)
        shutil.copy(converted / sub / CASES[1], data / sub / CASES[1])
    out = tmp_path / "out"
    assert run(config(data, out, models=("litemedsam",))).errors == 0
    tag = harness_images["litemedsam"].tag
    assert run(config(data, out, models=("litemedsam",), runner="docker", image=tag)).errors == 0
    recs = records(out)
    r, native = recs[("litemedsam[docker,interactive]", CASES[1])], recs[("litemedsam[interactive]", CASES[1])]
    assert r["status"] == "ok" and r["prompts"] == ["box", "mask", "points"] == native["prompts"]
    assert [s["clicks"] for s in r["steps"]] == [s["clicks"] for s in native["steps"]]
    assert r["dsc_per_step"] == native["dsc_per_step"]
    with np.load(out / r["segs"]) as a, np.load(out / native["segs"]) as b:
        assert np.array_equal(a["all_segs"], b["all_segs"])
    print(f"\nlitemedsam DSC per step {[round(d, 4) for d in r['dsc_per_step']]}; docker seconds per step "
          f"{[round(s, 2) for s in r['seconds_per_step']]} (native {[round(s, 2) for s in native['seconds_per_step']]}),"
          f" peak {r['peak_rss_mb']:.0f} MB (native {native['peak_rss_mb']:.0f} MB)")
