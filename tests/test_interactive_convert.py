"""harness convert --to interactive and harness clicks (issue 18)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from harness.cli import main
from harness.interactive.clicks import simulate_clicks
from harness.interactive.convert import boxes_from_gts, convert_to_interactive
from harness.interactive.safe_npz import read_interactive_input
from reference import require_data


def _first_shift(seed=2025):
    return int(np.random.RandomState(seed).randint(0, 6, 1)[0])


def test_box_rule_middle_of_unique_slices_and_scaled_shift():
    gts = np.zeros((10, 256, 512), np.uint8)  # W = 512: the x shift is twice the drawn one, y once
    gts[2, 100:110, 200:210] = 1
    gts[3, 90:95, 190:300] = 1
    gts[4, 100:101, 250:251] = 1
    gts[5, 100:120, 220:230] = 1          # slices 2..5: unique middle is 4 (the upper of two), not the voxel median
    shift = _first_shift()
    box = boxes_from_gts(gts)[0]
    assert (box["z_min"], box["z_max"], box["z_mid"]) == (2, 5, 4)
    assert box["z_mid_x_min"] == 250 - int(shift * 512 / 256) and box["z_mid_x_max"] == 250 + int(shift * 2)
    assert box["z_mid_y_min"] == 100 - shift and box["z_mid_y_max"] == 100 + shift


def test_boxes_are_clipped_and_one_shift_is_drawn_per_class_in_label_order():
    gts = np.zeros((3, 256, 256), np.uint8)
    gts[1, 0:5, 250:256] = 4
    gts[1, 50:60, 50:60] = 9
    rng = np.random.RandomState(2025)
    s4, s9 = int(rng.randint(0, 6, 1)[0]), int(rng.randint(0, 6, 1)[0])
    b4, b9 = boxes_from_gts(gts)
    assert b4["z_mid_y_min"] == 0 and b4["z_mid_x_max"] == 255  # clipped to the image
    assert b4["z_mid_x_min"] == 250 - s4 and b4["z_mid_y_max"] == 4 + s4
    assert (b9["z_mid_x_min"], b9["z_mid_x_max"]) == (50 - s9, 59 + s9)
    assert boxes_from_gts(gts) == [b4, b9]  # reseeded per case: same boxes every time


@pytest.fixture()
def small_dataset(tmp_path):
    data = require_data()
    src = tmp_path / "src"
    for sub in ("imgs", "gts"):
        (src / sub).mkdir(parents=True)
        for name in ("3DBox_PET_sts002.npz", "3DBox_PET_sts024.npz", "2DBox_US_hc18-084.npz"):
            shutil.copy(data / sub / name, src / sub / name)
    return src


def test_convert_writes_inputs_without_gts_and_separate_gts(small_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    (small_dataset / "imgs" / "3DBox_MR_broken.npz").write_bytes(b"junk")  # one bad case
    assert main(["convert", "--to", "interactive", str(small_dataset), str(out)]) == 1
    captured = capsys.readouterr()
    assert "converted 2 3D case(s)" in captured.out and "skipped 1 2D" in captured.out
    assert "3DBox_MR_broken.npz" in captured.err
    assert sorted(p.name for p in (out / "imgs").iterdir()) == ["3DBox_PET_sts002.npz", "3DBox_PET_sts024.npz"]
    for name in ("3DBox_PET_sts002.npz", "3DBox_PET_sts024.npz"):
        with np.load(out / "imgs" / name, allow_pickle=True) as npz:
            assert sorted(npz.files) == ["boxes", "imgs", "spacing"]
        case = read_interactive_input(out / "imgs" / name)
        with np.load(small_dataset / "gts" / name) as src, np.load(out / "gts" / name) as gt:
            assert np.array_equal(gt["gts"], src["gts"]) and np.allclose(gt["spacing"], case.spacing)
            assert case.boxes == boxes_from_gts(src["gts"])
            zs = np.flatnonzero(src["gts"].any(axis=(1, 2)))
            assert case.boxes[0]["z_min"] == zs[0] and case.boxes[0]["z_max"] == zs[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # nothing written elsewhere


def test_convert_refuses_to_overwrite_its_inputs(small_dataset):
    before = sorted(p.name for p in (small_dataset / "imgs").iterdir())
    with pytest.raises(ValueError, match="overwrite"):
        convert_to_interactive(small_dataset, small_dataset)
    with pytest.raises(SystemExit, match="overwrite"):
        main(["convert", "--to", "interactive", str(small_dataset), str(small_dataset) + "/"])
    assert sorted(p.name for p in (small_dataset / "imgs").iterdir()) == before


def test_clicks_command_prints_the_next_click_per_class(tmp_path, capsys):
    gts = np.zeros((8, 10, 12), np.uint8)
    gts[1:6, 1:6, 1:6] = 1
    gts[6:8, 8:10, 8:12] = 2
    pred = gts.copy()
    pred[pred == 1] = 0
    np.savez(tmp_path / "gts.npz", gts=gts)
    np.savez(tmp_path / "pred.npz", segs=pred.astype(np.uint16), prev_pred=gts)
    assert main(["clicks", "--pred", str(tmp_path / "pred.npz"), "--gts", str(tmp_path / "gts.npz")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == [{"label": 1, "kind": "fg", "z": 3, "y": 3, "x": 3}, None]
    assert printed[0] == simulate_clicks(pred, gts)[0].to_dict()
    assert main(["clicks", "--pred", str(tmp_path / "pred.npz"), "--gts", str(tmp_path / "gts.npz"),
                 "--key", "prev_pred"]) == 0
    assert json.loads(capsys.readouterr().out) == [None, None]
    with pytest.raises(SystemExit, match="missing key 'nope'"):
        main(["clicks", "--pred", str(tmp_path / "pred.npz"), "--gts", str(tmp_path / "gts.npz"), "--key", "nope"])
