"""Access to the numerical reference folder (``shared/reference``) and the real validation cases
(``shared/data/validation``, override with ``HARNESS_DATA_DIR``) for parity and end-to-end tests.

The folder lives next to the repository checkout (``<checkout>/../shared/reference``); set
``HARNESS_REFERENCE_DIR`` to use another location. Tests call :func:`require_reference` to skip
cleanly when it is absent. Its generators (``make_weights.py``, ``make_inputs.py``) are
imported from the folder, not copied.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

REFERENCE_DIR = Path(
    os.environ.get(
        "HARNESS_REFERENCE_DIR",
        Path(__file__).resolve().parents[1].parent / "shared" / "reference",
    )
)


DATA_DIR = Path(
    os.environ.get(
        "HARNESS_DATA_DIR",
        Path(__file__).resolve().parents[1].parent / "shared" / "data" / "validation",
    )
)


def require_data() -> Path:
    """Skip the calling test unless the real validation cases (``DATA_DIR/imgs``) exist."""
    if not (DATA_DIR / "imgs").is_dir():
        pytest.skip(f"validation cases {DATA_DIR}/imgs are absent (set HARNESS_DATA_DIR to their location)")
    return DATA_DIR


def require_reference(*relative: str) -> Path:
    """Skip the calling test unless the reference folder (and ``relative`` inside it) exists.

    Returns:
        ``REFERENCE_DIR / relative``.
    """
    target = REFERENCE_DIR.joinpath(*relative)
    if not REFERENCE_DIR.is_dir():
        pytest.skip(
            f"reference folder {REFERENCE_DIR} is absent "
            "(set HARNESS_REFERENCE_DIR to its location)"
        )
    if not target.exists():
        pytest.skip(f"reference file {target} is absent")
    return target


@lru_cache(maxsize=None)
def _reference_module(name: str) -> ModuleType:
    """Import ``REFERENCE_DIR/<name>.py`` under a private module name."""
    path = require_reference(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_harness_reference_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_state_dict(model_key: str, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic synthetic weights for ``model_key`` (e.g. "lite_medsam") and ``seed``."""
    manifest = require_reference(model_key, "manifest.json")
    return _reference_module("make_weights").make_state_dict(str(manifest), seed)


def make_case_inputs(seed: int, input_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic (image_u8 (1, 3, S, S), boxes (3, 4) float32) for ``seed``."""
    return _reference_module("make_inputs").make_case_inputs(seed, input_size)


def load_npz(*relative: str) -> dict[str, np.ndarray]:
    """Load a reference npz file fully into memory."""
    with np.load(require_reference(*relative)) as data:
        return {key: data[key] for key in data.files}


def assert_segs_match(segs: np.ndarray, ref: np.ndarray) -> None:
    """The reference README's end-to-end bars: 2D per-label Dice >= 0.999 and at most 1e-4 of the
    pixels mismatched; 3D the same label set on every slice and per-label Dice >= 0.99."""
    assert segs.shape == ref.shape
    assert segs.dtype == np.uint16
    ref = ref.astype(np.int64)
    got = segs.astype(np.int64)
    labels = sorted((set(np.unique(ref).tolist()) | set(np.unique(got).tolist())) - {0})
    assert labels, "reference has no labels"
    dice = {}
    for label in labels:
        a, b = got == label, ref == label
        dice[label] = 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)
    if ref.ndim == 2:
        mismatched = int((got != ref).sum())
        assert mismatched <= 1e-4 * ref.size, f"{mismatched} mismatched pixels; dice {dice}"
        assert min(dice.values()) >= 0.999, dice
    else:
        for z in range(ref.shape[0]):
            assert set(np.unique(got[z]).tolist()) == set(np.unique(ref[z]).tolist()), f"slice {z}"
        assert min(dice.values()) >= 0.99, dice


# The reference README's suggested tolerances for a float32 re-implementation: max|d| / std(ref) for
# embeddings, encoder stages and low-res logits; absolute for IoU and sparse prompt embeddings.
REL_TOL = 3e-5
IOU_TOL = 5e-6
SPARSE_TOL = 1e-5


def rel_dev(actual: torch.Tensor, expected: np.ndarray) -> float:
    """max|actual - expected| / std(expected)."""
    diff = np.abs(actual.detach().numpy().astype(np.float64) - expected)
    return float(diff.max() / expected.astype(np.float64).std())


def abs_dev(actual: torch.Tensor, expected: np.ndarray) -> float:
    """max|actual - expected|."""
    return float(np.abs(actual.detach().numpy().astype(np.float64) - expected).max())


def assert_outputs_match(outputs: dict, ref: dict) -> None:
    """Embedding, low-res logits, IoU and sparse embeddings against a ``case_seed*.npz``."""
    for key in ("image_embedding", "low_res_masks", "iou_predictions", "sparse_embeddings"):
        assert tuple(outputs[key].shape) == ref[key].shape, key
    assert rel_dev(outputs["image_embedding"], ref["image_embedding"]) <= REL_TOL
    assert rel_dev(outputs["low_res_masks"], ref["low_res_masks"]) <= REL_TOL
    assert abs_dev(outputs["iou_predictions"], ref["iou_predictions"]) <= IOU_TOL
    assert abs_dev(outputs["sparse_embeddings"], ref["sparse_embeddings"]) <= SPARSE_TOL


def assert_stage_matches(output: torch.Tensor, ref: dict, name: str) -> None:
    """One encoder stage against its ``dbg__image_encoder.<name>__*`` record: shape, the first 32
    values and mean/std/min/max, each within REL_TOL x the stage's std."""
    prefix = f"dbg__image_encoder.{name}__"
    out = output.detach().double()
    assert list(out.shape) == ref[prefix + "shape"].tolist(), name
    mean, std, low, high = ref[prefix + "stats_mean_std_min_max"]
    assert np.abs(out.flatten()[:32].numpy() - ref[prefix + "head32"]).max() <= REL_TOL * std, name
    for value, expected in zip((out.mean(), out.std(), out.min(), out.max()), (mean, std, low, high)):
        assert abs(value.item() - expected) <= REL_TOL * std, name
