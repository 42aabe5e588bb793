"""harness run --protocol interactive, natively, on two real 3D validation cases converted with
harness convert --to interactive (issue 18, item 3)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from harness.cases import Case
from harness.interactive.safe_npz import read_interactive_input
from harness.run import RunConfig, check_config, run
from harness.runners.base import RunnerError
from helpers import plugins_with

from helpers import INTERACTIVE_CASES as CASES


def records(out: Path) -> dict[str, dict]:
    return {r["case"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def config(data, out, models=("boxfill",), **kw) -> RunConfig:
    return RunConfig(models=list(models), data_dir=data, out_dir=out, progress=False, protocol="interactive", **kw)


def test_boxfill_runs_six_steps_per_case_with_the_protocol_fields(converted, tmp_path):
    out = tmp_path / "out"
    report = run(config(converted, out))
    assert (report.done, report.errors) == (2, 0)
    recs = records(out)
    assert set(recs) == set(CASES)
    for name, r in recs.items():
        assert r["model"] == "boxfill[interactive]" and r["protocol"] == "interactive" and r["status"] == "ok"
        assert r["n_clicks"] == 5 and len(r["steps"]) == 6 and len(r["seconds_per_step"]) == 6
        assert r["steps"][0]["clicks"] == [] and r["modality"] == "PET" and r["dim"] == "3D"
        for step in r["steps"][1:]:  # one click per class: label, fg/bg and where
            assert len(step["clicks"]) == len(r["labels"])
            for click in step["clicks"]:
                assert click is None or (set(click) == {"label", "kind", "z", "y", "x"}
                                         and click["kind"] in ("fg", "bg"))
        # a box-only segmenter ignores the clicks: the same segs, so the same DSC, at every step
        assert len(set(r["dsc_per_step"])) == 1
        assert r["dsc"] == r["dsc_per_step"][-1] and r["dsc_auc"] == pytest.approx(4 * r["dsc"])
        assert r["seconds"] == pytest.approx(sum(r["seconds_per_step"]))
        assert r["peak_rss_mb"] > 0 and r["cap_exceeded"] is False and r["prompts"] == ["box"]
        with np.load(out / r["segs"]) as npz:
            assert npz["all_segs"].shape[0] == 6
            assert np.array_equal(npz["all_segs"][-1], npz["segs"])
    assert not (out / ".interactive").exists()  # the per-case working folders are gone
    models = json.loads((out / "models.json").read_text())
    assert models["boxfill[interactive]"]["protocol"] == "interactive"
    # resume: everything recorded, nothing runs again
    again = run(config(converted, out))
    assert (again.done, again.skipped) == (0, 2)


def test_a_point_segmenter_gets_the_clicks_in_order_and_the_previous_mask(converted, tmp_path):
    seen: list[Case] = []

    def segment(case):
        seen.append(case)
        segs = np.zeros(case.spatial_shape, np.uint8)
        for label, clicks in (case.clicks or {}).items():
            for z, y, x, fg in clicks:
                if fg:
                    segs[max(z - 2, 0):z + 3, max(y - 2, 0):y + 3, max(x - 2, 0):x + 3] = label
        return segs

    plugins = plugins_with("clicky", segment, prompts=frozenset({"box", "points", "mask"}))
    out = tmp_path / "out"
    report = run(config(converted, out, models=("clicky",), limit=1), plugins)
    assert report.errors == 0
    r = next(iter(records(out).values()))
    assert len(seen) == 6 and seen[0].clicks is None and seen[0].prev_segs is None
    given = [c for step in r["steps"][1:] for c in step["clicks"] if c is not None]
    last = seen[-1].clicks
    assert sum(len(v) for v in last.values()) == len(given)
    for label, clicks in last.items():  # in the order the simulated user gave them
        mine = [(c["z"], c["y"], c["x"], c["kind"] == "fg") for c in given if c["label"] == r["labels"][label - 1]]
        assert clicks == mine
    assert seen[-1].prev_segs is not None and seen[-1].prev_segs.shape == seen[-1].spatial_shape
    assert seen[1].boxes.shape == (len(r["labels"]), 6)
    # each box is [x_min, y_min, z_min, x_max, y_max, z_max] from the input's per-class dict
    boxes = read_interactive_input(converted / "imgs" / r["case"]).boxes
    b = boxes[0]
    assert list(seen[0].boxes[0]) == [b["z_mid_x_min"], b["z_mid_y_min"], b["z_min"], b["z_mid_x_max"],
                                      b["z_mid_y_max"], b["z_max"]]


def test_a_box_only_segmenter_never_sees_clicks(converted, tmp_path):
    seen = []
    plugins = plugins_with("boxy", lambda case: seen.append(case) or np.zeros(case.spatial_shape, np.uint8))
    run(config(converted, tmp_path / "out", models=("boxy",), limit=1), plugins)
    assert len(seen) == 6 and all(c.clicks is None and c.prev_segs is None for c in seen)


def test_bad_cases_are_error_rows_and_an_interrupted_case_runs_from_step_one(converted, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(converted, data)
    (data / "imgs" / "3DBox_PET_bad.npz").write_bytes(b"not a zip")
    shutil.copy(data / "gts" / CASES[0], data / "gts" / "3DBox_PET_bad.npz")
    shutil.copy(data / "imgs" / CASES[1], data / "imgs" / "3DBox_PET_nogts.npz")
    out = tmp_path / "out"
    # a case killed mid-steps leaves its working folder with a stale output: it is cleared, not reused
    stale = out / ".interactive" / "boxfill[interactive]" / CASES[0] / "outputs"
    stale.mkdir(parents=True)
    np.savez(stale / CASES[0], segs=np.full((3, 3, 3), 7, np.uint8))
    report = run(config(data, out))
    assert (report.done, report.errors) == (2, 2)
    recs = records(out)
    assert recs[CASES[0]]["status"] == "ok" and len(recs[CASES[0]]["steps"]) == 6
    assert "3DBox_PET_bad.npz" in recs["3DBox_PET_bad.npz"]["error"]
    nogts = recs["3DBox_PET_nogts.npz"]["error"]
    assert "gts/3DBox_PET_nogts.npz" in nogts and "no ground truth" in nogts
    assert not (out / ".interactive").exists()


def test_a_failing_segmenter_is_an_error_row_naming_the_step(converted, tmp_path):
    calls = []

    def segment(case):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return np.zeros(case.spatial_shape, np.uint8)

    out = tmp_path / "out"
    run(config(converted, out, models=("flaky",)), plugins_with("flaky", segment))
    recs = records(out)
    errors = [r for r in recs.values() if r["status"] == "error"]
    assert len(errors) == 1 and "step 3" in errors[0]["error"] and "boom" in errors[0]["error"]
    assert sum(r["status"] == "ok" for r in recs.values()) == 1


@pytest.mark.parametrize("change, words", [
    ({"runner": "ray"}, "native, subprocess or docker"),
    ({"runner": "native", "image": "team.tar.gz"}, "--image"),
    ({"timeout": 5.0}, "--timeout"),
    ({"clicks": -1}, "--clicks"),
    ({"protocol": "bogus"}, "unknown protocol"),
])
def test_settings_the_protocol_cannot_honour_are_refused_before_any_work(tmp_path, change, words):
    cfg = RunConfig(models=["boxfill"], data_dir=tmp_path, out_dir=tmp_path / "out", protocol="interactive")
    for key, value in change.items():
        setattr(cfg, key, value)
    with pytest.raises(RunnerError, match=words):
        check_config(cfg)
    assert not (tmp_path / "out").exists()
