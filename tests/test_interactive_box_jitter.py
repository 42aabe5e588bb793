"""harness run --box-jitter: seeded box perturbation sweeps (issue 18, item 1)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from harness.cases import load_case
from harness.jitter import jitter_amplitudes, jitter_boxes, jittered_data_dir, parse_levels, run_box_jitter
from harness.run import RunConfig, run
from harness.runners.base import RunnerError
from helpers import DEMO


def test_levels_are_parsed_strictly():
    assert parse_levels("0, 5,10,5") == (0, 5, 10)
    for bad in ("-1", "a", ""):
        with pytest.raises(ValueError):
            parse_levels(bad)


def test_amplitudes_scale_with_image_size_and_z_by_physical_distance():
    assert jitter_amplitudes(10, (256, 512)) == (20, 10)  # (a_x, a_y) for (H, W)
    # 3D: 20 px * 0.5 mm = 10 mm in x, 10 px * 1 mm in y: mean 10 mm, 2.5 mm slices: 4 slices
    assert jitter_amplitudes(10, (40, 256, 512), spacing=(2.5, 1.0, 0.5)) == (20, 10, 4)
    assert jitter_amplitudes(0, (40, 256, 512), spacing=(2.5, 1.0, 0.5)) == (0, 0, 0)


def test_sides_move_both_ways_within_the_amplitude_and_stay_in_the_image():
    rng = np.random.default_rng(0)
    boxes = np.tile(np.array([[100, 60, 5, 140, 90, 20]]), (400, 1))
    shape = (30, 256, 256)
    out = jitter_boxes(boxes, shape, 10, rng, spacing=(1.0, 1.0, 1.0))
    delta = out - boxes
    amps = jitter_amplitudes(10, shape, (1.0, 1.0, 1.0))
    for axis, a in enumerate(amps):
        assert np.abs(delta[:, axis]).max() == a and np.abs(delta[:, axis + 3]).max() == a
        assert (delta[:, axis] > 0).any() and (delta[:, axis] < 0).any()  # inward and outward
    edge = jitter_boxes(np.array([[0, 0, 0, 255, 255, 29]]), shape, 20, np.random.default_rng(1), (1.0, 1.0, 1.0))
    assert edge.min() >= 0 and edge[0, 3] <= 255 and edge[0, 5] <= 29
    tiny = jitter_boxes(np.array([[50, 50, 52, 52]] * 50), (256, 256), 20, np.random.default_rng(2))
    assert (tiny[:, 0] <= tiny[:, 2]).all() and (tiny[:, 1] <= tiny[:, 3]).all()  # crossed sides collapse


def test_same_seed_same_boxes_whatever_the_order(tmp_path):
    a = jittered_data_dir(DEMO, tmp_path / "a", 10, seed=3)
    b = jittered_data_dir(DEMO, tmp_path / "b", 10, seed=3,
                          cases=sorted((DEMO / "imgs").glob("*.npz"), reverse=True))
    c = jittered_data_dir(DEMO, tmp_path / "c", 10, seed=4)
    assert jittered_data_dir(DEMO, tmp_path / "a", 0, seed=3) == DEMO  # level 0: the cases as they are
    differs = 0
    for path in sorted((DEMO / "imgs").glob("*.npz")):
        orig = load_case(path)
        ba, bb, bc = (load_case(d / "imgs" / path.name).boxes for d in (a, b, c))
        assert np.array_equal(ba, bb)
        differs += not np.array_equal(ba, bc)
        assert ba.shape == orig.boxes.shape and not np.array_equal(ba, orig.boxes)
        with np.load(path) as src, np.load(a / "imgs" / path.name) as dst:
            assert np.array_equal(src["imgs"], dst["imgs"])  # only the boxes change
    assert differs >= 1
    assert (a / "gts").resolve() == (DEMO / "gts").resolve()
    # 3D boxes move in z on at least one demo case
    moved_z = [not np.array_equal(load_case(a / "imgs" / p.name).boxes[:, [2, 5]], load_case(p).boxes[:, [2, 5]])
               for p in sorted((DEMO / "imgs").glob("3D*.npz"))]
    assert any(moved_z)


def _records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]


def test_sweep_entries_and_level_zero_equals_the_plain_run(tmp_path):
    base = dict(models=["boxfill"], data_dir=DEMO, progress=False)
    plain = run(RunConfig(out_dir=tmp_path / "plain", **base), log=lambda *a: None)
    assert plain.ok
    report = run_box_jitter(RunConfig(out_dir=tmp_path / "sweep", **base), "0,10", seed=0, log=lambda *a: None)
    assert report.ok and report.done == 12
    records = _records(tmp_path / "sweep")
    assert sorted({r["model"] for r in records}) == ["boxfill[jitter=0]", "boxfill[jitter=10]"]
    changed = 0
    for path in sorted((DEMO / "imgs").glob("*.npz")):
        with np.load(tmp_path / "plain" / "segs" / "boxfill" / path.name) as p, \
                np.load(tmp_path / "sweep" / "segs" / "boxfill[jitter=0]" / path.name) as z, \
                np.load(tmp_path / "sweep" / "segs" / "boxfill[jitter=10]" / path.name) as j:
            assert np.array_equal(p["segs"], z["segs"])
            changed += not np.array_equal(p["segs"], j["segs"])
    assert changed >= 1
    plain_dsc = {r["case"]: r["dsc"] for r in _records(tmp_path / "plain")}
    zero_dsc = {r["case"]: r["dsc"] for r in records if r["model"] == "boxfill[jitter=0]"}
    assert plain_dsc == zero_dsc
    # resumed: nothing runs again
    again = run_box_jitter(RunConfig(out_dir=tmp_path / "sweep", **base), "0,10", seed=0, log=lambda *a: None)
    assert again.done == 0 and again.skipped == 12


def test_bad_levels_and_images_are_refused_before_work(tmp_path):
    with pytest.raises(RunnerError, match="box-jitter"):
        run_box_jitter(RunConfig(models=["boxfill"], data_dir=DEMO, out_dir=tmp_path, progress=False), "5,x")
    with pytest.raises(RunnerError, match="--image"):
        run_box_jitter(RunConfig(models=[], data_dir=DEMO, out_dir=tmp_path, image="team.tar.gz", runner="docker",
                                 progress=False), "5")
    assert not any(tmp_path.iterdir())
