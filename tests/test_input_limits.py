"""Hostile inputs (issue 17, item 2): sizes are read from the npz's .npy headers and checked before
anything is decompressed, a header that disagrees with its zip entry is refused, gts labels are bounded,
and every refusal or MemoryError names the file."""
from __future__ import annotations

import io
import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import psutil
import pytest

import harness.cases as cases_module
from harness.cases import (
    MAX_CASE_ENV,
    MAX_LABEL,
    CaseError,
    default_max_case_bytes,
    load_case,
    load_ground_truth,
    load_segs,
    max_case_bytes,
    npz_members,
    set_max_case_gb,
)
from harness.metrics import case_metrics, distance_metrics
from harness.run import RunConfig, run
from harness.scoring import score_case, score_dirs


@pytest.fixture(autouse=True)
def _own_limit():
    """Each test starts from the default limit and leaves the process's setting as it found it (a run's
    ``max_case_gb`` is set in the environment, for the processes it starts)."""
    saved = os.environ.pop(MAX_CASE_ENV, None)
    yield
    os.environ.pop(MAX_CASE_ENV, None)
    if saved is not None:
        os.environ[MAX_CASE_ENV] = saved


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def npy_header(shape: tuple, dtype: str) -> bytes:
    """A .npy version 1.0 header claiming ``shape`` and ``dtype`` (no data)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue()


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def declare_size(path: Path, member: str, size: int) -> None:
    """Rewrite the uncompressed size the zip's central directory declares for ``member`` (what readers
    trust), leaving its data as it is: a forged file whose header and zip entry agree on a lie."""
    data = bytearray(path.read_bytes())
    pos = data.find(b"PK\x01\x02")
    while pos >= 0:
        name_len = struct.unpack_from("<H", data, pos + 28)[0]
        if data[pos + 46: pos + 46 + name_len].decode() == member:
            struct.pack_into("<I", data, pos + 24, size)
            path.write_bytes(bytes(data))
            return
        pos = data.find(b"PK\x01\x02", pos + 4)
    raise AssertionError(f"{member} not in {path}")


def case_2d(path: Path, n_boxes: int = 1) -> Path:
    imgs = np.zeros((24, 32, 3), np.uint8)
    imgs[4:12, 4:12] = 200
    boxes = np.array([[4 + 2 * i, 4, 11 + 2 * i, 11] for i in range(n_boxes)])
    np.savez_compressed(path, imgs=imgs, boxes=boxes)
    return path


def gts_2d(path: Path, labels: dict[tuple[int, int], int] | None = None, dtype=np.uint8) -> Path:
    gts = np.zeros((24, 32), dtype)
    gts[4:12, 4:12] = 1
    for where, value in (labels or {}).items():
        gts[where] = value
    np.savez_compressed(path, gts=gts)
    return path


# --------------------------------------------------------------------------------------------------
# Sizes from the headers, before decompressing
# --------------------------------------------------------------------------------------------------

def test_members_are_described_from_their_headers_alone(tmp_path, monkeypatch):
    path = tmp_path / "2DBox_US_x.npz"
    np.savez_compressed(path, imgs=np.zeros((30, 40, 3), np.uint8), boxes=np.array([[1, 2, 3, 4]], np.int64))
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("npz_members decompressed the file"))
    members = {m.key: m for m in npz_members(path)}
    assert members["imgs"].shape == (30, 40, 3) and members["imgs"].dtype == np.uint8
    assert members["imgs"].nbytes == 30 * 40 * 3 and members["boxes"].nbytes == 4 * 8


def test_a_decompression_bomb_is_refused_before_decompressing(tmp_path, monkeypatch):
    path = tmp_path / "3DBox_CT_bomb.npz"
    np.savez_compressed(path, imgs=np.zeros((64, 512, 512), np.uint8), boxes=np.array([[1, 1, 1, 9, 9, 9]]),
                        spacing=np.ones(3))
    assert path.stat().st_size < 100_000  # 16 MiB of zeros
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("the bomb was decompressed"))
    with pytest.raises(CaseError) as info:
        load_case(path, max_bytes=10**7)
    text = str(info.value)
    assert text.startswith(f"{path}: ")
    for part in ("'imgs.npy'", "(64, 512, 512)", "uint8", "0.02 GB", "0.01 GB limit", "--max-case-gb"):
        assert part in text, text


def test_the_limit_comes_from_the_environment_and_defaults_to_a_quarter_of_memory(tmp_path, monkeypatch):
    assert default_max_case_bytes() == psutil.virtual_memory().total // 4
    assert max_case_bytes() == default_max_case_bytes()
    path = case_2d(tmp_path / "2DBox_US_a.npz")
    load_case(path)
    set_max_case_gb(1e-6)  # 1000 bytes: what `harness run --max-case-gb` sets, for its child processes too
    assert max_case_bytes() == 1000
    with pytest.raises(CaseError, match="over the 1000 bytes limit"):
        load_case(path)
    monkeypatch.setenv(MAX_CASE_ENV, "lots")
    with pytest.raises(ValueError, match=MAX_CASE_ENV):
        max_case_bytes()
    with pytest.raises(ValueError, match="positive"):
        set_max_case_gb(0)


def test_a_header_that_disagrees_with_its_zip_entry_is_refused(tmp_path, monkeypatch):
    # the .npy header claims 10 GB; the zip entry holds (and declares) 100 bytes of data
    path = write_zip(tmp_path / "2DBox_US_liar.npz", {
        "imgs.npy": npy_header((100_000, 100_000), "u1") + bytes(100),
        "boxes.npy": npy_bytes(np.array([[1, 2, 3, 4]])),
    })
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("the forged file was decompressed"))
    with pytest.raises(CaseError) as info:
        load_case(path, max_bytes=10**12)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and "'imgs.npy'" in text and "(100000, 100000)" in text
    assert "forged or corrupt" in text


def test_a_forged_zip_entry_that_agrees_with_the_header_is_held_to_the_limit(tmp_path):
    # header and zip directory both claim 50 MB; the data is 1 KB: refused by size, never inflated
    claim = npy_header((50_000, 1000), "u1")
    path = write_zip(tmp_path / "gts.npz", {"gts.npy": claim + bytes(1000)})
    declare_size(path, "gts.npy", len(claim) + 50_000_000)
    assert {m.key: m.nbytes for m in npz_members(path)} == {"gts": 50_000_000}
    with pytest.raises(CaseError, match=r"'gts.npy' \(shape \(50000, 1000\), dtype uint8\) takes 0.05 GB"):
        load_ground_truth(path, max_bytes=10**7)
    with pytest.raises(CaseError, match="key 'gts' cannot be read: EOF"):  # under the limit: the lie shows when read
        load_ground_truth(path, max_bytes=10**9)


def test_pickled_members_and_bad_headers_name_the_file(tmp_path):
    pickled = tmp_path / "3DBox_CT_p.npz"
    np.savez(pickled, imgs=np.zeros((2, 4, 4), np.uint8), boxes=np.array([[0, 0, 0, 1, 1, 1]]),
             spacing=np.array([1.0, "a", None], dtype=object))
    with pytest.raises(CaseError, match=r"key 'spacing' holds pickled \(object\) content") as info:
        load_case(pickled)
    assert str(info.value).startswith(str(pickled))
    garbage = write_zip(tmp_path / "g.npz", {"segs.npy": b"\x93NUMPY\x01\x00\x05\x00{bad}"})
    with pytest.raises(CaseError, match=r"key 'segs' has a malformed \.npy header") as info:
        load_segs(garbage)
    assert str(info.value).startswith(str(garbage))


def test_only_the_needed_keys_are_read(tmp_path):
    # a gts file holding a large extra array: the missing key is reported without inflating it
    path = tmp_path / "x.npz"
    np.savez_compressed(path, imgs=np.zeros((64, 512, 512), np.uint8))
    with pytest.raises(CaseError, match=r"missing key 'gts' \(keys present: imgs\)"):
        load_ground_truth(path, max_bytes=1000)
    seg = tmp_path / "s.npz"
    np.savez_compressed(seg, segs=np.zeros((4, 4), np.uint8), extra=np.zeros((64, 512, 512), np.uint8))
    assert load_segs(seg, max_bytes=1000).shape == (4, 4)  # extra is never read, so never counted


# --------------------------------------------------------------------------------------------------
# Labels the metrics can index
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("label, dtype", [(200_000_000, np.uint32), (10**12, np.int64), (MAX_LABEL + 1, np.int32)])
def test_gts_labels_above_the_bound_are_refused_naming_the_file(tmp_path, label, dtype):
    path = gts_2d(tmp_path / "2DBox_US_l.npz", {(20, 30): label}, dtype)
    assert path.stat().st_size < 1000
    with pytest.raises(CaseError) as info:
        load_ground_truth(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and f"gts has label {label} (at index (20, 30))" in text
    with pytest.raises(ValueError, match=f"gt has label {label}"):
        case_metrics(np.load(path)["gts"], np.zeros((24, 32), np.uint16))
    with pytest.raises(ValueError, match=f"gt has label {label}"):
        distance_metrics(np.load(path)["gts"], np.zeros((24, 32), np.uint16))


def test_the_highest_allowed_label_is_scored(tmp_path):
    gts = np.zeros((24, 32), np.uint16)
    gts[2, 2] = MAX_LABEL
    metrics = case_metrics(gts, gts.copy())
    assert np.isnan(metrics.dsc) and len(metrics.dsc_per_label) == MAX_LABEL  # labels 1..65534 absent


def test_score_rows_for_hostile_files_name_the_file(tmp_path):
    gts_dir, segs_dir = tmp_path / "gts", tmp_path / "segs"
    gts_dir.mkdir()
    segs_dir.mkdir()
    gts_2d(gts_dir / "2DBox_US_big.npz", {(20, 30): 200_000_000}, np.uint32)
    gts_2d(gts_dir / "2DBox_US_huge.npz", {(20, 30): 10**12}, np.int64)
    gts_2d(gts_dir / "2DBox_US_ok.npz")
    np.savez_compressed(gts_dir / "2DBox_US_bomb.npz", gts=np.zeros((2048, 4096), np.uint8))
    for name in ("2DBox_US_big", "2DBox_US_huge", "2DBox_US_ok"):
        np.savez_compressed(segs_dir / f"{name}.npz", segs=np.load(gts_dir / "2DBox_US_ok.npz")["gts"])
    frame = score_dirs(segs_dir, gts_dir, max_case_gb=0.005).set_index("case")
    assert frame.loc["2DBox_US_ok.npz", "error"] == "" and frame.loc["2DBox_US_ok.npz", "dsc"] == 1.0
    assert f"{gts_dir / '2DBox_US_big.npz'}: gts has label 200000000" in frame.loc["2DBox_US_big.npz", "error"]
    assert f"{gts_dir / '2DBox_US_huge.npz'}: gts has label 1000000000000" in frame.loc["2DBox_US_huge.npz", "error"]
    bomb = frame.loc["2DBox_US_bomb.npz", "error"]
    assert bomb.startswith(str(gts_dir / "2DBox_US_bomb.npz")) and "8388608 bytes decompressed" in bomb
    assert "over the 5000000 bytes limit" in bomb and "--max-case-gb" in bomb
    assert (frame["dsc"][frame["error"] != ""] == 0).all()


def test_a_memory_error_while_scoring_names_the_files(tmp_path, monkeypatch):
    gts = gts_2d(tmp_path / "2DBox_US_m.npz")
    seg = tmp_path / "seg.npz"
    np.savez_compressed(seg, segs=np.load(gts)["gts"])

    def out_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 7.28 TiB for an array")

    monkeypatch.setattr("harness.scoring.case_metrics", out_of_memory)
    row = score_case(gts, seg)
    assert row["error"].startswith(f"scoring {seg} against {gts}: MemoryError: Unable to allocate 7.28 TiB")
    assert "not enough memory" in row["error"] and row["dsc"] == 0.0


def test_run_records_hostile_gts_and_bombs_as_errors_naming_the_file(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    (data / "gts").mkdir()
    for name in ("2DBox_US_ok", "2DBox_US_label", "2DBox_US_memory"):
        case_2d(data / "imgs" / f"{name}.npz")
        gts_2d(data / "gts" / f"{name}.npz")
    gts_2d(data / "gts" / "2DBox_US_label.npz", {(20, 30): 200_000_000}, np.uint32)
    np.savez_compressed(data / "imgs" / "2DBox_US_bomb.npz", imgs=np.zeros((4096, 4096, 3), np.uint8),
                        boxes=np.array([[1, 1, 9, 9]]))
    from harness.runners import case as case_steps

    real = case_steps.case_metrics

    def metrics(gt, seg, spacing=None):
        if gt.shape == (24, 32) and gt[0, 0] == 0 and "memory" in str(spacing_hint.get("case")):
            raise MemoryError("Unable to allocate 7.28 TiB")
        return real(gt, seg, spacing=spacing)

    spacing_hint: dict = {}
    real_load = case_steps.load_ground_truth

    def load_gt(path, case=None, **kwargs):
        spacing_hint["case"] = Path(path).name
        return real_load(path, case, **kwargs)

    monkeypatch.setattr(case_steps, "case_metrics", metrics)
    monkeypatch.setattr(case_steps, "load_ground_truth", load_gt)
    out = tmp_path / "out"
    report = run(RunConfig(models=["boxfill"], data_dir=data, out_dir=out, progress=False, max_case_gb=0.01))
    assert report.done == 1 and report.errors == 3
    records = {r["case"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert records["2DBox_US_ok.npz"]["status"] == "ok"
    assert f"{data / 'gts' / '2DBox_US_label.npz'}: gts has label 200000000" in records["2DBox_US_label.npz"]["error"]
    bomb = records["2DBox_US_bomb.npz"]["error"]
    assert bomb.startswith(f"while loading the case: {data / 'imgs' / '2DBox_US_bomb.npz'}: member 'imgs.npy'")
    assert "--max-case-gb" in bomb
    memory = records["2DBox_US_memory.npz"]["error"]
    assert memory.startswith(f"while scoring: {data / 'gts' / '2DBox_US_memory.npz'}: MemoryError")
    assert "not enough memory" in memory
    assert max_case_bytes() == 10**7  # the run's limit, for the processes it starts as well


def test_cli_flag_sets_the_limit(tmp_path):
    from helpers import harness_cli

    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    case_2d(data / "imgs" / "2DBox_US_a.npz")
    result = harness_cli(["run", "--models", "boxfill", "--data", str(data), "--out", str(tmp_path / "out"),
                          "--no-progress", "--max-case-gb", "0.000001"])
    assert result.returncode == 1, result.stderr
    record = json.loads((tmp_path / "out" / "results.jsonl").read_text())
    assert "over the 1000 bytes limit" in record["error"] and str(data / "imgs" / "2DBox_US_a.npz") in record["error"]
    gts = tmp_path / "gts"
    gts.mkdir()
    gts_2d(gts / "2DBox_US_a.npz")
    scored = harness_cli(["score", "--segs", str(gts), "--gts", str(gts), "--max-case-gb", "0.0000001"])
    assert scored.returncode == 1 and "over the 100 bytes limit" in scored.stdout
    bad = harness_cli(["score", "--segs", str(gts), "--gts", str(gts), "--max-case-gb", "0"])
    assert bad.returncode == 2 and "--max-case-gb" in bad.stderr


def test_an_explicit_max_bytes_overrides_the_setting(tmp_path):
    """load_case, load_ground_truth and load_segs all honour an explicit max_bytes over the setting."""
    path = case_2d(tmp_path / "2DBox_US_a.npz")
    set_max_case_gb(1e-6)
    assert load_case(path, max_bytes=10**6).n_boxes == 1
    assert cases_module.max_case_bytes() == 1000


def test_predict_refuses_oversized_cases_and_reports_dangling_links(tmp_path, capsys):
    from harness.predict import predict

    inputs = tmp_path / "in"
    inputs.mkdir()
    case_2d(inputs / "2DBox_US_ok.npz")
    np.savez_compressed(inputs / "2DBox_US_bomb.npz", imgs=np.zeros((2048, 2048, 3), np.uint8),
                        boxes=np.array([[1, 1, 9, 9]]))
    (inputs / "2DBox_US_gone.npz").symlink_to(tmp_path / "gone.npz")
    report = predict("boxfill", inputs, tmp_path / "out", max_case_gb=0.001, log=lambda *a: None)
    assert report.written == ["2DBox_US_ok.npz"]
    assert "over the 1000000 bytes limit" in report.failed["2DBox_US_bomb.npz"]
    assert report.failed["2DBox_US_gone.npz"].startswith(f"while loading the case: {inputs / '2DBox_US_gone.npz'}: "
                                                         "dangling symbolic link")
    assert "harness predict: error" in capsys.readouterr().err
