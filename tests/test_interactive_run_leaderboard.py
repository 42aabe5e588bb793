"""Leaderboard sections of issue 18: the box-robustness table and the interactive-protocol table, from
hand-made results with known aggregates."""
from __future__ import annotations

import json
import math

import pytest

from harness.results import ResultsStore
from leaderboard import write_leaderboard
from leaderboard.prompts import interactive_table, robustness_table, split_jitter
from leaderboard.tables import load_results


def rec(model, case, modality, dsc, nsd, status="ok", **extra):
    return {"model": model, "case": case, "modality": modality, "dim": "3D", "dsc": dsc, "nsd": nsd,
            "dsc_per_label": [dsc], "seconds": 1.0, "peak_rss_mb": 100, "timing_mode": "in-process",
            "runner": "native", "threads": 2, "status": status, "error": None if status == "ok" else "boom",
            **extra}


def test_split_jitter():
    assert split_jitter("litemedsam[jitter=10]") == ("litemedsam", 10)
    assert split_jitter("litemedsam[docker,jitter=5]") == ("litemedsam[docker]", 5)
    assert split_jitter("litemedsam[docker]") is None
    assert split_jitter("litemedsam") is None


def make_sweep(tmp_path):
    with ResultsStore(tmp_path) as store:
        # level 0: CT mean 0.8, MR 0.6 -> overall 0.7; level 10 has two more cases (CT_2, and MR_2 failed),
        # which level 0 lacks: the levels are compared on CT_1 and MR_1, level 10: CT 0.4, MR 0.3 -> 0.35
        store.append(rec("m[jitter=0]", "CT_1", "CT", 0.8, 0.9))
        store.append(rec("m[jitter=0]", "MR_1", "MR", 0.6, 0.7))
        store.append(rec("m[jitter=10]", "CT_1", "CT", 0.4, 0.5))
        store.append(rec("m[jitter=10]", "CT_2", "CT", 0.6, 0.7))
        store.append(rec("m[jitter=10]", "MR_1", "MR", 0.3, 0.4))
        store.append(rec("m[jitter=10]", "MR_2", "MR", None, None, status="error"))
        store.append(rec("plain", "CT_1", "CT", 0.9, 0.9))


def test_robustness_table_aggregates_as_the_main_table(tmp_path):
    make_sweep(tmp_path)
    frame, _ = load_results(tmp_path)
    table = robustness_table(frame)
    assert set(table["model"]) == {"m"}
    overall = table[table["modality"] == "overall"].set_index("level")
    assert overall.loc[0, "dsc"] == pytest.approx(0.7)
    assert overall.loc[10, "dsc"] == pytest.approx(0.35)
    assert overall.loc[10, "nsd"] == pytest.approx((0.5 + 0.4) / 2)
    assert overall.loc[10, "cases"] == 2  # CT_2 and MR_2 only at level 10: left out
    ct10 = table[(table["modality"] == "CT") & (table["level"] == 10)].iloc[0]
    assert ct10["dsc"] == pytest.approx(0.4) and ct10["cases"] == 1


def test_robustness_in_markdown_json_and_figure(tmp_path):
    make_sweep(tmp_path)
    md = write_leaderboard(tmp_path).read_text()
    assert "## Box robustness (DSC / NSD %, per jitter level)" in md
    line = next(l for l in md.splitlines() if l.startswith("| m ") and "all" in l)
    assert "70.00 / 80.00 (2)" in line and "35.00 / 45.00 (2)" in line
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["robustness"]["m"]["10"]["dsc"] == pytest.approx(0.35)
    assert summary["robustness"]["m"]["10"]["per_modality"]["CT"]["cases"] == 1
    assert (tmp_path / "leaderboard-robustness.png").stat().st_size > 0
    assert "leaderboard-robustness.png" in md


def test_no_sections_without_sweep_or_protocol(tmp_path):
    with ResultsStore(tmp_path) as store:
        store.append(rec("plain", "CT_1", "CT", 0.9, 0.9))
    md = write_leaderboard(tmp_path, figures=False).read_text()
    assert "Box robustness" not in md and "Interactive protocol" not in md
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["robustness"] == {} and summary["interactive"] == {}


def irec(model, case, modality, steps, auc, status="ok"):
    return rec(model, case, modality, steps[-1] if steps else None, steps[-1] if steps else None, status=status,
               protocol="interactive", dsc_auc=auc, nsd_auc=auc, dsc_per_step=steps, nsd_per_step=steps,
               cap_exceeded=False)


def test_interactive_table_and_curve(tmp_path):
    with ResultsStore(tmp_path) as store:
        store.append(irec("m[interactive]", "CT_1", "CT", [0.5, 0.6, 0.7], 1.3))
        store.append(irec("m[interactive]", "CT_2", "CT", [0.7, 0.8, 0.9], 1.7))
        store.append(irec("m[interactive]", "MR_1", "MR", [0.2, 0.2, 0.2], 0.4))
        store.append(irec("m[interactive]", "MR_2", "MR", [], None, status="error"))
        store.append(rec("plain", "CT_1", "CT", 0.9, 0.9))
    frame, _ = load_results(tmp_path)
    table = interactive_table(frame)
    overall = table[table["modality"] == "overall"].iloc[0]
    assert overall["model"] == "m[interactive]"
    assert overall["dsc_auc"] == pytest.approx((1.5 + 0.4) / 2)
    assert overall["dsc"] == pytest.approx((0.8 + 0.2) / 2)
    assert overall["errors"] == 1 and overall["cases"] == 3
    md = write_leaderboard(tmp_path).read_text()
    assert "## Interactive protocol" in md and "0.950" in md
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["interactive"]["m[interactive]"]["per_modality"]["CT"]["dsc_auc"] == pytest.approx(1.5)
    assert (tmp_path / "leaderboard-interactive-steps.png").stat().st_size > 0
    from leaderboard.prompts import interactive_step_curves
    curve = interactive_step_curves(frame)
    assert list(curve["y"]) == pytest.approx([100 * 1.4 / 3, 100 * 1.6 / 3, 100 * 1.8 / 3])
    assert not any(math.isnan(v) for v in curve["y"])
