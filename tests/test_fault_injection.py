"""Fault injection (issue 17, item 8): one `harness run` over a folder where a third of the cases are hostile
or malformed and the segmenter exits, hangs or allocates on some of the others.

The run must finish with a leaderboard; every good case must match a clean run of the same segmenter (the same
segs, bytes and scores); every bad case must be an error row naming its file and its problem; and nothing outside
the output folder may change (the data folder is fingerprinted before and after, and the pickled payload that
would create a file must never run).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import DEMO, harness_cli, install_fake_plugin
from test_isolation import RUNAWAY_PLUGIN

DEMO_CASES = sorted(p.name for p in (DEMO / "imgs").glob("*.npz"))


class _Payload:
    """A pickle that would create a file if anything unpickled it."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _copy_case(name: str, as_name: str, data: Path) -> None:
    shutil.copy(DEMO / "imgs" / name, data / "imgs" / as_name)
    shutil.copy(DEMO / "gts" / name, data / "gts" / as_name)


def _good_cases(data: Path) -> list[str]:
    """The six demo cases and seven renamed copies: 13 cases a correct segmenter gets right."""
    names = []
    for name in DEMO_CASES:
        _copy_case(name, name, data)
        names.append(name)
    for i, name in enumerate(DEMO_CASES + DEMO_CASES[:1]):
        kind, modality, _ = name.split("_", 2)
        copy = f"{kind}_{modality}_copy{i}.npz"
        _copy_case(name, copy, data)
        names.append(copy)
    return names


def _hostile_cases(data: Path, pwned: Path) -> dict[str, str]:
    """Seven malformed or hostile inputs, each with a phrase its error row must contain."""
    imgs, gts = data / "imgs", data / "gts"
    bad: dict[str, str] = {}
    ct = np.load(DEMO / "imgs" / "3DBox_CT_sts025.npz")

    # A decompression bomb: 157 MB of zeros in a file of a few hundred kB (over --max-case-gb 0.1).
    np.savez_compressed(imgs / "3DBox_CT_bomb.npz", imgs=np.zeros((600, 512, 512), np.uint8),
                        boxes=ct["boxes"], spacing=ct["spacing"])
    bad["3DBox_CT_bomb.npz"] = "over the 0.10 GB limit"
    # Pickled image content whose unpickling would run a command.
    np.savez(imgs / "2DBox_US_pickle.npz", imgs=np.array([_Payload(pwned)], dtype=object),
             boxes=np.array([[1, 1, 5, 5]]))
    bad["2DBox_US_pickle.npz"] = "'imgs' holds pickled"
    # A pickled spacing in an otherwise valid 3D case.
    np.savez(imgs / "3DBox_MR_spacing.npz", imgs=ct["imgs"], boxes=ct["boxes"],
             spacing=np.array([_Payload(pwned)], dtype=object))
    bad["3DBox_MR_spacing.npz"] = "'spacing' holds pickled"
    # Not a zip at all.
    (imgs / "2DBox_Endoscopy_garbage.npz").write_bytes(os.urandom(4096))
    bad["2DBox_Endoscopy_garbage.npz"] = "not an npz file"
    # A case without its boxes.
    np.savez_compressed(imgs / "2DBox_Microscopy_noboxes.npz", imgs=np.zeros((64, 64, 3), np.uint8))
    bad["2DBox_Microscopy_noboxes.npz"] = "boxes"
    # A dangling link among the cases.
    (imgs / "2DBox_US_dangling.npz").symlink_to(data / "nowhere.npz")
    bad["2DBox_US_dangling.npz"] = "dangling"
    # Ground truth with one voxel labelled 2e8: a valid image, a gts the metrics cannot index.
    shutil.copy(DEMO / "imgs" / "2DBox_US_hc18-158.npz", imgs / "2DBox_US_label2e8.npz")
    labels = np.load(DEMO / "gts" / "2DBox_US_hc18-158.npz")["gts"].astype(np.uint32)
    labels[0, 0] = 200_000_000
    np.savez_compressed(gts / "2DBox_US_label2e8.npz", gts=labels)
    bad["2DBox_US_label2e8.npz"] = "200000000"
    return bad


# The segmenter misbehaves on three of the good-looking cases.
RUNAWAY = {"2DBox_US_copy2.npz": "_exit", "3DBox_MR_copy4.npz": "hang", "2DBox_Microscopy_copy1.npz": "alloc"}
RUNAWAY_ERRORS = {"_exit": "the segmenter's worker exited with status 7", "hang": "exceeded --timeout 6 s",
                  "alloc": "exceeded --memory 1 GiB"}


def _fingerprint(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: links by target, files by size, mtime and content hash."""
    seen = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            seen[rel] = ("link", os.readlink(path))
        elif path.is_file():
            st = path.stat()
            seen[rel] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            seen[rel] = ("dir",)
    return seen


def _records(out: Path) -> dict[str, dict]:
    return {r["case"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_one_run_survives_hostile_inputs_and_runaway_segmenters(tmp_path):
    env = install_fake_plugin(tmp_path / "site", "runaway_plugin", RUNAWAY_PLUGIN, "runaway", "0.1", "runaway")
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # Python's own caches beside the plugin are not the harness's writes
    data, clean, pwned = tmp_path / "data", tmp_path / "clean", tmp_path / "PWNED"
    for root in (data, clean):
        (root / "imgs").mkdir(parents=True)
        (root / "gts").mkdir()
    good = _good_cases(data)
    _good_cases(clean)
    bad = _hostile_cases(data, pwned)
    assert len(good) + len(bad) == 20 and len(bad) + len(RUNAWAY) == 10
    (data / "imgs" / ".notes.tmp").write_text("a user's file named like a temporary")
    before = _fingerprint(tmp_path)

    common = ["--no-progress", "--bootstrap", "20", "--max-case-gb", "0.1"]
    reference = harness_cli(["run", "--models", "runaway", "--data", str(clean), "--out", str(tmp_path / "out-clean"),
                             *common], env=env, timeout=300)
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "out"
    started = time.monotonic()
    result = harness_cli(["run", "--models", "runaway", "--timeout", "6", "--memory", "1g", "--data", str(data),
                          "--out", str(out), *common],
                         env={**env, "RUNAWAY": ",".join(f"{c}={w}" for c, w in RUNAWAY.items())}, timeout=600)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert f"{len(bad) + len(RUNAWAY)} case(s) ended in error" in result.stderr
    assert "Traceback" not in result.stderr
    assert (out / "leaderboard.md").is_file() and "| Runaway" in result.stdout
    assert elapsed < 300

    recs, ref = _records(out), _records(tmp_path / "out-clean")
    assert set(recs) == set(good) | set(bad)
    for case, phrase in bad.items():
        row = recs[case]
        assert row["status"] == "error", (case, row)
        assert case in row["error"] and phrase in row["error"], (case, row["error"])
    for case, what in RUNAWAY.items():
        assert recs[case]["status"] == "error" and RUNAWAY_ERRORS[what] in recs[case]["error"], recs[case]
    for case in set(good) - set(RUNAWAY):
        assert recs[case]["status"] == "ok", recs[case]
        assert recs[case]["dsc"] == ref[case]["dsc"] and recs[case]["nsd"] == ref[case]["nsd"]
        produced = np.load(out / "segs" / "runaway" / case)["segs"]
        expected = np.load(tmp_path / "out-clean" / "segs" / "runaway" / case)["segs"]
        assert np.array_equal(produced, expected), case

    assert not pwned.exists()  # no pickle was executed
    after = _fingerprint(tmp_path)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert all(k.split("/")[0] in ("out", "out-clean") for k in changed), sorted(changed)
