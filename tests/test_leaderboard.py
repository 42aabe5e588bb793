"""Leaderboard rendering from hand-made results with known aggregates."""
from __future__ import annotations

import json

from harness.results import ResultsStore, update_models
from leaderboard import model_summary, render_markdown, summary_json, write_leaderboard
from leaderboard.tables import load_results


def rec(model, case, modality, dim, dsc, nsd, seconds, mem, status="ok"):
    return {"model": model, "case": case, "modality": modality, "dim": dim, "dsc": dsc, "nsd": nsd,
            "dsc_per_label": [dsc], "seconds": seconds, "peak_rss_mb": mem, "timing_mode": "in-process",
            "runner": "native", "threads": 2, "status": status, "error": None if status == "ok" else "boom"}


def make_run(tmp_path):
    with ResultsStore(tmp_path) as store:
        # model A: CT has 3 cases (mean 0.5), US has 1 case (0.9): unweighted modality mean = 0.7
        store.append(rec("a", "3DBox_CT_1", "CT", "3D", 0.4, 0.5, 10.0, 700))
        store.append(rec("a", "3DBox_CT_2", "CT", "3D", 0.5, 0.6, 20.0, 900))
        store.append(rec("a", "3DBox_CT_3", "CT", "3D", 0.6, 0.7, 30.0, 800))
        store.append(rec("a", "2DBox_US_1", "US", "2D", 0.9, 0.95, 1.5, 400))
        store.append(rec("a", "2DBox_US_2", "US", "2D", None, None, None, None, status="error"))
        # model B: one NaN-DSC case (excluded from means, counted)
        store.append(rec("b", "3DBox_CT_1", "CT", "3D", 0.8, 0.9, 5.0, 500))
        store.append(rec("b", "2DBox_US_1", "US", "2D", 0.6, 0.7, 0.5, 300))
        store.append(rec("b", "2DBox_US_2", "US", "2D", None, 0.0, 0.7, 310))
        # a retried pair: the last record wins
        store.append(rec("b", "2DBox_US_1", "US", "2D", 0.7, 0.8, 0.5, 300))
    update_models(tmp_path, "a", {"title": "Model A", "resolution": 512, "params": 34_792_784, "flops": 36_800_000_000,
                                  "reported": {"dsc": 85.85, "nsd": 87.05, "dsc_reproduced": 84.93,
                                               "nsd_reproduced": 86.76, "source": "paper", "hardware": "i9",
                                               "per_modality": {"CT": [92.15, 94.80]}}})
    update_models(tmp_path, "b", {"title": "Model B", "resolution": 256, "params": 9_791_300, "flops": None})


def test_summary_figures(tmp_path):
    make_run(tmp_path)
    frame, models = load_results(tmp_path)
    summary = model_summary(frame, models).set_index("model")
    a, b = summary.loc["a"], summary.loc["b"]
    assert abs(a["dsc"] - 0.7) < 1e-12  # (mean(0.4,0.5,0.6) + 0.9) / 2
    assert abs(a["nsd"] - (0.6 + 0.95) / 2) < 1e-12
    assert a["runtime_3D"] == 20.0 and a["runtime_2D"] == 1.5
    assert a["memory_3D"] == 900 and a["memory_2D"] == 400
    assert (a["ok"], a["cases"], a["errors"]) == (4, 5, 0 + 1)
    assert abs(b["dsc"] - (0.8 + 0.7) / 2) < 1e-12  # NaN case left out, retried record wins
    assert b["nan_dsc"] == 1


def test_markdown_tables(tmp_path):
    make_run(tmp_path)
    text = render_markdown(tmp_path)
    assert "| Method" in text and "| Res" in text and "2D runtime" in text and "3D memory" in text
    row_a = next(line for line in text.splitlines() if line.startswith("| Model A"))
    cells = [c.strip() for c in row_a.strip("|").split("|")]
    # CT's three cases 0.4, 0.5, 0.6: a resample's mean is 0.4 (or 0.6) with probability 1/27 = 3.7% > 2.5%, so
    # the 95% interval of the mean of modality means (US has one case, 0.9) is exactly [(0.4 + 0.9) / 2, (0.6 + 0.9) / 2]
    assert cells == ["Model A", "512", "34.79M", "36.80G", "70.00 [65.00-75.00]", "77.50 [72.50-82.50]", "1.50s",
                     "20.00s", "400MB", "900MB", "4/5 (1 errors)"]
    row_b = next(line for line in text.splitlines() if line.startswith("| Model B"))
    assert "(1 NaN)" in row_b and "| -" in row_b  # unknown FLOPs shown as '-'
    assert "## Per modality: DSC" in text and "## Per modality: NSD" in text
    dsc_part, nsd_part = text.split("## Per modality: NSD")
    ct = next(line for line in dsc_part.splitlines() if line.startswith("| CT"))
    assert "50.00 [40.00-60.00]" in ct and "80.00 (n=1, no CI)" in ct
    ct_nsd = next(line for line in nsd_part.splitlines() if line.startswith("| CT"))
    assert "60.00 [50.00-70.00]" in ct_nsd and "90.00 (n=1, no CI)" in ct_nsd
    average = next(line for line in dsc_part.splitlines() if line.startswith("| Average"))
    assert "70.00 [65.00-75.00]" in average
    # model B: no modality with 3 cases, so no overall interval either
    assert "75.00 (no CI: n<3 per modality)" in average
    # published figures: their own marked rows under the measured one, never mixed into it
    lines = text.splitlines()
    i = lines.index(row_a)
    published = [c.strip() for c in lines[i + 1].strip("|").split("|")]
    assert published[0] == "Model A *(published)*" and published[4:6] == ["85.85", "87.05"]
    assert published[-1] == "published"
    reproduced = [c.strip() for c in lines[i + 2].strip("|").split("|")]
    assert reproduced[0] == "Model A *(published, reproduced)*" and reproduced[4:6] == ["84.93", "86.76"]
    assert not any("Model B *(published" in line for line in lines)
    header = next(line for line in lines if line.startswith("| Modality"))
    assert "Model A *(published)*" in header
    assert "92.15" in ct and "94.80" in ct_nsd  # published CT column; the US row has none for this model
    assert "## Sources of the published rows" in text and "paper; timings on i9" in text
    plain = render_markdown(tmp_path, reported=False)
    assert "(published" not in plain and "85.85" not in plain and "92.15" not in plain


def test_write_leaderboard_and_summary_json(tmp_path):
    make_run(tmp_path)
    target = write_leaderboard(tmp_path)
    assert target == tmp_path / "leaderboard.md" and target.read_text().startswith("# Leaderboard")
    data = json.loads((tmp_path / "summary.json").read_text())
    entry = next(m for m in data["models"] if m["model"] == "a")
    assert entry["per_modality"]["CT"]["cases"] == 3 and abs(entry["dsc"] - 0.7) < 1e-12
    assert summary_json(tmp_path) == data


def test_empty_run(tmp_path):
    assert "No results yet" in render_markdown(tmp_path)


def test_the_backend_of_untagged_rows_is_named(tmp_path):
    """An untagged row ran the defaults, whose backend depends on the machine (--backend auto): the
    leaderboard names it from the records; tagged rows carry their own tags."""
    with ResultsStore(tmp_path) as store:
        for model, backend, path in (("l0", "openvino", "fast"), ("l0[torch]", "torch", "fast"),
                                     ("l0[faithful]", "torch", "faithful")):
            store.append({**rec(model, "2DBox_US_1", "US", "2D", 0.9, 0.9, 1.0, 300), "path": path,
                          "precision": "fp32", "backend": backend})
    for model, tags in (("l0", []), ("l0[torch]", ["torch"]), ("l0[faithful]", ["faithful"])):
        update_models(tmp_path, model, {"title": "L0", "segmenter": "l0", "tags": tags, "path": "fast"})
    text = render_markdown(tmp_path)
    assert "Untagged rows of the torch segmenters ran the defaults: the fast execution path, fp32, backend openvino" in text
    assert "| L0 [torch]" in text and "| L0 [faithful]" in text
    # a run folder without engine rows (a baseline) names no backend
    other = tmp_path / "baseline"
    make_run(other)
    assert "Untagged rows" not in render_markdown(other)
