"""The leaderboard's figures (leaderboard.plots) and `harness show` (leaderboard.show): PNGs that are
written, readable and not blank; inputs with nothing to draw refused with a ValueError."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from harness.cli import DEMO_DIR, main
from leaderboard.plots import pareto_front, plot_modality_ci, plot_rank_stability, plot_runtime_vs_dsc

MODELS = ["litemedsam", "l0", "l1", "l2", "medsam", "boxfill", "litemedsam[faithful]", "litemedsam[docker]",
          "l0[bf16]", "medficientsam", "efficientvit-sam", "repmedsam"]
MODALITIES = ["CT", "MR", "PET", "US", "X-Ray", "Dermoscopy", "Endoscopy", "Fundus", "Microscopy", "Mammography",
              "OCT", "Average"]


def read_png(path):
    """The PNG as an (H, W, C) float array; fails the test unless it has content (pixel variance > 0)."""
    from matplotlib.image import imread

    assert path.is_file(), f"{path} was not written"
    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert float(image[..., :3].var()) > 0, f"{path} is blank"
    assert not list(path.parent.glob(".*.tmp")), "a temp file was left beside the PNG"
    return image


def assert_size(image, width=(1000, 1800), height=(300, 1400)):
    h, w = image.shape[:2]
    assert width[0] <= w <= width[1], f"width {w} px outside {width}"
    assert height[0] <= h <= height[1], f"height {h} px outside {height}"


def ci_table(models, modalities, nan_every=4, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for m in models:
        for k, modality in enumerate(modalities):
            for metric in ("dsc", "nsd"):
                mean = float(rng.uniform(0.6, 0.95))
                lo, hi = (np.nan, np.nan) if k % nan_every == 1 else (mean - 0.03, min(1.0, mean + 0.03))
                rows.append(dict(model=m, modality=modality, metric=metric, mean=mean, lo=lo, hi=hi))
    return pd.DataFrame(rows)


def rank_freq(models):
    n = len(models)
    rows = []
    for i in range(n):
        p = np.exp(-0.5 * ((np.arange(n) - i) / 0.8) ** 2)
        rows.append(p / p.sum())
    return pd.DataFrame(rows, index=models, columns=range(1, n + 1))


# --------------------------------------------------------------------------------------- Pareto front

def test_pareto_front_hand_made():
    #            0    1    2    3    4    5
    seconds = [0.0, 1.0, 2.0, 1.5, 3.0, 0.5]
    dsc = [0.70, 0.85, 0.90, 0.80, 0.88, 0.70]
    # 3 is beaten by 1 (faster and better), 4 by 2, 5 by 0 (same DSC, slower)
    assert pareto_front(seconds, dsc) == [0, 1, 2]


def test_pareto_front_ties_nan_and_single():
    assert pareto_front([1.0, 1.0], [0.8, 0.8]) == [0, 1]  # identical points: neither beats the other
    assert pareto_front([1.0, np.nan, 0.5], [0.8, 0.99, None]) == [0]  # NaN / None: never on the front
    assert pareto_front([2.0], [0.5]) == [0]
    assert pareto_front([], []) == []
    # equal time, the better DSC wins; equal DSC, the faster wins
    assert pareto_front([1.0, 1.0, 0.5], [0.8, 0.9, 0.9]) == [2]


# ----------------------------------------------------------------------------------- figure functions

def test_modality_ci_many_models_with_nan_intervals(tmp_path):
    table = ci_table(MODELS, MODALITIES)
    assert table["lo"].isna().any()
    target = plot_modality_ci(table, tmp_path / "ci.png")
    assert target == tmp_path / "ci.png"
    assert_size(read_png(target))


def test_modality_ci_one_model_and_nan_means(tmp_path):
    table = ci_table(["litemedsam"], ["CT", "Average"], nan_every=2)
    table.loc[(table["modality"] == "CT") & (table["metric"] == "nsd"), "mean"] = np.nan
    assert_size(read_png(plot_modality_ci(table, tmp_path / "one.png")))


def test_modality_ci_refuses_empty_input(tmp_path):
    empty = pd.DataFrame(columns=["model", "modality", "metric", "mean", "lo", "hi"])
    with pytest.raises(ValueError, match="empty"):
        plot_modality_ci(empty, tmp_path / "x.png")
    all_nan = ci_table(["a"], ["CT"]).assign(mean=np.nan)
    with pytest.raises(ValueError, match="no finite"):
        plot_modality_ci(all_nan, tmp_path / "x.png")
    with pytest.raises(ValueError, match="missing column"):
        plot_modality_ci(pd.DataFrame({"model": ["a"]}), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_runtime_vs_dsc_many_models_zero_time_and_nan(tmp_path):
    seconds = [0.8, 0.5, 0.9, 1.6, 25.0, 0.0, 1.1, 6.5, 0.7, 2.2, 1.9, np.nan]
    dsc = [0.86, 0.84, 0.865, 0.87, 0.85, 0.72, 0.859, 0.86, 0.835, 0.875, 0.86, 0.9]
    runners = ["native"] * 7 + ["docker"] + ["native"] * 2 + ["subprocess"] * 2
    points = pd.DataFrame(dict(model=MODELS, runner=runners, seconds=seconds, dsc=dsc))
    assert_size(read_png(plot_runtime_vs_dsc(points, tmp_path / "rt.png")))


def test_runtime_vs_dsc_one_point(tmp_path):
    points = pd.DataFrame(dict(model=["boxfill"], runner=["native"], seconds=[0.0], dsc=[0.72]))
    assert_size(read_png(plot_runtime_vs_dsc(points, tmp_path / "rt.png")))


def test_runtime_vs_dsc_refuses_empty_input(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plot_runtime_vs_dsc(pd.DataFrame(columns=["model", "runner", "seconds", "dsc"]), tmp_path / "x.png")
    nan_only = pd.DataFrame(dict(model=["a", "b"], runner=["native"] * 2, seconds=[np.nan, 1.0], dsc=[0.8, np.nan]))
    with pytest.raises(ValueError, match="finite"):
        plot_runtime_vs_dsc(nan_only, tmp_path / "x.png")


def test_rank_stability_many_models(tmp_path):
    freq = rank_freq(MODELS)
    freq.iloc[3, 7] = np.nan  # counts as 0
    assert_size(read_png(plot_rank_stability(freq, tmp_path / "rank.png")))


def test_rank_stability_one_model(tmp_path):
    freq = pd.DataFrame([[1.0]], index=["litemedsam"], columns=[1])
    assert_size(read_png(plot_rank_stability(freq, tmp_path / "rank.png")))


def test_rank_stability_refuses_empty_input(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plot_rank_stability(pd.DataFrame(), tmp_path / "x.png")
    with pytest.raises(ValueError, match="0 or NaN"):
        plot_rank_stability(pd.DataFrame([[np.nan, 0.0]], index=["a"], columns=[1, 2]), tmp_path / "x.png")


# ------------------------------------------------------------------------------------------ harness show

def demo_case(prefix: str) -> str:
    return sorted(p.name for p in (DEMO_DIR / "imgs").glob(f"{prefix}*.npz"))[0]


@pytest.fixture(scope="module")
def boxfill_run(module_tmp):
    """A `harness run` of the torch-free boxfill baseline over the bundled demo set."""
    out = module_tmp / "show-run"
    assert main(["run", "--models", "boxfill", "--out", str(out), "--no-progress"]) == 0
    return out


def test_show_2d_case(boxfill_run, tmp_path, capsys):
    case = demo_case("2DBox_US_")
    target = tmp_path / "us.png"
    assert main(["show", str(boxfill_run), case[: -len(".npz")], "-o", str(target)]) == 0
    assert str(target) in capsys.readouterr().out
    assert_size(read_png(target), width=(900, 1800), height=(250, 900))


def test_show_3d_case_default_output(boxfill_run):
    case = demo_case("3DBox_CT_")
    assert main(["show", str(boxfill_run), case, "--models", "boxfill"]) == 0
    image = read_png(boxfill_run / f"show-{case[: -len('.npz')]}.png")
    assert_size(image, width=(700, 1800), height=(700, 1800))  # three rows of slices


def test_show_error_panel_and_no_ground_truth(boxfill_run, tmp_path):
    case = demo_case("2DBox_US_")
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    shutil.copy(DEMO_DIR / "imgs" / case, data / "imgs" / case)  # no gts/: no ground-truth panel
    out = tmp_path / "run"
    shutil.copytree(boxfill_run, out)
    with (out / "results.jsonl").open("a") as fh:
        fh.write(json.dumps({"model": "broken", "case": case, "status": "error", "segs": None,
                             "error": "while segmenting: RuntimeError: boom\nTraceback ..."}) + "\n")
        fh.write(json.dumps({"model": "elsewhere", "case": "other.npz", "status": "ok", "segs": None}) + "\n")
    target = tmp_path / "errors.png"
    assert main(["show", str(out), case, "--data", str(data), "--models", "boxfill,broken,elsewhere",
                 "-o", str(target)]) == 0
    read_png(target)


def test_show_unknown_case(boxfill_run, capsys):
    assert main(["show", str(boxfill_run), "2DBox_US_nosuchcase"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness show: ") and "\n" not in err
    assert "2DBox_US_nosuchcase" in err and str(DEMO_DIR / "imgs") in err


def test_show_unknown_model(boxfill_run, capsys):
    assert main(["show", str(boxfill_run), demo_case("2DBox_US_"), "--models", "boxfill,nosuchmodel"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness show: ") and "'nosuchmodel'" in err and "known: boxfill" in err


def test_show_not_a_run_folder_and_unreadable_seg(boxfill_run, tmp_path, capsys):
    assert main(["show", str(tmp_path), demo_case("2DBox_US_")]) == 2
    assert "results.jsonl not found" in capsys.readouterr().err
    out = tmp_path / "run"
    shutil.copytree(boxfill_run, out)
    case = demo_case("2DBox_US_")
    (out / "segs" / "boxfill" / case).write_bytes(b"not an npz")
    assert main(["show", str(out), case]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness show: ") and case in err and "not an npz" in err
