"""Per-step DSC/NSD, AUC and the time cap of the 2025 interactive protocol (issue 18)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from harness.interactive.scores import auc, cap_exceeded, step_scores, time_cap


def test_auc_is_the_trapezoid_over_the_last_five_steps():
    steps = [0.1, 0.5, 0.6, 0.7, 0.8, 0.9]  # box step + 5 click steps; the box step is left out
    # trapezoids on x = 0..4: (0.5+0.6)/2 + (0.6+0.7)/2 + (0.7+0.8)/2 + (0.8+0.9)/2
    assert auc(steps) == pytest.approx(0.55 + 0.65 + 0.75 + 0.85)
    assert auc([1.0] * 6) == pytest.approx(4.0)  # the maximum
    assert auc([0.0, 1.0, 0.0]) == pytest.approx(1.0)  # fewer steps: all of them
    assert math.isnan(auc([0.4], n_clicks=5))


def test_classes_are_the_unique_labels_and_nsd_is_gated():
    gts = np.zeros((10, 10, 10), np.uint8)
    gts[1:4, 1:4, 1:4] = 2
    gts[6:9, 6:9, 6:9] = 5  # labels 2 and 5: 1, 3, 4 are not classes (2024 would score 1..5)
    segs = gts.copy()
    s = step_scores(gts, segs, (1.0, 1.0, 1.0))
    assert s.labels == (2, 5) and s.dsc == 1.0 and s.nsd == 1.0
    segs[gts == 5] = 0  # class 5 missed: DSC 0.5 (> 0.2): NSD computed, 0 for the missed class
    s = step_scores(gts, segs, (1.0, 1.0, 1.0))
    assert s.dsc == pytest.approx(0.5) and s.nsd_per_class == (1.0, 0.0) and s.nsd == pytest.approx(0.5)
    segs[:] = 0
    segs[1:2, 1:4, 1:4] = 2  # class 2 one third right (DSC 0.5), class 5 missed: mean 0.25
    s = step_scores(gts, segs, (1.0, 1.0, 1.0))
    assert s.dsc == pytest.approx(0.25) and s.nsd > 0
    segs[:] = 0
    segs[1, 1, 1] = 2  # DSC 2/28 / 2 << 0.2: NSD not computed, 0
    s = step_scores(gts, segs, (1.0, 1.0, 1.0))
    assert s.dsc == pytest.approx((2 / 28) / 2) and s.nsd == 0.0 and s.nsd_per_class == ()


def test_nsd_uses_spacing_in_mm():
    gts = np.zeros((12, 12, 12), np.uint8)
    gts[3:9, 3:9, 3:9] = 1
    segs = np.zeros_like(gts)
    segs[4:10, 3:9, 3:9] = 1  # shifted by one slice
    fine = step_scores(gts, segs, (1.0, 1.0, 1.0)).nsd
    coarse = step_scores(gts, segs, (5.0, 1.0, 1.0)).nsd  # one slice is 5 mm: beyond the 2 mm tolerance
    assert fine == pytest.approx(1.0) and coarse < fine


def test_time_cap_is_90_s_per_class():
    assert time_cap(3) == 270.0
    assert not cap_exceeded(270.0, 3) and cap_exceeded(270.01, 3)


def test_errors():
    with pytest.raises(ValueError, match="no class"):
        step_scores(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), (1, 1, 1))
    with pytest.raises(ValueError, match="shape"):
        step_scores(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), (1, 1, 1))


def test_auc_needs_two_click_steps():
    assert math.isnan(auc([0.5, 0.6, 0.7], n_clicks=0)) and math.isnan(auc([0.5, 0.6], n_clicks=1))
    assert auc([0.5, 0.6, 0.7], n_clicks=2) == pytest.approx(0.65)
