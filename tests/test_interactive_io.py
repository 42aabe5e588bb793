"""The 2025-format reader: restricted unpickling of boxes / clicks / clicks_order (issue 18)."""
from __future__ import annotations

import io
import os
import pickle
import zipfile

import numpy as np
import pytest

from harness.cases import CaseError
from harness.interactive.safe_npz import (
    RestrictedUnpickler,
    read_interactive_input,
    read_pickled_key,
    write_interactive_input,
)

BOX = {"z_min": 1, "z_max": 3, "z_mid": 2, "z_mid_x_min": 0, "z_mid_y_min": 1, "z_mid_x_max": 4, "z_mid_y_max": 3}


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _object(items):
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out


def test_round_trip_as_the_evaluator_writes(tmp_path):
    path = tmp_path / "case.npz"
    prev = np.arange(4 * 5 * 6).reshape(4, 5, 6) % 300  # labels above 255 wrap in uint8, as the evaluator casts
    write_interactive_input(path, np.zeros((4, 5, 6), np.uint8), (2.0, 1.0, 1.0), boxes=[BOX],
                            clicks=[{"fg": [[1, 2, 3]], "bg": []}], clicks_order=[["fg", None]], prev_pred=prev)
    case = read_interactive_input(path)
    assert case.boxes == [BOX]
    assert case.clicks == [{"fg": [[1, 2, 3]], "bg": []}]
    assert case.clicks_order == [["fg", None]]
    assert case.spacing == (2.0, 1.0, 1.0)
    assert case.prev_pred.dtype == np.uint8 and np.array_equal(case.prev_pred, prev.astype(np.uint8))
    # what a team's np.load(allow_pickle=True) sees: numpy int64 inside dicts in object arrays
    with np.load(path, allow_pickle=True) as npz:
        assert npz["boxes"].dtype == object and type(npz["boxes"][0]["z_mid"]) is np.int64
        assert type(npz["clicks"][0]["fg"][0][0]) is np.int64
        assert npz["clicks_order"].shape == (1, 2)


def test_clicks_order_without_none_is_a_plain_array(tmp_path):
    path = tmp_path / "case.npz"
    write_interactive_input(path, np.zeros((2, 2, 2), np.uint8), (1, 1, 1), clicks_order=[["fg"], ["bg"]])
    with np.load(path) as npz:  # no pickle needed, as np.savez_compressed stores a list of str lists
        assert npz["clicks_order"].dtype.kind == "U"
    assert read_interactive_input(path).clicks_order == [["fg"], ["bg"]]


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.npz"
    np.savez(path, imgs=np.zeros((2, 2, 2), np.uint8), spacing=np.ones(3), boxes=_object([_RunsCommand(marker)]))
    with pytest.raises(CaseError) as err:
        read_interactive_input(path)
    message = str(err.value)
    assert str(path) in message and "'boxes'" in message and "system" in message and "refused global" in message
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    (eval, ("1+1",)),
    (__import__, ("os",)),
    (pickle.loads, (b"N.",)),
])
def test_other_callables_are_refused(tmp_path, payload):
    class Reducer:
        def __reduce__(self):
            return payload

    path = tmp_path / "evil.npz"
    np.savez(path, clicks=_object([{"fg": [Reducer()], "bg": []}]))
    with pytest.raises(CaseError, match="refused global"):
        read_pickled_key(path, "clicks")


def test_object_scalars_and_subclasses_are_refused():
    # numpy's scalar reconstructor with an object dtype, and an ndarray subclass through _reconstruct
    evil_scalar = pickle.dumps(np.array([None], dtype=object))  # sanity: a plain object array is fine
    assert RestrictedUnpickler(io.BytesIO(evil_scalar)).load().tolist() == [None]
    crafted = (b"\x80\x04cnumpy._core.multiarray\nscalar\ncnumpy\ndtype\nX\x02\x00\x00\x00O8\x89\x88\x87R"
               b"C\x08AAAAAAAA\x86R.")
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        RestrictedUnpickler(io.BytesIO(crafted)).load()
    sub = pickle.dumps(np.ma.masked_array([1, 2]))
    with pytest.raises(pickle.UnpicklingError):
        RestrictedUnpickler(io.BytesIO(sub)).load()


def test_numpy1_module_names_are_accepted(tmp_path):
    # files written by numpy 1.x name numpy.core.multiarray; the same globals are accepted
    data = pickle.dumps(_object([{"fg": [[np.int64(1), np.int64(2), np.int64(3)]], "bg": []}]), protocol=3)
    old = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert old != data
    value = RestrictedUnpickler(io.BytesIO(old)).load()
    assert value[0]["fg"][0] == [1, 2, 3]


def test_bad_structure_names_file_and_key(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, imgs=np.zeros((2, 3, 4), np.uint8), spacing=np.ones(3),
             boxes=_object([{"z_min": 0, "z_max": 1}]))
    with pytest.raises(CaseError, match=r"bad\.npz: boxes\[0\] lacks z_mid"):
        read_interactive_input(path)
    box = dict(BOX, z_mid_x_max=9)
    np.savez(path, imgs=np.zeros((4, 5, 6), np.uint8), spacing=np.ones(3), boxes=_object([box]))
    with pytest.raises(CaseError, match="outside the image"):
        read_interactive_input(path)
    np.savez(path, imgs=np.zeros((4, 5), np.uint8), spacing=np.ones(3))
    with pytest.raises(CaseError, match="3D"):
        read_interactive_input(path)
    path.write_bytes(b"not a zip")
    with pytest.raises(CaseError, match="corrupt"):
        read_interactive_input(path)


def test_plain_keys_refuse_pickles(tmp_path):
    path = tmp_path / "case.npz"
    np.savez(path, imgs=_object([1, 2]), spacing=np.ones(3))
    with pytest.raises(CaseError, match="'imgs' holds pickled"):
        read_interactive_input(path)
    assert zipfile.is_zipfile(path)


def test_the_package_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "import harness.interactive.safe_npz, harness.interactive.clicks, harness.interactive.scores\n"
            "import harness.interactive.convert, harness.interactive.protocol, harness.interactive.baseline\n"
            "import harness.interactive.cli, harness.jitter\n"
            "assert 'harness.cli' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_oversized_keys_are_refused_before_decompressing(tmp_path, monkeypatch):
    path = tmp_path / "big.npz"
    np.savez_compressed(path, imgs=np.zeros((64, 64, 64), np.uint8), spacing=np.ones(3))
    monkeypatch.setenv("HARNESS_MAX_CASE_GB", str(100_000 / 1e9))  # 100 kB: imgs takes 262 kB
    with pytest.raises(CaseError, match=r"'imgs' would take \d+ bytes decompressed, over the limit of 100000 bytes"):
        read_interactive_input(path)
