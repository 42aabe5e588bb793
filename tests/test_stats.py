"""Statistics of the leaderboard against hand-computed small examples: bootstrap intervals, Wilcoxon,
Holm, paired comparisons, the challenge-style ranking and its stability; and the commands that show them."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from harness.cli import main
from harness.results import ResultsStore, update_models
from leaderboard import stats
from leaderboard.tables import BoardOptions, load_results, render_markdown, summary_json, write_leaderboard


def rec(model, case, dsc, nsd, seconds, status="ok"):
    modality = case.split("_")[1]
    return {"model": model, "case": case, "modality": modality, "dim": "3D" if case.startswith("3D") else "2D",
            "dsc": dsc, "nsd": nsd, "dsc_per_label": [dsc], "seconds": seconds, "peak_rss_mb": 100.0,
            "timing_mode": "in-process", "runner": "native", "threads": 2, "status": status,
            "error": None if status == "ok" else "boom"}


def frame_of(records):
    return pd.DataFrame(records)


# --------------------------------------------------------------------------- bootstrap
def test_statistic_is_the_mean_of_modality_means():
    f = frame_of([rec("a", "3DBox_CT_1", 0.4, 0.5, 1), rec("a", "3DBox_CT_2", 0.5, 0.6, 1),
                  rec("a", "3DBox_CT_3", 0.6, 0.7, 1), rec("a", "2DBox_US_1", 0.9, 0.95, 1)])
    est = stats.bootstrap_cis(f, 500)["a"]["dsc"]
    assert est["overall"].value == pytest.approx(0.7)  # (0.5 + 0.9) / 2, not the case mean 0.6
    assert est["per_modality"]["CT"].value == pytest.approx(0.5)
    assert est["per_modality"]["US"].lo is None  # one case: no interval of its own
    assert est["overall"].has_interval  # CT has 3 cases


def test_bootstrap_interval_matches_the_exact_resampling_distribution():
    """Three cases 0, 0, 1: a resample's mean is k/3 with k ~ Binomial(3, 1/3), so P(0) = 8/27 and
    P(1) = 1/27 = 3.7% > 2.5%: the 95% percentile interval is exactly [0, 1]. A second modality that is
    constant (0.5) halves it around 0.5 in the mean of modality means: [0.25, 0.75]."""
    f = frame_of([rec("a", f"3DBox_CT_{i}", v, v, 1) for i, v in enumerate((0.0, 0.0, 1.0))]
                 + [rec("a", f"2DBox_US_{i}", 0.5, 0.5, 1) for i in range(3)])
    est = stats.bootstrap_cis(f, 20000, seed=3)["a"]["dsc"]
    ct = est["per_modality"]["CT"]
    assert (ct.lo, ct.hi) == (0.0, 1.0)
    us = est["per_modality"]["US"]
    assert (us.lo, us.hi) == (0.5, 0.5)
    assert (est["overall"].lo, est["overall"].hi) == (0.25, 0.75)


def test_bootstrap_is_seeded_and_independent_of_other_models():
    rng = np.random.default_rng(1)
    rows = [rec("a", f"3DBox_CT_{i}", float(v), float(v), 1) for i, v in enumerate(rng.random(12))]
    alone = stats.bootstrap_cis(frame_of(rows), 300, seed=7)["a"]["dsc"]["overall"]
    again = stats.bootstrap_cis(frame_of(rows), 300, seed=7)["a"]["dsc"]["overall"]
    with_b = stats.bootstrap_cis(frame_of(rows + [rec("b", "3DBox_CT_0", 0.1, 0.1, 1)]), 300, seed=7)
    other_seed = stats.bootstrap_cis(frame_of(rows), 300, seed=8)["a"]["dsc"]["overall"]
    assert (alone.lo, alone.hi) == (again.lo, again.hi) == (with_b["a"]["dsc"]["overall"].lo,
                                                            with_b["a"]["dsc"]["overall"].hi)
    assert (alone.lo, alone.hi) != (other_seed.lo, other_seed.hi)
    assert alone.lo < alone.value < alone.hi


def test_no_modality_with_three_cases_gives_no_overall_interval():
    f = frame_of([rec("a", "3DBox_CT_1", 0.4, 0.5, 1), rec("a", "3DBox_CT_2", 0.6, 0.7, 1),
                  rec("a", "2DBox_US_1", 0.9, 0.95, 1)])
    est = stats.bootstrap_cis(f, 200)["a"]["dsc"]["overall"]
    assert est.value == pytest.approx(0.7) and not est.has_interval and est.cases == 3


def test_failed_and_nan_cases_stay_out_of_the_intervals():
    f = frame_of([rec("a", "3DBox_CT_1", 0.5, 0.5, 1), rec("a", "3DBox_CT_2", 0.5, 0.5, 1),
                  rec("a", "3DBox_CT_3", 0.5, 0.5, 1), rec("a", "3DBox_CT_4", None, None, None, "error"),
                  rec("a", "3DBox_CT_5", None, 0.0, 1)])
    est = stats.bootstrap_cis(f, 200)["a"]["dsc"]["overall"]
    assert (est.value, est.lo, est.hi, est.cases) == (0.5, 0.5, 0.5, 3)


# --------------------------------------------------------------------------- tests and corrections
def test_wilcoxon_exact_p_values_by_hand():
    # all n differences positive: two-sided p = 2 / 2^n
    assert stats.wilcoxon_p([1, 2, 3, 4, 5]) == pytest.approx(2 / 32)
    assert stats.wilcoxon_p([1, 2, 3, 4, 5, 6]) == pytest.approx(2 / 64)
    # negative ranks {1, 3}: T- = 4; subsets of {1..6} with sum <= 4: {}, 1, 2, 3, 12, 4, 13 -> 7; p = 2 * 7/64
    assert stats.wilcoxon_p([-1, 2, -3, 4, 5, 6]) == pytest.approx(14 / 64)
    # zero differences are dropped (Wilcoxon's method); nothing left: p = 1
    assert stats.wilcoxon_p([0, 1, 2, 3, 4, 5]) == pytest.approx(2 / 32)
    assert stats.wilcoxon_p([0.0, 0.0, 0.0]) == 1.0
    assert stats.wilcoxon_p([]) == 1.0


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, max(0.03, 2 * 0.03), max(0.06, 1 * 0.04)
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    adjusted = stats.holm([0.02, float("nan")])  # NaN is no test: m = 1
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1])
    assert stats.holm([]) == []


def test_verdicts():
    assert stats.verdict(0.01, 0.01) == "better"
    assert stats.verdict(-0.01, 0.049) == "worse"
    assert stats.verdict(0.01, 0.05) == stats.NOT_SEPARABLE
    assert stats.verdict(0.0, 0.001) == stats.NOT_SEPARABLE


def paired_run():
    """a beats b by 0.1 on every CT case and on 5 of 6 US cases; c equals a; b failed US_6 and misses CT_6."""
    records = []
    for i in range(1, 7):
        records.append(rec("a", f"3DBox_CT_{i}", 0.6 + 0.01 * i, 0.7, 10.0))
        records.append(rec("a", f"2DBox_US_{i}", 0.8, 0.8 + 0.01 * i, 1.0))
        records.append(rec("c", f"3DBox_CT_{i}", 0.6 + 0.01 * i, 0.7, 11.0))
        records.append(rec("c", f"2DBox_US_{i}", 0.8, 0.8 + 0.01 * i, 2.0))
        if i < 6:
            records.append(rec("b", f"3DBox_CT_{i}", 0.5 + 0.01 * i, 0.7, 5.0))
    for i in range(1, 6):
        records.append(rec("b", f"2DBox_US_{i}", 0.7 if i < 5 else 0.9, 0.8 + 0.01 * i, 0.5))
    records.append(rec("b", "2DBox_US_6", None, None, None, "error"))
    return frame_of(records)


def test_paired_comparison_by_hand():
    f = paired_run()
    dsc = stats.compare_pair(f, "a", "b", "dsc", 2000, 0)
    # shared scored cases: CT 1-5 (diff +0.1 each), US 1-5 (+0.1 x4, -0.1 once): mean of modality means
    assert dsc.effect.cases == 10
    assert dsc.effect.value == pytest.approx((0.1 + (0.4 - 0.1) / 5) / 2)
    assert (dsc.wins, dsc.losses, dsc.ties) == (9, 1, 0)
    # nine +0.1 and one -0.1: ranks tie at 5.5, T- = 5.5 -> well below 5%
    assert dsc.p < 0.05 and dsc.verdict == "better"
    assert dsc.per_modality["CT"]["value"] == pytest.approx(0.1) and dsc.per_modality["CT"]["lo"] == pytest.approx(0.1)
    nsd = stats.compare_pair(f, "a", "b", "nsd", 2000, 0)
    assert (nsd.effect.value, nsd.p, nsd.ties) == (0.0, 1.0, 10) and nsd.verdict == stats.NOT_SEPARABLE
    same = stats.compare_pair(f, "a", "c", "dsc", 2000, 0)
    assert same.effect.cases == 12 and same.verdict == stats.NOT_SEPARABLE and same.non_inferior(0.5) is True
    assert dsc.non_inferior(0.5) is True and stats.compare_pair(f, "b", "a", "dsc").non_inferior(0.5) is False
    mirrored = stats.compare_pair(f, "b", "a", "dsc", 2000, 0)  # the same resamples, whichever comes first
    assert (mirrored.effect.lo, mirrored.effect.hi) == pytest.approx((-dsc.effect.hi, -dsc.effect.lo))


def test_paired_comparisons_are_holm_corrected_over_the_pairs():
    f = paired_run()
    pairs = stats.paired_comparisons(f, ["a", "b", "c"], 500, 0)
    assert [(a, b) for a, b, _ in pairs] == [("a", "b"), ("a", "c"), ("b", "c")]
    raw = [res["dsc"].p for _, _, res in pairs]
    assert [res["dsc"].p_holm for _, _, res in pairs] == pytest.approx(stats.holm(raw))
    assert pairs[2][2]["dsc"].verdict == "worse"  # b vs c mirrors a vs b
    assert stats.paired_comparisons(f, ["a"], 100, 0) == []


# --------------------------------------------------------------------------- ranking
def ranking_run():
    """Three models on three cases (hand-ranked below); m3 failed case 2 and has no record of case 3."""
    return frame_of([
        rec("m1", "3DBox_CT_1", 0.9, 0.8, 2.0), rec("m2", "3DBox_CT_1", 0.9, 0.9, 1.0),
        rec("m3", "3DBox_CT_1", 0.5, 0.5, 3.0),
        rec("m1", "3DBox_CT_2", 0.7, 0.7, 2.0), rec("m2", "3DBox_CT_2", 0.8, 0.6, 2.0),
        rec("m3", "3DBox_CT_2", None, None, None, "error"),
        rec("m1", "2DBox_US_1", 0.6, 0.6, 1.0), rec("m2", "2DBox_US_1", 0.5, 0.5, 1.0),
    ])


def test_rank_then_aggregate_by_hand():
    r = stats.rank_models(ranking_run(), ["m1", "m2", "m3"], resamples=200)
    # DSC ranks per case: CT_1 (0.9, 0.9, 0.5) -> 1.5 1.5 3; CT_2 (0.7, 0.8, worst 0) -> 2 1 3; US_1 -> 1 2 3
    assert r.mean_ranks["dsc"].tolist() == pytest.approx([(1.5 + 2 + 1) / 3, (1.5 + 1 + 2) / 3, 3.0])
    # NSD: CT_1 (0.8, 0.9, 0.5) -> 2 1 3; CT_2 (0.7, 0.6, 0) -> 1 2 3; US_1 -> 1 2 3
    assert r.mean_ranks["nsd"].tolist() == pytest.approx([4 / 3, 5 / 3, 3.0])
    # time (lower is better; missing/failed = worst): CT_1 (2, 1, 3) -> 2 1 3; CT_2 (2, 2, inf) -> 1.5 1.5 3;
    # US_1 (1, 1, inf) -> 1.5 1.5 3
    assert r.mean_ranks["time"].tolist() == pytest.approx([5 / 3, 4 / 3, 3.0])
    assert r.score.tolist() == pytest.approx([(1.5 + 4 / 3 + 5 / 3) / 3, (1.5 + 5 / 3 + 4 / 3) / 3, 3.0])
    assert r.rank.tolist() == [1, 1, 3]  # m1 and m2 tie: both rank 1
    assert r.cases == 3


def test_ranking_weights_and_aggregate_then_rank():
    f = ranking_run()
    r = stats.rank_models(f, ["m1", "m2", "m3"], {"dsc": 0, "nsd": 1, "time": 0}, resamples=100)
    assert list(r.weights) == ["nsd"] and r.rank.tolist() == [1, 2, 3]
    # aggregates over the imputed cases, mean of modality means: m3's failed CT_2 counts as DSC 0
    assert r.aggregate.loc["m3", "nsd"] == pytest.approx(0.25 / 2 / 1 + 0.0 / 2)  # CT (0.5 + 0) / 2, US 0
    assert r.aggregate.loc["m1", "nsd"] == pytest.approx(((0.8 + 0.7) / 2 + 0.6) / 2)
    t = stats.rank_models(f, ["m1", "m2", "m3"], {"time": 1}, resamples=100)
    # m3's failed/missing cases take the slowest time of their case: (3 + 2 + 1) / 3
    assert t.aggregate.loc["m3", "time"] == pytest.approx(2.0)
    assert t.aggregate_rank.tolist() == [2, 1, 3]
    with pytest.raises(ValueError, match="no case has a value"):
        stats.rank_models(f, ["m1"], {"hd95": 1}, resamples=10)


def test_rank_stability():
    f = ranking_run()
    r = stats.rank_models(f, ["m1", "m2", "m3"], resamples=1000, seed=1)
    # m3 is last on every case and metric: it keeps rank 3 in every resample, never first
    assert r.keeps_rank["m3"] == 1.0 and r.first["m3"] == 0.0
    assert r.stability.loc["m3", 3] == 1.0
    assert np.allclose(r.stability.sum(axis=1), 1.0)  # each resample gives each model one rank
    # m1 and m2 trade places with the resampled CT cases: both sometimes first
    assert 0 < r.first["m1"] <= 1 and 0 < r.first["m2"] <= 1
    again = stats.rank_models(f, ["m1", "m2", "m3"], resamples=1000, seed=1)
    assert again.stability.equals(r.stability)


def test_one_model_only():
    f = frame_of([rec("a", "3DBox_CT_1", 0.5, 0.5, 1.0), rec("a", "3DBox_CT_2", None, None, None, "error")])
    r = stats.rank_models(f, ["a"], resamples=50)
    assert r.rank.tolist() == [1] and r.first["a"] == 1.0 and r.keeps_rank["a"] == 1.0


def test_parse_weights():
    assert stats.parse_weights("dsc=1,nsd=0.5,time=2") == {"dsc": 1.0, "nsd": 0.5, "time": 2.0}
    for bad in ("dsc", "foo=1", "dsc=-1", "dsc=x", "dsc=0"):
        with pytest.raises(ValueError):
            stats.parse_weights(bad)


# --------------------------------------------------------------------------- leaderboard and commands
def write_run(folder, frame):
    with ResultsStore(folder) as store:
        for record in frame.to_dict("records"):
            store.append({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()})
    for model in frame["model"].unique():
        update_models(folder, model, {"title": model.upper()})


def test_leaderboard_shows_intervals_pairs_ranking_and_figures(tmp_path):
    write_run(tmp_path, paired_run())
    target = write_leaderboard(tmp_path, options=BoardOptions(bootstrap=300, seed=0))
    text = target.read_text()
    row_a = next(line for line in text.splitlines() if line.startswith("| A "))
    dsc_cell = [c.strip() for c in row_a.strip("|").split("|")][4]
    assert dsc_cell.startswith("71.75 [") and dsc_cell.endswith("]")  # CT mean 0.635, US 0.8: (0.635 + 0.8) / 2
    assert "## Paired comparisons" in text and "| `a` | `b` |" in " ".join(text.split(" "))
    assert "## Challenge-style ranking" in text and "not the official CVPR 2024 rule" in text
    from matplotlib.image import imread

    for name in ("leaderboard-modality-ci.png", "leaderboard-runtime-dsc.png", "leaderboard-rank-stability.png"):
        assert f"]({name})" in text
        pixels = imread(tmp_path / name)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400 and pixels[..., :3].var() > 1e-3  # not blank
    assert "leaderboard-" not in render_markdown(tmp_path, options=BoardOptions(bootstrap=50))  # no figures asked
    data = json.loads((tmp_path / "summary.json").read_text())
    a = next(m for m in data["models"] if m["model"] == "a")
    assert a["dsc_ci"][0] <= a["dsc"] <= a["dsc_ci"][1] and a["per_modality"]["CT"]["dsc_ci"] is not None
    assert data["bootstrap"]["resamples"] == 300
    # pairs in the leaderboard's row order (models.json: a, c, b)
    assert [(p["a"], p["b"]) for p in data["paired"]] == [("a", "c"), ("a", "b"), ("c", "b")]
    assert data["paired"][1]["dsc"]["verdict"] == "better"
    assert data["ranking"]["models"][0]["rank"] == 1 and "rank_frequency" in data["ranking"]["models"][0]
    assert summary_json(tmp_path, BoardOptions(bootstrap=300, seed=0)) == data


def test_compare_and_rank_commands(tmp_path, capsys):
    write_run(tmp_path, paired_run())
    assert main(["compare", str(tmp_path), "b", "a", "--margin", "0.5", "--bootstrap", "500"]) == 0
    out = capsys.readouterr().out
    assert "## DSC" in out and "## NSD" in out and "| CT" in out and "| Overall" in out
    assert "b is worse than a" in out
    assert "Non-inferiority (margin 0.5 points): no:" in out
    assert main(["compare", str(tmp_path), "a", "c", "--margin", "0.5", "--metric", "dsc"]) == 0
    out = capsys.readouterr().out
    assert "a and c are not separable at 5%" in out and "Non-inferiority (margin 0.5 points): yes:" in out
    assert "## NSD" not in out
    assert main(["compare", str(tmp_path), "a", "nope"]) == 2
    assert "no entry 'nope'" in capsys.readouterr().err
    assert main(["rank", str(tmp_path), "--weights", "dsc=1", "--bootstrap", "100"]) == 0
    out = capsys.readouterr().out
    assert "weighted dsc=1" in out and "| 1 " in out
    with pytest.raises(SystemExit, match="--weights"):
        main(["rank", str(tmp_path), "--weights", "speed=1"])
    with pytest.raises(SystemExit, match="results.jsonl not found"):
        main(["rank", str(tmp_path / "missing")])


def test_default_statistics_settings_are_the_documented_ones():
    from harness.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["leaderboard", "x"])
    from harness.cli import _board_options

    options = _board_options(args)
    assert (options.bootstrap, options.seed) == (stats.DEFAULT_RESAMPLES, stats.DEFAULT_SEED) == (2000, 0)
    assert options.rank_weights == {"dsc": 1.0, "nsd": 1.0, "time": 1.0}
    help_text = parser._subparsers._group_actions[0].choices["leaderboard"].format_help()
    assert "default 2000" in help_text and "default 0" in help_text


def test_render_markdown_options_reach_the_text(tmp_path):
    write_run(tmp_path, paired_run())
    frame, _ = load_results(tmp_path)
    text = render_markdown(tmp_path, options=BoardOptions(bootstrap=123, seed=5))
    assert "123 resamples" in text and "seed 5" in text and "123 times" in text


def test_distance_columns_appear_where_recorded(tmp_path):
    f = paired_run()
    f["hd95"] = np.where(f["model"] == "b", 4.0, 2.0)
    f["masd"] = np.where(f["model"] == "b", 3.0, 1.0)
    f.loc[f["status"] != "ok", ["hd95", "masd"]] = np.nan
    write_run(tmp_path, f)
    text = render_markdown(tmp_path, options=BoardOptions(bootstrap=100))
    header = next(line for line in text.splitlines() if line.startswith("| Method"))
    assert "HD95 (mm)" in header and "MASD (mm)" in header
    row_a = [c.strip() for c in next(line for line in text.splitlines() if line.startswith("| A ")).strip("|").split("|")]
    assert row_a[6:8] == ["2.00", "1.00"]
    r = stats.rank_models(load_results(tmp_path)[0], ["a", "b", "c"], {"hd95": 1}, resamples=50)
    # a and c (2 mm) tie first on every case b finished; b's failed US_6 takes the worst distance
    assert r.rank["b"] == 3 and r.rank["a"] == r.rank["c"] == 1
    plain = tmp_path / "plain"
    write_run(plain, paired_run())
    assert "HD95" not in render_markdown(plain, options=BoardOptions(bootstrap=100))
