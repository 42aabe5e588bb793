"""Challenge DSC/NSD: parity with the reference cases, hand-made edge cases, and score_dirs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from harness.metrics import (
    CaseMetrics,
    case_metrics,
    dice_per_label,
    surface_area,
    surface_dice,
    surfel_area_table,
)
from harness.scoring import score_dirs
from reference import REFERENCE_DIR

METRIC_CASES = REFERENCE_DIR / "metrics" / "challenge_metric_cases.json"
METRIC_ARRAYS = REFERENCE_DIR / "metrics" / "challenge_metric_cases.npz"
TOL = 1e-6


def _reference_case_names() -> list[str]:
    if not METRIC_CASES.is_file():
        return ["<reference absent>"]
    return [c["case"] for c in json.loads(METRIC_CASES.read_text())]


@pytest.fixture(scope="module")
def reference():
    if not (METRIC_CASES.is_file() and METRIC_ARRAYS.is_file()):
        pytest.skip(f"challenge metric reference cases absent under {REFERENCE_DIR / 'metrics'} "
                    "(set HARNESS_REFERENCE_DIR to the shared/reference folder)")
    expected = {c["case"]: c for c in json.loads(METRIC_CASES.read_text())}
    with np.load(METRIC_ARRAYS) as z:
        arrays = {k: z[k] for k in z.files}
    return expected, arrays


# ---------------------------------------------------------------- reference parity

@pytest.mark.parametrize("name", _reference_case_names())
def test_reference_case_parity(reference, name):
    expected, arrays = reference
    exp = expected[name]
    gts = arrays[f"{name}__gts"]
    segs = arrays[f"{name}__segs"]
    spacing = arrays[f"{name}__spacing"] if exp["is3d"] else None
    assert (gts.ndim == 3) == exp["is3d"]
    m = case_metrics(gts, segs, spacing)
    assert m.dsc == pytest.approx(exp["dsc"], abs=TOL, nan_ok=True)
    assert m.nsd == pytest.approx(exp["nsd"], abs=TOL, nan_ok=True)


def test_reference_case_count(reference):
    expected, _ = reference
    assert len(expected) == 40


# ---------------------------------------------------------------- hand-made cases

def _blob3d(shape=(12, 30, 30), centre=(6, 15, 15), radius=(4, 8, 9)):
    idx = np.indices(shape).astype(float)
    r = sum(((idx[a] - centre[a]) / radius[a]) ** 2 for a in range(3))
    return (r <= 1).astype(np.uint8)


def test_identical_masks_score_one():
    gt = _blob3d()
    gt2 = gt.copy()
    gt2[0:3, 0:4, 0:4] = 2
    m = case_metrics(gt2, gt2.copy(), (2.0, 0.8, 0.8))
    assert m == CaseMetrics(1.0, 1.0, (1.0, 1.0), (1.0, 1.0))
    g2d = np.zeros((40, 50), np.uint8)
    g2d[5:20, 10:30] = 1
    g2d[25:35, 5:15] = 2
    assert case_metrics(g2d, g2d.copy()) == CaseMetrics(1.0, 1.0, (1.0, 1.0), (1.0, 1.0))


def test_disjoint_far_masks_gate_nsd_to_zero():
    gt = np.zeros((10, 40, 40), np.uint8)
    seg = np.zeros_like(gt)
    gt[2:5, 2:8, 2:8] = 1
    seg[6:9, 30:36, 30:36] = 1
    m = case_metrics(gt, seg, (1.0, 1.0, 1.0))
    assert m.dsc == 0.0
    assert m.nsd == 0.0
    assert m.nsd_per_label == ()  # not computed: the DSC > 0.2 gate failed


def test_label_absent_from_both_gives_nan_dsc_and_zero_nsd():
    gt = np.zeros((30, 30), np.uint8)
    gt[2:10, 2:10] = 1
    gt[15:25, 15:25] = 3  # label 2 absent from gt and seg
    m = case_metrics(gt, gt.copy())
    assert m.dsc_per_label[0] == 1.0 and m.dsc_per_label[2] == 1.0
    assert math.isnan(m.dsc_per_label[1])
    assert math.isnan(m.dsc)
    assert m.nsd == 0.0  # NaN fails the gate, as in the challenge


def test_one_empty_mask():
    mask = _blob3d().astype(bool)
    empty = np.zeros_like(mask)
    assert surface_dice(mask, empty, (1, 1, 1)) == 0.0
    assert surface_dice(empty, mask, (1, 1, 1)) == 0.0
    assert math.isnan(surface_dice(empty, empty, (1, 1, 1)))
    # label 2 missing from the prediction: DSC 0 and NSD 0 for it, label 1 perfect
    gt = np.zeros((40, 40), np.uint8)
    gt[2:12, 2:12] = 1
    gt[20:30, 20:30] = 2
    seg = np.where(gt == 1, 1, 0).astype(np.uint8)
    m = case_metrics(gt, seg)
    assert m.dsc_per_label == (1.0, 0.0)
    assert m.nsd_per_label == (1.0, 0.0)
    assert m.dsc == 0.5 and m.nsd == 0.5


def test_prediction_labels_above_gt_max_are_ignored():
    gt = np.zeros((8, 30, 30), np.uint8)
    gt[2:6, 5:15, 5:15] = 1
    gt[2:6, 18:26, 18:26] = 2
    seg = gt.copy()
    seg[3:5, 6:12, 7:13] = 0  # some error so the values are not trivial
    extra = seg.copy()
    extra[0:2, 0:4, 0:4] = 3
    extra[6:8, 25:30, 0:5] = 7
    a = case_metrics(gt, seg, (2.0, 1.0, 1.0))
    b = case_metrics(gt, extra.astype(np.uint16), (2.0, 1.0, 1.0))
    assert a == b
    assert len(b.dsc_per_label) == 2


def test_2d_equals_hw1_volume_with_unit_spacing():
    rng = np.random.default_rng(3)
    gt = np.zeros((60, 70), np.uint8)
    gt[10:40, 10:50] = 1
    gt[45:58, 5:30] = 2
    seg = gt.copy()
    seg[rng.random(gt.shape) < 0.05] = 0
    seg[12:20, 48:55] = 1
    m2 = case_metrics(gt, seg, spacing=(5.0, 5.0, 5.0))  # 2D ignores spacing, as the challenge does
    m3 = case_metrics(gt[..., None], seg[..., None], spacing=(1.0, 1.0, 1.0))
    assert m2.dsc == pytest.approx(m3.dsc, abs=1e-12)
    assert m2.nsd == pytest.approx(m3.nsd, abs=1e-12)
    assert 0.2 < m2.nsd < 1.0


def test_anisotropic_spacing_matters():
    gt = np.zeros((12, 30, 30), np.uint8)
    gt[3:8, 8:20, 8:20] = 1
    seg = np.roll(gt, 1, axis=0)  # one slice off
    iso = case_metrics(gt, seg, (1.0, 1.0, 1.0))
    thick = case_metrics(gt, seg, (3.0, 1.0, 1.0))
    assert iso.dsc == thick.dsc  # DSC does not depend on spacing
    assert iso.nsd == pytest.approx(1.0)  # 1 mm shift, within 2 mm
    assert thick.nsd < 0.9  # 3 mm shift: the top and bottom faces fall out
    # the axis order of the spacing matters too
    assert case_metrics(gt, seg, (1.0, 1.0, 3.0)).nsd == pytest.approx(1.0)


def test_single_voxel_surface_area_analytic():
    """One voxel with spacing (2, 3, 4): the marching-cubes surface is an octahedron.

    Its six vertices are the mid-points of the voxel's neighbour links, at
    +-1, +-1.5, +-2 mm along the three axes.  Each of the 8 faces is the triangle
    (1,0,0), (0,1.5,0), (0,0,2): area = |(-1,1.5,0) x (-1,0,2)| / 2 = |(3,2,1.5)| / 2
    = sqrt(15.25) / 2, so the total is 4 * sqrt(15.25) ~= 15.6205 mm^2.  In the
    2x2x2-cube formulation the voxel is seen by 8 cubes, each with one corner in,
    and each such cube holds one of those faces.
    """
    mask = np.zeros((3, 3, 3), bool)
    mask[1, 1, 1] = True
    assert surface_area(mask, (2.0, 3.0, 4.0)) == pytest.approx(4 * math.sqrt(15.25), abs=1e-12)
    table = surfel_area_table((2.0, 3.0, 4.0))
    for bit in range(8):
        assert table[1 << bit] == pytest.approx(math.sqrt(15.25) / 2, abs=1e-12)
    assert table[0] == 0.0 and table[255] == 0.0


def test_flat_face_area_is_exact():
    """Two adjacent corners in: a rectangle across the cube, 1 x sqrt(2)/2 at unit spacing."""
    table = surfel_area_table((1.0, 1.0, 1.0))
    assert table[0b00000011] == pytest.approx(math.sqrt(0.5), abs=1e-12)
    # four corners forming a face: a full unit square
    assert table[0b00001111] == pytest.approx(1.0, abs=1e-12)


def test_surfel_table_matches_deepmind_package_if_installed():
    lt = pytest.importorskip("surface_distance.lookup_tables")
    # DeepMind's bit k is the corner opposite to ours, i.e. our bit 7 - k.
    perm = np.array([sum(((c >> k) & 1) << (7 - k) for k in range(8)) for c in range(256)])
    rng = np.random.default_rng(0)
    for spacing in [(1.0, 1.0, 1.0), (2.5, 1.0, 0.8), (5.0, 0.6, 1.0)] + [tuple(rng.uniform(0.2, 6, 3)) for _ in range(5)]:
        ours = surfel_area_table(spacing)
        theirs = lt.create_table_neighbour_code_to_surface_area(spacing)
        np.testing.assert_allclose(ours, theirs[perm], rtol=0, atol=1e-12)


def test_dice_per_label():
    gt = np.array([[1, 1, 2, 0], [0, 0, 2, 2]])
    seg = np.array([[1, 0, 2, 5], [0, 0, 0, 2]])
    d = dice_per_label(gt, seg, [1, 2, 3])
    assert d[0] == pytest.approx(2 * 1 / 3)
    assert d[1] == pytest.approx(2 * 2 / 5)
    assert math.isnan(d[2])


def test_input_errors():
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(np.ones((2, 3, 4), np.uint8), np.ones((2, 3, 4), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        case_metrics(np.ones((3, 4), np.uint8), np.ones((4, 3), np.uint8))


def test_many_labels_path_matches_few_labels_path():
    """More than 8 labels uses bincount + find_objects; results must equal the per-label path."""
    rng = np.random.default_rng(7)
    gt = np.zeros((50, 60), np.uint16)
    for label in range(1, 13):
        y, x = rng.integers(0, 45), rng.integers(0, 55)
        gt[y : y + 5, x : x + 5] = label
    gt[gt > 0] = np.unique(gt[gt > 0], return_inverse=True)[1] + 1  # labels 1..N consecutive
    seg = gt.copy()
    seg[rng.random(gt.shape) < 0.1] = 0
    m = case_metrics(gt, seg)
    for i, label in enumerate(range(1, int(gt.max()) + 1)):
        single = case_metrics((gt == label).astype(np.uint8), (seg == label).astype(np.uint8))
        assert m.dsc_per_label[i] == pytest.approx(single.dsc, abs=1e-12)
        assert m.nsd_per_label[i] == pytest.approx(single.nsd, abs=1e-12)


# ---------------------------------------------------------------- score_dirs

def _write(path: Path, **arrays) -> None:
    np.savez_compressed(path, **arrays)


def test_score_dirs_rows_and_errors(tmp_path):
    gts, segs, imgs = tmp_path / "gts", tmp_path / "segs", tmp_path / "imgs"
    for d in (gts, segs, imgs):
        d.mkdir()
    g2 = np.zeros((30, 30), np.uint8)
    g2[5:20, 5:20] = 1
    g3 = np.zeros((6, 20, 20), np.uint8)
    g3[1:5, 4:15, 4:15] = 1
    _write(gts / "2DBox_US_a.npz", gts=g2)
    _write(segs / "2DBox_US_a.npz", segs=g2)
    _write(gts / "3DBox_CT_b.npz", gts=g3, spacing=np.array([2.0, 1.0, 1.0]))
    _write(segs / "3DBox_CT_b.npz", segs=g3)
    _write(gts / "2DBox_Endoscopy_missing.npz", gts=g2)  # no prediction
    _write(gts / "2DBox_Dermoscopy_shape.npz", gts=g2)
    _write(segs / "2DBox_Dermoscopy_shape.npz", segs=g2[:-1])
    _write(gts / "3DBox_MR_nospacing.npz", gts=g3)  # spacing only in the imgs file
    _write(segs / "3DBox_MR_nospacing.npz", segs=g3)
    _write(imgs / "3DBox_MR_nospacing.npz", imgs=g3, spacing=np.array([1.0, 1.0, 1.0]))
    _write(gts / "3DBox_PET_nowhere.npz", gts=g3)  # no spacing anywhere
    _write(segs / "3DBox_PET_nowhere.npz", segs=g3)

    df = score_dirs(segs, gts, imgs_dir=imgs)
    assert list(df.columns) == ["case", "dsc", "nsd", "modality", "error"]
    assert list(df["case"]) == sorted(p.name for p in gts.glob("*.npz"))
    rows = df.set_index("case")
    ok = rows.loc["2DBox_US_a.npz"]
    assert (ok.dsc, ok.nsd, ok.modality, ok.error) == (1.0, 1.0, "US", "")
    assert rows.loc["3DBox_CT_b.npz", "dsc"] == 1.0 and rows.loc["3DBox_CT_b.npz", "error"] == ""
    assert rows.loc["3DBox_MR_nospacing.npz", "error"] == ""
    for bad, word in [("2DBox_Endoscopy_missing.npz", "missing"), ("2DBox_Dermoscopy_shape.npz", "shape"),
                      ("3DBox_PET_nowhere.npz", "spacing")]:
        assert rows.loc[bad, "dsc"] == 0.0 and rows.loc[bad, "nsd"] == 0.0
        assert word in rows.loc[bad, "error"]

    # without imgs_dir the spacing-less 3D case becomes an error row; workers>1 gives the same frame
    df2 = score_dirs(segs, gts, workers=2)
    assert "spacing" in df2.set_index("case").loc["3DBox_MR_nospacing.npz", "error"]
    df3 = score_dirs(segs, gts, workers=2, imgs_dir=imgs)
    assert df3.equals(df)


@pytest.mark.parametrize("name", _reference_case_names())
def test_reference_case_parity_on_the_distance_transform_path(reference, name, monkeypatch):
    """The fallback path (full distance transforms, used for very fine spacings) matches too."""
    import harness.metrics as metrics

    monkeypatch.setattr(metrics, "_MAX_OFFSETS", 0)
    expected, arrays = reference
    exp = expected[name]
    spacing = arrays[f"{name}__spacing"] if exp["is3d"] else None
    m = case_metrics(arrays[f"{name}__gts"], arrays[f"{name}__segs"], spacing)
    assert m.nsd == pytest.approx(exp["nsd"], abs=TOL, nan_ok=True)
