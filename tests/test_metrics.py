"""Challenge DSC/NSD: parity with the reference cases, hand-made edge cases, and score_dirs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from harness.metrics import (
    EMPTY_MASK_POLICY,
    CaseMetrics,
    case_metrics,
    dice_per_label,
    distance_metrics,
    parse_metrics,
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


# ---------------------------------------------------------------- hd95 and masd (opt-in extras)
#
# Independent implementation: MONAI 1.6.1 (the dev extra). Its compute_hausdorff_distance and
# compute_average_surface_distance return float32, and torch.quantile works in float32 there, which
# alone moves hd95 by up to ~2e-5 mm on these cases. So the 1e-6 mm parity check takes MONAI's own
# surfaces and directed distances (monai.metrics.utils.get_edge_surface_distance, what both public
# functions call; each distance is a correctly rounded float32, within 1e-6 mm below 16 mm) and
# reduces them exactly as those two functions do, in float64: the 95th percentile (torch.quantile,
# linear) of each direction, then the larger; the mean of both directions' distances together. The
# public functions are checked too, at float32's resolution (relative 1e-5).

DIST_TOL = 1e-6  # mm
#: MONAI's directed distances are float32, each within 2**-24 (relative) of the exact value, so a
#: value far above 16 mm (a far-off component) can differ by more than DIST_TOL from that alone.
F32_ROUNDING = 2.0 ** -24
MONAI_WARNINGS = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning",
                                            "ignore:the (ground truth|prediction) of class:UserWarning")


def _monai_float64(gt: np.ndarray, seg: np.ndarray, spacing) -> tuple[list[float], list[float]]:
    """Per-label hd95 and masd from MONAI's surfaces and distances, reduced in float64."""
    import torch
    from monai.metrics.utils import get_edge_surface_distance

    hd95, masd = [], []
    for label in range(1, int(gt.max()) + 1):
        _, dists, _ = get_edge_surface_distance(torch.from_numpy(seg == label), torch.from_numpy(gt == label),
                                                spacing=spacing, symmetric=True)
        dists = [d.double() for d in dists]
        hd95.append(max(float(torch.quantile(d, 0.95)) for d in dists))
        masd.append(float(torch.cat(dists).mean()))
    return hd95, masd


def _monai_public(gt: np.ndarray, seg: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Per-label hd95 and masd from MONAI's public functions (float32 results)."""
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    labels = range(int(gt.max()) + 1)
    onehot_gt = torch.from_numpy(np.stack([gt == i for i in labels])[None].astype(np.float32))
    onehot_seg = torch.from_numpy(np.stack([seg == i for i in labels])[None].astype(np.float32))
    hd = compute_hausdorff_distance(onehot_seg, onehot_gt, percentile=95, spacing=spacing)
    asd = compute_average_surface_distance(onehot_seg, onehot_gt, symmetric=True, spacing=spacing)
    return hd[0].double().numpy(), asd[0].double().numpy()


def _random_labels(rng: np.random.Generator, shape: tuple[int, ...], n_labels: int = 3) -> np.ndarray:
    """Smooth random blobs, labels 1..n_labels nested by threshold (several components each)."""
    from scipy import ndimage as ndi

    noise = ndi.gaussian_filter(rng.random(shape), 2.5)
    out = np.zeros(shape, np.uint8)
    for label, q in enumerate(np.linspace(0.55, 0.9, n_labels), start=1):
        out[noise > np.quantile(noise, q)] = label
    return out


def _perturbed(rng: np.random.Generator, gt: np.ndarray) -> np.ndarray:
    """A prediction near ``gt``: each label dilated or eroded, then the whole map shifted a little."""
    from scipy import ndimage as ndi

    seg = np.zeros_like(gt)
    for label in range(1, int(gt.max()) + 1):
        mask = gt == label
        mask = (ndi.binary_dilation if rng.random() < 0.5 else ndi.binary_erosion)(mask, iterations=1)
        seg[mask & (seg == 0)] = label
    shifted = np.zeros_like(seg)
    src, dst = [], []
    for n, s in zip(gt.shape, rng.integers(-2, 3, size=gt.ndim)):  # a shift, not a wrap-around
        s = int(s)
        src.append(slice(max(0, -s), n - max(0, s)))
        dst.append(slice(max(0, s), n - max(0, -s)))
    shifted[tuple(dst)] = seg[tuple(src)]
    return shifted


@MONAI_WARNINGS
@pytest.mark.parametrize("dim", [2, 3])
def test_distance_metrics_match_monai_on_random_blobs(dim):
    pytest.importorskip("monai")
    rng = np.random.default_rng(20240 + dim)
    shape, spacing = ((48, 56), None) if dim == 2 else ((16, 36, 30), (2.5, 0.7, 0.9))  # anisotropic 3D
    for trial in range(4):
        gt = _random_labels(rng, shape)
        # half the trials: an unrelated blob map; half: a perturbed copy of the ground truth
        seg = _random_labels(rng, shape) if trial % 2 else _perturbed(rng, gt)
        ours = distance_metrics(gt, seg, spacing)
        hd95, masd = _monai_float64(gt, seg, spacing)
        assert np.all(np.isfinite(hd95)) and len(hd95) == 3
        np.testing.assert_allclose(ours["hd95_per_label"], hd95, rtol=F32_ROUNDING, atol=DIST_TOL)
        np.testing.assert_allclose(ours["masd_per_label"], masd, rtol=F32_ROUNDING, atol=DIST_TOL)
        assert ours["hd95"] == pytest.approx(np.mean(hd95), abs=DIST_TOL)
        assert ours["masd"] == pytest.approx(np.mean(masd), abs=DIST_TOL)
        hd_pub, asd_pub = _monai_public(gt, seg, spacing)
        np.testing.assert_allclose(ours["hd95_per_label"], hd_pub, rtol=1e-5, atol=DIST_TOL)
        np.testing.assert_allclose(ours["masd_per_label"], asd_pub, rtol=1e-5, atol=DIST_TOL)


VALIDATION_DISTANCE_CASES = ["3DBox_CT_sts003.npz", "3DBox_PET_sts004.npz", "3DBox_MR_sts012.npz",
                             "2DBox_Endoscopy_kvasir-cju0roawvk.npz", "2DBox_Microscopy_dsb2018-t4.npz"]


@MONAI_WARNINGS
@pytest.mark.parametrize("name", VALIDATION_DISTANCE_CASES)
def test_distance_metrics_match_monai_on_validation_cases(name):
    pytest.importorskip("monai")
    from reference import DATA_DIR

    path = DATA_DIR / "gts" / name
    if not path.is_file():
        pytest.skip(f"{path} absent (set HARNESS_DATA_DIR to the validation folder)")
    with np.load(path) as npz:
        gt = npz["gts"]
        spacing = tuple(float(s) for s in npz["spacing"]) if gt.ndim == 3 else None  # 2D: pixels
    rng = np.random.default_rng(sum(name.encode()))
    seg = _perturbed(rng, gt)
    ours = distance_metrics(gt, seg, spacing)
    hd95, masd = _monai_float64(gt, seg, spacing)
    present = [i for i in range(len(hd95)) if (gt == i + 1).any() and (seg == i + 1).any()]
    assert present  # the perturbation keeps labels (an eroded tiny label may vanish: policy, not MONAI)
    np.testing.assert_allclose(np.take(ours["hd95_per_label"], present), np.take(hd95, present),
                               rtol=F32_ROUNDING, atol=DIST_TOL)
    np.testing.assert_allclose(np.take(ours["masd_per_label"], present), np.take(masd, present),
                               rtol=F32_ROUNDING, atol=DIST_TOL)


def test_distance_metrics_two_pixels_three_apart():
    gt = np.zeros((10, 12), np.uint8)
    seg = np.zeros_like(gt)
    gt[5, 2] = 1
    seg[5, 5] = 1
    expected = {"hd95": 3.0, "hd95_per_label": (3.0,), "masd": 3.0, "masd_per_label": (3.0,)}
    assert distance_metrics(gt, seg) == expected
    assert distance_metrics(gt, seg, (0.5, 2.0)) == expected  # 2D cases are scored in pixels
    # 3D: mm with the spacing of the axis they are apart along
    g3 = np.zeros((8, 6, 6), np.uint8)
    s3 = np.zeros_like(g3)
    g3[1, 2, 2] = 1
    s3[4, 2, 2] = 1
    assert distance_metrics(g3, s3, (2.0, 1.0, 1.0))["hd95"] == pytest.approx(6.0, abs=1e-12)
    assert distance_metrics(g3, s3, (2.0, 1.0, 1.0))["masd"] == pytest.approx(6.0, abs=1e-12)
    assert distance_metrics(g3.transpose(1, 2, 0), s3.transpose(1, 2, 0), (1.0, 1.0, 0.5))["hd95"] == 1.5
    # a diagonal offset: Euclidean distance with the spacing
    s3 = np.zeros_like(g3)
    s3[1, 5, 6 - 1] = 1
    d = math.hypot(3 * 0.8, 3 * 0.6)
    assert distance_metrics(g3, s3, (2.0, 0.8, 0.6))["hd95"] == pytest.approx(d, abs=1e-12)


def test_distance_metrics_percentile_and_pooled_mean_by_hand():
    gt = np.zeros((10, 12), np.uint8)
    seg = np.zeros_like(gt)
    gt[5, 2] = 1
    seg[5, 5:7] = 1  # seg's two pixels are both surface: 3 and 4 away from gt's pixel
    m = distance_metrics(gt, seg)
    # gt -> seg: [3]; seg -> gt: [3, 4]; P95 of [3, 4] = 3 + 0.95 * (4 - 3) (linear interpolation)
    assert m["hd95"] == pytest.approx(3.95, abs=1e-12)
    # the mean of all three distances together, not the mean of the two directed means (3.25)
    assert m["masd"] == pytest.approx(10 / 3, abs=1e-12)


def test_distance_metrics_surface_is_the_border_not_the_interior():
    gt = np.zeros((15, 15), np.uint8)
    gt[5:10, 5:10] = 1  # 5x5 square: its surface is the 16-pixel ring
    seg = np.zeros_like(gt)
    seg[4:11, 4:11] = 1  # 7x7 square around it: a 24-pixel ring
    m = distance_metrics(gt, seg)
    # gt ring -> seg ring: all 1; seg ring -> gt ring: 20 pixels at 1, the 4 corners at sqrt(2)
    assert m["hd95"] == pytest.approx(math.sqrt(2), abs=1e-12)
    assert m["masd"] == pytest.approx((16 + 20 + 4 * math.sqrt(2)) / 40, abs=1e-12)
    assert distance_metrics(gt, gt.copy()) == {"hd95": 0.0, "hd95_per_label": (0.0,),
                                               "masd": 0.0, "masd_per_label": (0.0,)}
    # a mask touching the image edge: its edge pixels are surface (the outside counts as background)
    edge = np.zeros((6, 6), np.uint8)
    edge[:, :3] = 1
    shifted = np.zeros_like(edge)
    shifted[:, :4] = 1
    assert distance_metrics(edge, shifted)["hd95"] == 1.0


def test_distance_metrics_empty_mask_policy():
    assert "NaN" in EMPTY_MASK_POLICY and "diagonal" in EMPTY_MASK_POLICY
    gt = np.zeros((30, 40), np.uint8)
    seg = np.zeros_like(gt)
    gt[2:6, 2:6] = 1
    seg[2:6, 3:7] = 1
    gt[20:25, 20:25] = 3  # label 3 missed; label 2 absent from both
    m = distance_metrics(gt, seg)
    diagonal = math.hypot(30, 40)  # 50 pixels: the whole image's diagonal
    assert math.isnan(m["hd95_per_label"][1]) and math.isnan(m["masd_per_label"][1])
    assert m["hd95_per_label"][2] == diagonal and m["masd_per_label"][2] == diagonal
    assert m["hd95"] == pytest.approx((m["hd95_per_label"][0] + diagonal) / 2, abs=1e-12)  # NaN left out
    assert m["masd"] == pytest.approx((m["masd_per_label"][0] + diagonal) / 2, abs=1e-12)
    # hallucinated: present in the prediction only, in mm for 3D
    g3 = np.zeros((4, 10, 12), np.uint8)
    s3 = np.zeros_like(g3)
    g3[1:3, 2:5, 2:5] = 2
    s3[1:3, 2:5, 2:5] = 2
    s3[0, 8, 8] = 1
    m3 = distance_metrics(g3, s3, (3.0, 0.5, 0.5))
    assert m3["hd95_per_label"] == (math.sqrt(12.0 ** 2 + 5.0 ** 2 + 6.0 ** 2), 0.0)
    # no labels at all, or every label absent from both: NaN, never an error
    empty = distance_metrics(np.zeros((5, 5), np.uint8), np.zeros((5, 5), np.uint8))
    assert math.isnan(empty["hd95"]) and empty["hd95_per_label"] == ()
    only_bg = distance_metrics(np.zeros((5, 5), np.uint8), np.full((5, 5), 2, np.uint8))
    assert math.isnan(only_bg["masd"])  # gt.max() == 0: seg labels above it are ignored


def test_distance_metrics_ignore_seg_labels_above_gt_max():
    gt = np.zeros((20, 20), np.uint8)
    gt[3:8, 3:8] = 1
    gt[10:15, 10:15] = 2
    seg = gt.copy()
    seg[3:8, 4:9][seg[3:8, 4:9] == 0] = 1
    base = distance_metrics(gt, seg)
    seg[0:2, 15:20] = 3  # not a label of this case
    seg[18, 0] = 7
    assert distance_metrics(gt, seg) == base
    assert distance_metrics(gt.astype(np.int32), seg.astype(np.int64)) == base


def test_distance_metrics_names_and_input_errors():
    gt = np.zeros((8, 8), np.uint8)
    gt[2:5, 2:5] = 1
    assert set(distance_metrics(gt, gt, metrics=("masd",))) == {"masd", "masd_per_label"}
    assert distance_metrics(gt, gt, metrics=()) == {}
    with pytest.raises(ValueError, match="valid: hd95, masd"):
        distance_metrics(gt, gt, metrics=("hd100",))
    with pytest.raises(ValueError, match="shapes differ"):
        distance_metrics(gt, gt[:-1])
    with pytest.raises(ValueError, match="spacing is required"):
        distance_metrics(gt[None], gt[None])
    assert parse_metrics("hd95") == ("dsc", "nsd", "hd95")
    assert parse_metrics(" masd,DSC,hd95,masd ") == ("dsc", "nsd", "hd95", "masd")
    assert parse_metrics(["dsc", "nsd"]) == ("dsc", "nsd")
    with pytest.raises(ValueError, match="unknown metric.*hd99.*valid: dsc, nsd, hd95, masd"):
        parse_metrics("dsc,hd99")


def test_distance_metrics_are_cropped_and_fast_on_a_large_volume():
    """A small object in a large volume costs its bounding box, not the volume."""
    import time

    gt = np.zeros((200, 512, 512), np.uint8)
    gt[100:110, 200:220, 200:230] = 1
    seg = np.roll(gt, 2, axis=0)
    start = time.perf_counter()
    m = distance_metrics(gt, seg, (2.0, 0.8, 0.8))
    assert time.perf_counter() - start < 3.0
    assert m["hd95"] == pytest.approx(4.0, abs=1e-12)  # the shifted end faces are 2 slices (4 mm) apart


def test_score_dirs_adds_distance_columns_after_nsd(tmp_path):
    gts, segs = tmp_path / "gts", tmp_path / "segs"
    gts.mkdir()
    segs.mkdir()
    g2 = np.zeros((30, 30), np.uint8)
    g2[5:20, 5:20] = 1
    _write(gts / "2DBox_US_a.npz", gts=g2)
    _write(segs / "2DBox_US_a.npz", segs=np.roll(g2, 2, axis=1))
    _write(gts / "2DBox_US_missing.npz", gts=g2)  # no prediction: an error row
    default = score_dirs(segs, gts)
    assert list(default.columns) == ["case", "dsc", "nsd", "modality", "error"]
    df = score_dirs(segs, gts, metrics=("dsc", "nsd", "hd95", "masd"))
    assert list(df.columns) == ["case", "dsc", "nsd", "hd95", "masd", "modality", "error"]
    assert df[["case", "dsc", "nsd", "modality", "error"]].equals(default)
    rows = df.set_index("case")
    expected = distance_metrics(g2, np.roll(g2, 2, axis=1))
    assert rows.loc["2DBox_US_a.npz", "hd95"] == expected["hd95"] == 2.0
    assert rows.loc["2DBox_US_a.npz", "masd"] == expected["masd"]
    assert math.isnan(rows.loc["2DBox_US_missing.npz", "hd95"]) and rows.loc["2DBox_US_missing.npz", "error"]
    only_hd = score_dirs(segs, gts, metrics="hd95", workers=2)
    assert list(only_hd.columns) == ["case", "dsc", "nsd", "hd95", "modality", "error"]


def test_score_cli_metrics_flag(tmp_path):
    import csv
    import io

    from harness.cases import save_segs
    from helpers import DEMO, harness_cli

    expected = {}
    for gts_path in sorted((DEMO / "gts").glob("*.npz")):
        with np.load(gts_path) as npz:
            gts = npz["gts"]
            spacing = npz["spacing"] if gts.ndim == 3 else None
        segs = np.roll(gts, 2, axis=-1)
        save_segs(tmp_path / "segs" / gts_path.name, segs)
        expected[gts_path.name] = distance_metrics(gts, segs, spacing)
    out = tmp_path / "metrics.csv"
    result = harness_cli(["score", "--segs", str(tmp_path / "segs"), "--gts", str(DEMO / "gts"), "-o", str(out),
                          "--metrics", "dsc,nsd,hd95,masd"])
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert list(rows[0]) == ["case", "dsc", "nsd", "hd95", "masd", "modality", "error"]
    for row in rows:
        assert float(row["hd95"]) == expected[row["case"]]["hd95"]  # full precision
        assert float(row["masd"]) == expected[row["case"]]["masd"]
    bad = harness_cli(["score", "--segs", str(tmp_path), "--gts", str(DEMO / "gts"), "--metrics", "dsc,hd"])
    assert bad.returncode == 2 and "unknown metric(s) hd; valid: dsc, nsd, hd95, masd" in bad.stderr


def test_run_stores_distance_metrics_only_when_asked(tmp_path):
    from harness.results import read_records
    from harness.run import RunConfig, run
    from helpers import DEMO

    default_out, asked_out = tmp_path / "default", tmp_path / "asked"
    assert run(RunConfig(models=["boxfill"], data_dir=DEMO, out_dir=default_out, limit=2, progress=False)).done == 2
    assert run(RunConfig(models=["boxfill"], data_dir=DEMO, out_dir=asked_out, limit=2, progress=False,
                         metrics=("dsc", "nsd", "hd95", "masd"))).done == 2
    default = read_records(default_out / "results.jsonl")
    asked = read_records(asked_out / "results.jsonl")
    for plain, extra in zip(default, asked):
        assert not {"hd95", "masd", "hd95_per_label", "masd_per_label"} & set(plain)
        assert extra["dsc"] == plain["dsc"] and extra["nsd"] == plain["nsd"]
        with np.load(DEMO / "gts" / extra["case"]) as npz:
            gts = npz["gts"]
            spacing = npz["spacing"] if gts.ndim == 3 else None
        with np.load(asked_out / extra["segs"]) as npz:
            segs = npz["segs"]
        want = distance_metrics(gts, segs, spacing)
        assert extra["hd95"] == want["hd95"] and extra["masd"] == want["masd"]
        assert extra["hd95_per_label"] == list(want["hd95_per_label"])
        assert extra["masd_per_label"] == list(want["masd_per_label"])


@pytest.mark.slow
def test_run_cli_metrics_flag_on_the_demo_set(tmp_path):
    import json

    from helpers import DEMO, harness_cli

    out = tmp_path / "out"
    result = harness_cli(["run", "--models", "boxfill", "--data", str(DEMO), "--out", str(out), "--no-progress",
                          "--metrics", "dsc,nsd,hd95"])
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(r["status"] == "ok" for r in records)
    for record in records:
        assert isinstance(record["hd95"], float) and len(record["hd95_per_label"]) == len(record["dsc_per_label"])
        assert "masd" not in record and "masd_per_label" not in record
    default_out = tmp_path / "default"
    result = harness_cli(["run", "--models", "boxfill", "--data", str(DEMO), "--out", str(default_out),
                          "--no-progress", "--limit", "2"])
    assert result.returncode == 0, result.stderr
    for line in (default_out / "results.jsonl").read_text().splitlines():
        assert "hd95" not in json.loads(line)
    bad = harness_cli(["run", "--models", "boxfill", "--out", str(tmp_path / "bad"), "--metrics", "hd"])
    assert bad.returncode == 2 and "valid: dsc, nsd, hd95, masd" in bad.stderr
