"""Hostile inputs, the rest of issue 17 item 7: a full disk, links among the cases, a pickled spacing,
segmenters that return bool masks or labels no box asked for. Each is a clear error naming the file,
and the run keeps what it finished."""
from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

import harness.cases as cases_module
from harness.cases import CaseError, discover_cases, load_case
from harness.run import RunConfig, run
from harness.scoring import score_dirs
from helpers import plugins_with


def make_case(data: Path, name: str, n_boxes: int = 1) -> Path:
    """A small 2D case with ground truth: label i + 1 inside box i."""
    (data / "imgs").mkdir(parents=True, exist_ok=True)
    (data / "gts").mkdir(parents=True, exist_ok=True)
    imgs = np.zeros((24, 32, 3), np.uint8)
    gts = np.zeros((24, 32), np.uint8)
    boxes = []
    for i in range(n_boxes):
        x = 2 + 9 * i
        imgs[4:12, x:x + 7] = 200
        gts[4:12, x:x + 7] = i + 1
        boxes.append([x, 4, x + 6, 11])
    np.savez_compressed(data / "imgs" / name, imgs=imgs, boxes=np.array(boxes))
    np.savez_compressed(data / "gts" / name, gts=gts)
    return data / "imgs" / name


def records(out: Path) -> dict[str, dict]:
    return {r["case"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


# --------------------------------------------------------------------------------------------------
# A full disk
# --------------------------------------------------------------------------------------------------

def test_a_full_disk_while_writing_segs_is_an_error_row_naming_the_file(tmp_path, monkeypatch):
    data = tmp_path / "data"
    for name in ("2DBox_US_a.npz", "2DBox_US_b.npz", "2DBox_US_c.npz"):
        make_case(data, name)
    real = cases_module.atomic_writer

    @contextlib.contextmanager
    def writer(path, mode="wb"):
        with real(path, mode) as fh:
            if Path(path).name == "2DBox_US_b.npz":  # a few bytes land, then the disk is full
                fh.write(b"partial")
                fh.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            yield fh

    monkeypatch.setattr(cases_module, "atomic_writer", writer)
    out = tmp_path / "out"
    report = run(RunConfig(models=["boxfill"], data_dir=data, out_dir=out, progress=False))
    assert report.done == 2 and report.errors == 1
    rec = records(out)["2DBox_US_b.npz"]
    seg = out / "segs" / "boxfill" / "2DBox_US_b.npz"
    assert rec["status"] == "error" and rec["error"].startswith(f"while writing segs: {data / 'imgs' / '2DBox_US_b.npz'}")
    assert "No space left on device" in rec["error"] and str(seg) in rec["error"]
    # no partial file, no temporary left behind
    assert not seg.exists() and sorted(p.name for p in seg.parent.iterdir()) == ["2DBox_US_a.npz", "2DBox_US_c.npz"]


def test_a_full_disk_while_appending_a_result_keeps_the_earlier_rows(tmp_path, monkeypatch, capsys):
    from harness import results
    from harness.cli import main

    data = tmp_path / "data"
    names = [f"2DBox_US_{c}.npz" for c in "abcd"]
    for name in names:
        make_case(data, name)
    out = tmp_path / "out"
    real_write = os.write
    calls = {"n": 0}

    def write(fd, view):
        calls["n"] += 1
        if calls["n"] == 3:  # the third record: half of it lands, then the disk is full
            return real_write(fd, bytes(view)[: len(view) // 2])
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, view)

    monkeypatch.setattr(results.os, "write", write)
    args = ["run", "--models", "boxfill", "--data", str(data), "--out", str(out), "--no-progress", "--no-published"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"No space left on device); the 2 records before it are kept: '{out / 'results.jsonl'}'" in err
    assert "Traceback" not in err and "free some space and run the same command again" in err
    text = (out / "results.jsonl").read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 2  # the torn third line was cut back
    assert [json.loads(line)["case"] for line in text.splitlines()] == names[:2]

    monkeypatch.setattr(results.os, "write", real_write)  # space freed: the same command resumes
    assert main(args) == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["case"] for line in lines) == names  # each case once
    assert all(json.loads(line)["status"] == "ok" for line in lines)


# --------------------------------------------------------------------------------------------------
# Links and folders among the cases
# --------------------------------------------------------------------------------------------------

def test_dangling_links_and_folders_among_the_cases_are_error_rows(tmp_path):
    data = tmp_path / "data"
    make_case(data, "2DBox_US_ok.npz")
    imgs = data / "imgs"
    (imgs / "2DBox_US_dangling.npz").symlink_to(tmp_path / "gone.npz")
    (tmp_path / "folder").mkdir()
    (imgs / "2DBox_US_linkdir.npz").symlink_to(tmp_path / "folder")
    (imgs / "2DBox_US_dir.npz").mkdir()
    assert [p.name for p in discover_cases(data)] == [
        "2DBox_US_dangling.npz", "2DBox_US_dir.npz", "2DBox_US_linkdir.npz", "2DBox_US_ok.npz"]
    out = tmp_path / "out"
    report = run(RunConfig(models=["boxfill"], data_dir=data, out_dir=out, progress=False))
    assert report.done == 1 and report.errors == 3
    recs = records(out)
    assert recs["2DBox_US_dangling.npz"]["error"] == (
        f"while loading the case: {imgs / '2DBox_US_dangling.npz'}: dangling symbolic link (its target "
        f"{tmp_path / 'gone.npz'} does not exist)")
    assert recs["2DBox_US_linkdir.npz"]["error"] == (
        f"while loading the case: {imgs / '2DBox_US_linkdir.npz'}: is a symbolic link to the folder "
        f"{tmp_path / 'folder'}, not an npz file")
    assert recs["2DBox_US_dir.npz"]["error"].endswith(f"{imgs / '2DBox_US_dir.npz'}: is a folder, not an npz file")


def test_a_dangling_gts_link_is_an_error_in_run_and_score(tmp_path):
    data = tmp_path / "data"
    make_case(data, "2DBox_US_a.npz")
    gts = data / "gts" / "2DBox_US_a.npz"
    gts.unlink()
    gts.symlink_to(tmp_path / "nowhere.npz")
    out = tmp_path / "out"
    assert run(RunConfig(models=["boxfill"], data_dir=data, out_dir=out, progress=False)).errors == 1
    assert records(out)["2DBox_US_a.npz"]["error"].startswith(f"while scoring: {gts}: dangling symbolic link")
    frame = score_dirs(out / "segs" / "boxfill", data / "gts")
    assert frame.loc[0, "error"].startswith(f"{gts}: dangling symbolic link")


# --------------------------------------------------------------------------------------------------
# A pickled spacing
# --------------------------------------------------------------------------------------------------

def _pickled_3d(path: Path) -> None:
    np.savez(path, imgs=np.zeros((4, 16, 16), np.uint8), boxes=np.array([[2, 2, 1, 9, 9, 2]]),
             spacing=np.array([1.0, {"payload": "os.system"}, 1.0], dtype=object))


def test_a_pickled_spacing_is_an_error_naming_the_file_in_run_and_score(tmp_path):
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    case = data / "imgs" / "3DBox_CT_p.npz"
    _pickled_3d(case)
    with pytest.raises(CaseError, match=r"key 'spacing' holds pickled \(object\) content, which is refused"):
        load_case(case)
    out = tmp_path / "out"
    assert run(RunConfig(models=["boxfill"], data_dir=data, out_dir=out, progress=False)).errors == 1
    assert records(out)["3DBox_CT_p.npz"]["error"] == (
        f"while loading the case: {case}: key 'spacing' holds pickled (object) content, which is refused")

    # harness score --imgs: the gts has no spacing, so it is read from the images file
    gts, segs = tmp_path / "gts", tmp_path / "segs"
    gts.mkdir()
    segs.mkdir()
    mask = np.zeros((4, 16, 16), np.uint8)
    mask[1:3, 2:10, 2:10] = 1
    np.savez_compressed(gts / "3DBox_CT_p.npz", gts=mask)
    np.savez_compressed(segs / "3DBox_CT_p.npz", segs=mask)
    frame = score_dirs(segs, gts, imgs_dir=data / "imgs")
    assert frame.loc[0, "error"] == f"{case}: key 'spacing' holds pickled (object) content, which is refused"
    # a gts file with its own spacing never reads the images file
    np.savez_compressed(gts / "3DBox_CT_p.npz", gts=mask, spacing=np.ones(3))
    frame = score_dirs(segs, gts, imgs_dir=data / "imgs")
    assert frame.loc[0, "error"] == "" and frame.loc[0, "dsc"] == 1.0


# --------------------------------------------------------------------------------------------------
# What a segmenter returns
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("segment, message", [
    (lambda case: np.ones(case.spatial_shape, bool),
     "segmenter returned segs of dtype bool, expected integer labels 0..2 (0 background, label i + 1 for box i)"),
    (lambda case: np.full(case.spatial_shape, 3, np.uint8),
     "segmenter returned label 3 for a case with 2 box(es); expected integer labels 0..2"),
    (lambda case: np.full(case.spatial_shape, -1, np.int16),
     "segmenter returned label -1 for a case with 2 box(es); expected integer labels 0..2"),
    (lambda case: np.zeros(case.spatial_shape, np.float32),
     "segmenter returned segs of dtype float32, expected integer labels 0..2"),
])
def test_bool_masks_and_labels_no_box_asked_for_are_refused(tmp_path, segment, message):
    data = tmp_path / "data"
    case = make_case(data, "2DBox_US_two.npz", n_boxes=2)
    out = tmp_path / "out"
    report = run(RunConfig(models=["odd"], data_dir=data, out_dir=out, progress=False),
                 plugins=plugins_with("odd", segment))
    assert report.errors == 1
    rec = records(out)["2DBox_US_two.npz"]
    assert rec["error"].startswith(f"while segmenting: {case}: ValueError: {message}"), rec["error"]
    assert not (out / "segs" / "odd" / "2DBox_US_two.npz").exists()


def test_labels_up_to_the_box_count_are_accepted(tmp_path):
    data = tmp_path / "data"
    make_case(data, "2DBox_US_two.npz", n_boxes=2)
    gts = np.load(data / "gts" / "2DBox_US_two.npz")["gts"]
    out = tmp_path / "out"
    report = run(RunConfig(models=["exact"], data_dir=data, out_dir=out, progress=False),
                 plugins=plugins_with("exact", lambda case: gts.astype(np.int64)))
    assert report.done == 1 and records(out)["2DBox_US_two.npz"]["dsc"] == 1.0
