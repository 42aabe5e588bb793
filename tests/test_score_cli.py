"""`harness score`: the drop-in for the challenge's compute_metrics.py."""
from __future__ import annotations

import csv
import io

import numpy as np

from harness.cases import save_segs
from harness.metrics import case_metrics
from helpers import DEMO, harness_cli


def test_score_cli_writes_full_precision_csv(tmp_path):
    segs_dir = tmp_path / "segs"
    expected = {}
    for gts_path in sorted((DEMO / "gts").glob("*.npz")):
        with np.load(gts_path) as npz:
            gts = npz["gts"]
            spacing = npz["spacing"] if gts.ndim == 3 else None
        segs = np.roll(gts, 2, axis=-1)  # a near miss: DSC below 1, NSD defined
        if gts_path.name.startswith("2DBox_US"):
            continue  # left out: must come back as an error row
        save_segs(segs_dir / gts_path.name, segs)
        expected[gts_path.name] = case_metrics(gts, segs, spacing)
    out = tmp_path / "metrics.csv"
    result = harness_cli(["score", "--segs", str(segs_dir), "--gts", str(DEMO / "gts"), "-o", str(out)])
    assert result.returncode == 1, result.stderr  # every case scored or reported, and one could not be
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert list(rows[0])[:3] == ["case", "dsc", "nsd"] and "modality" in rows[0]
    assert len(rows) == 6
    for row in rows:
        if row["case"] in expected:
            assert float(row["dsc"]) == expected[row["case"]].dsc  # round-trips exactly: full precision
            assert float(row["nsd"]) == expected[row["case"]].nsd
            assert not row["error"]
        else:
            assert row["modality"] == "US" and row["error"] and float(row["dsc"]) == 0.0
    assert "could not be scored" in result.stderr


def test_score_takes_3d_spacing_from_imgs_when_gts_lacks_it(tmp_path):
    name = "3DBox_CT_sts025.npz"
    with np.load(DEMO / "gts" / name) as npz:
        gts = npz["gts"]
    (tmp_path / "gts").mkdir()
    np.savez_compressed(tmp_path / "gts" / name, gts=gts)  # no spacing
    save_segs(tmp_path / "segs" / name, gts)
    base = ["score", "--segs", str(tmp_path / "segs"), "--gts", str(tmp_path / "gts")]
    without = list(csv.DictReader(io.StringIO(harness_cli(base).stdout)))
    assert "without 'spacing'" in without[0]["error"]
    with_imgs = list(csv.DictReader(io.StringIO(harness_cli(base + ["--imgs", str(DEMO / "imgs")]).stdout)))
    assert with_imgs[0]["error"] == "" and float(with_imgs[0]["dsc"]) == 1.0 and float(with_imgs[0]["nsd"]) == 1.0


def test_score_refuses_a_missing_gts_folder(tmp_path):
    result = harness_cli(["score", "--segs", str(tmp_path), "--gts", str(tmp_path / "nope")])
    assert result.returncode == 2 and "no such ground-truth folder" in result.stderr
