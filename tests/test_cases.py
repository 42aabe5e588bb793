"""The case contract: every violation is a CaseError naming the file and the problem."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from harness.cases import (
    CaseError,
    discover_cases,
    load_case,
    load_ground_truth,
    load_segs,
    modality_from_name,
    save_segs,
)
from helpers import DEMO


def write_npz(path: Path, **arrays) -> Path:
    np.savez_compressed(path, **arrays)
    return path


def img2d(h=40, w=50):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def img3d(d=6, h=30, w=40):
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (d, h, w), dtype=np.uint8)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("2DBox_X-Ray_0053.npz", "X-Ray"),
        ("2DBox_XRay_0001.npz", "X-Ray"),
        ("2DBox_CXR_demo.npz", "X-Ray"),
        ("2DBox_Microscope_0008.npz", "Microscopy"),
        ("2DBox_Microscopy_dsb2018-t1.npz", "Microscopy"),
        ("2DBox_US_0525.npz", "US"),
        ("2DBox_Ultrasound_1.npz", "US"),
        ("3DBox_CT_0566.npz", "CT"),
        ("3DBox_MR_demo.npz", "MR"),
        ("2DBox_Endoscope_7.npz", "Endoscopy"),
        ("2DBox_Fundus_0003.npz", "Fundus"),
        ("2DBox_Mammography_demo.npz", "Mammography"),
        ("2DBox_NewThing_1.npz", "NewThing"),
        ("case.npz", "unknown"),
    ],
)
def test_modality_aliases(name, expected):
    assert modality_from_name(name) == expected


def test_valid_2d_and_grey_expansion(tmp_path):
    p = write_npz(tmp_path / "2DBox_US_1.npz", imgs=img2d()[..., 0], boxes=np.array([[1, 2, 10, 20]]))
    case = load_case(p)
    assert case.dim == 2 and case.modality == "US"
    assert case.imgs.shape == (40, 50, 3) and case.imgs.dtype == np.uint8
    assert np.array_equal(case.imgs[..., 0], case.imgs[..., 2])
    assert case.spatial_shape == (40, 50) and case.n_boxes == 1 and case.warnings == ()


def test_valid_3d(tmp_path):
    p = write_npz(tmp_path / "3DBox_CT_1.npz", imgs=img3d(), boxes=np.array([[1, 2, 0, 10, 20, 5]]),
                  spacing=np.array([3.0, 0.8, 0.8]))
    case = load_case(p)
    assert case.dim == 3 and case.spatial_shape == (6, 30, 40) and case.spacing == (3.0, 0.8, 0.8)


def test_real_demo_cases_load():
    for path in discover_cases(DEMO):
        case = load_case(path)
        gt = load_ground_truth(DEMO / "gts" / path.name, case)
        assert gt.gts.shape == case.spatial_shape
        assert int(gt.gts.max()) == case.n_boxes
        assert (gt.spacing is None) == (case.dim == 2)


def expect_error(path: Path, *fragments: str):
    with pytest.raises(CaseError) as info:
        load_case(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_not_a_zip(tmp_path):
    p = tmp_path / "2DBox_US_1.npz"
    p.write_bytes(b"this is not an npz")
    expect_error(p, "not an npz")


def test_truncated_zip(tmp_path):
    good = write_npz(tmp_path / "good.npz", imgs=img2d(200, 200), boxes=np.array([[1, 2, 10, 20]]))
    p = tmp_path / "2DBox_US_1.npz"
    data = good.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    expect_error(p)


def test_corrupt_member(tmp_path):
    p = write_npz(tmp_path / "2DBox_US_1.npz", imgs=img2d(200, 200), boxes=np.array([[1, 2, 10, 20]]))
    data = bytearray(p.read_bytes())
    data[200:260] = bytes(60)  # inside the compressed imgs stream; the directory stays intact
    p.write_bytes(bytes(data))
    expect_error(p)


def test_missing_file(tmp_path):
    expect_error(tmp_path / "2DBox_US_404.npz", "not found")


def test_missing_key(tmp_path):
    p = write_npz(tmp_path / "2DBox_US_1.npz", imgs=img2d())
    expect_error(p, "missing key 'boxes'", "imgs")


def test_pickled_content(tmp_path):
    p = tmp_path / "2DBox_US_1.npz"
    np.savez(p, imgs=np.array([{"evil": 1}], dtype=object), boxes=np.array([[1, 2, 10, 20]]))
    expect_error(p, "pickled")


def test_wrong_ndim(tmp_path):
    p = write_npz(tmp_path / "2DBox_US_1.npz", imgs=np.zeros((2, 3, 4, 5), np.uint8), boxes=np.array([[1, 2, 3, 4]]))
    expect_error(p, "4 dimensions")


def test_wrong_channel_count(tmp_path):
    p = write_npz(tmp_path / "2DBox_US_1.npz", imgs=np.zeros((30, 30, 4), np.uint8), boxes=np.array([[1, 2, 3, 4]]))
    expect_error(p, "4 channels")


def test_name_says_3d_but_image_is_2d(tmp_path):
    p = write_npz(tmp_path / "3DBox_CT_1.npz", imgs=img2d()[..., 0], boxes=np.array([[1, 2, 0, 3, 4, 1]]))
    expect_error(p, "name says 3D")


def test_wrong_dtype(tmp_path):
    p = write_npz(tmp_path / "2DBox_US_1.npz", imgs=np.zeros((30, 30, 3), complex), boxes=np.array([[1, 2, 3, 4]]))
    expect_error(p, "dtype complex128")


def test_out_of_range_intensities(tmp_path):
    p = write_npz(tmp_path / "2DBox_US_1.npz", imgs=np.full((30, 30, 3), 300, np.int16), boxes=np.array([[1, 2, 3, 4]]))
    expect_error(p, "values in [300, 300]")


def test_integer_image_in_range_is_converted_with_warning(tmp_path):
    p = write_npz(tmp_path / "2DBox_US_1.npz", imgs=np.full((30, 30, 3), 7, np.int32), boxes=np.array([[1, 2, 3, 4]]))
    case = load_case(p)
    assert case.imgs.dtype == np.uint8 and case.warnings == ("imgs dtype int32 converted to uint8",)


def test_empty_image(tmp_path):
    p = write_npz(tmp_path / "2DBox_US_1.npz", imgs=np.zeros((0, 30, 3), np.uint8), boxes=np.array([[1, 2, 3, 4]]))
    expect_error(p, "empty")


def test_nan_and_inf(tmp_path):
    imgs = np.full((30, 30, 3), 5.0, np.float32)
    imgs[0, 0, 0] = np.nan
    imgs[1, 1, 1] = np.inf
    p = write_npz(tmp_path / "2DBox_US_1.npz", imgs=imgs, boxes=np.array([[1, 2, 3, 4]]))
    expect_error(p, "1 NaN and 1 infinite")


@pytest.mark.parametrize("boxes", [np.array([[1, 2, 3]]), np.array([1, 2, 3, 4]), np.array([[1, 2, 3, 4, 5, 6]])])
def test_box_wrong_shape_2d(tmp_path, boxes):
    p = write_npz(tmp_path / "2DBox_US_1.npz", imgs=img2d(), boxes=boxes)
    expect_error(p, "boxes has shape", "(N, 4)")


def test_box_wrong_shape_3d(tmp_path):
    p = write_npz(tmp_path / "3DBox_CT_1.npz", imgs=img3d(), boxes=np.array([[1, 2, 3, 4]]))
    expect_error(p, "(N, 6)")


def test_no_boxes(tmp_path):
    p = write_npz(tmp_path / "2DBox_US_1.npz", imgs=img2d(), boxes=np.zeros((0, 4), np.int64))
    expect_error(p, "no rows")


def test_inverted_box_x(tmp_path):
    p = write_npz(tmp_path / "2DBox_US_1.npz", imgs=img2d(), boxes=np.array([[1, 2, 10, 20], [30, 2, 10, 20]]))
    expect_error(p, "box 1 is inverted", "x_min 30 > x_max 10")


def test_inverted_box_z(tmp_path):
    p = write_npz(tmp_path / "3DBox_CT_1.npz", imgs=img3d(), boxes=np.array([[1, 2, 4, 10, 20, 2]]))
    expect_error(p, "box 0 is inverted", "z_min 4 > z_max 2")


def test_box_entirely_outside(tmp_path):
    p = write_npz(tmp_path / "2DBox_US_1.npz", imgs=img2d(40, 50), boxes=np.array([[60, 2, 70, 20]]))
    expect_error(p, "entirely outside", "along x")


def test_box_outside_in_z(tmp_path):
    p = write_npz(tmp_path / "3DBox_CT_1.npz", imgs=img3d(d=6), boxes=np.array([[1, 2, 7, 10, 20, 9]]))
    expect_error(p, "entirely outside", "along z")


def test_nan_box(tmp_path):
    p = write_npz(tmp_path / "2DBox_US_1.npz", imgs=img2d(), boxes=np.array([[1.0, np.nan, 10, 20]]))
    expect_error(p, "NaN")


def test_box_partly_outside_is_clipped_with_warning(tmp_path):
    p = write_npz(tmp_path / "3DBox_CT_1.npz", imgs=img3d(d=6, h=30, w=40), boxes=np.array([[-5, 2, 1, 45, 20, 9]]))
    case = load_case(p)
    assert case.boxes.tolist() == [[0, 2, 1, 39, 20, 5]]
    assert len(case.warnings) == 2  # clipping + missing spacing
    assert "clipped to [0, 2, 1, 39, 20, 5]" in case.warnings[0]


def test_gts_shape_mismatch(tmp_path):
    case = load_case(write_npz(tmp_path / "2DBox_US_1.npz", imgs=img2d(40, 50), boxes=np.array([[1, 2, 10, 20]])))
    gts = write_npz(tmp_path / "gts.npz", gts=np.zeros((40, 51), np.uint8))
    with pytest.raises(CaseError, match=r"gts shape \(40, 51\) does not match imgs shape \(40, 50\)") as info:
        load_ground_truth(gts, case)
    assert str(gts) in str(info.value)


def test_gts_3d_spacing_from_gts_then_case(tmp_path):
    case = load_case(write_npz(tmp_path / "3DBox_CT_1.npz", imgs=img3d(), boxes=np.array([[1, 2, 0, 10, 20, 5]]),
                               spacing=np.array([2.0, 1.0, 1.0])))
    with_spacing = write_npz(tmp_path / "g1.npz", gts=np.zeros((6, 30, 40), np.uint8), spacing=np.array([3.0, 0.5, 0.5]))
    assert load_ground_truth(with_spacing, case).spacing == (3.0, 0.5, 0.5)
    without = write_npz(tmp_path / "g2.npz", gts=np.zeros((6, 30, 40), np.uint8))
    assert load_ground_truth(without, case).spacing == (2.0, 1.0, 1.0)
    with pytest.raises(CaseError, match="without 'spacing'"):
        load_ground_truth(without)


def test_gts_bad_dtype_and_negative(tmp_path):
    with pytest.raises(CaseError, match="integer labels"):
        load_ground_truth(write_npz(tmp_path / "a.npz", gts=np.zeros((4, 4), np.float32)))
    with pytest.raises(CaseError, match="negative"):
        load_ground_truth(write_npz(tmp_path / "b.npz", gts=-np.ones((4, 4), np.int16)))


def test_bad_spacing(tmp_path):
    p = write_npz(tmp_path / "3DBox_CT_1.npz", imgs=img3d(), boxes=np.array([[1, 2, 0, 10, 20, 5]]),
                  spacing=np.array([1.0, 0.0, 1.0]))
    expect_error(p, "spacing must be finite and positive")


def test_segs_roundtrip_uint16(tmp_path):
    segs = np.zeros((5, 7), np.int64)
    segs[1, 1] = 300  # past uint8: microscopy cases have hundreds of objects
    target = tmp_path / "out" / "2DBox_US_1.npz"
    save_segs(target, segs)
    with np.load(target) as npz:
        assert npz.files == ["segs"] and npz["segs"].dtype == np.uint16 and npz["segs"][1, 1] == 300
    assert load_segs(target, (5, 7)).shape == (5, 7)
    with pytest.raises(CaseError, match="does not match"):
        load_segs(target, (5, 8))
    assert [p.name for p in target.parent.iterdir()] == ["2DBox_US_1.npz"]  # no temp file left


def test_discover_limit_round_robin_over_modalities():
    files = discover_cases(DEMO)
    assert len(files) == 6
    picked = discover_cases(DEMO, limit=3)
    assert len({modality_from_name(p.name) for p in picked}) == 3
    assert discover_cases(DEMO, limit=100) == files


def test_npz_written_by_hand_with_extra_members_is_fine(tmp_path):
    p = tmp_path / "2DBox_US_1.npz"
    with zipfile.ZipFile(p, "w") as zf:
        for key, arr in {"imgs": img2d(), "boxes": np.array([[1, 2, 10, 20]]), "extra": np.arange(3)}.items():
            buf = io.BytesIO()
            np.save(buf, arr)
            zf.writestr(f"{key}.npy", buf.getvalue())
    assert load_case(p).n_boxes == 1
