"""The click simulator of the 2025 interactive protocol against hand-made volumes (issue 18)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from harness.interactive.clicks import (
    Click,
    choose_candidate,
    click_classes,
    component_edt,
    largest_error_component,
    simulate_click,
    simulate_clicks,
)


def test_missed_cube_gets_a_foreground_click_at_its_centre():
    gts = np.zeros((12, 14, 16), np.uint8)
    gts[2:9, 3:10, 4:11] = 1  # 7x7x7 cube: the EDT peak (4) is its centre voxel only
    segs = np.zeros_like(gts)
    assert simulate_clicks(segs, gts) == [Click(1, "fg", 5, 6, 7)]


def test_over_segmentation_gets_a_background_click_in_the_largest_error():
    gts = np.zeros((20, 20, 20), np.uint8)
    gts[2:6, 2:6, 2:6] = 1
    segs = gts.copy()
    segs[10:15, 10:15, 10:15] = 1  # 125 false-positive voxels: the largest error
    segs[2:4, 2:4, 2:4] = 0         # 8 missed voxels: smaller
    click = simulate_clicks(segs, gts)[0]
    assert click == Click(1, "bg", 12, 12, 12)


def test_perfect_class_gets_none_and_classes_are_the_sorted_unique_labels():
    gts = np.zeros((6, 6, 6), np.uint16)
    gts[0:2, 0:2, 0:2] = 7
    gts[3:6, 3:6, 3:6] = 3
    segs = gts.copy()
    segs[4, 4, 4] = 0
    assert click_classes(gts) == [3, 7]
    clicks = simulate_clicks(segs, gts)
    assert clicks[1] is None
    assert clicks[0] == Click(3, "fg", 4, 4, 4)


def test_labels_above_255_wrap_as_in_the_evaluator():
    gts = np.zeros((4, 4, 4), np.uint16)
    gts[1:3, 1:3, 1:3] = 1
    segs = gts.astype(np.int32) * 257  # 257 -> 1 in uint8: seen as perfect
    assert simulate_clicks(segs, gts) == [None]


def test_equal_maxima_choice_is_the_seed_42_draw_in_argwhere_order():
    gts = np.zeros((5, 9, 13), np.uint8)
    gts[2, 2:6, 3:9] = 1  # a one-voxel-thick slab: every voxel has EDT 1, 24 equal candidates
    segs = np.zeros_like(gts)
    np.random.seed(42)
    expected = np.argwhere(gts == 1)[np.random.choice(24)]
    click = simulate_clicks(segs, gts)[0]
    assert click.zyx == expected.tolist() and click.kind == "fg"
    for n in (1, 2, 3, 24, 1000, 123457):
        np.random.seed(42)
        assert choose_candidate(n) == np.random.choice(n)
    state = np.random.get_state()[1].copy()
    choose_candidate(10)
    assert np.array_equal(np.random.get_state()[1], state)  # the global generator is left alone


def test_equal_component_sizes_go_to_the_first_in_c_order():
    error = np.zeros((6, 6, 6), bool)
    error[4, 0, 0] = error[4, 0, 1] = True  # starts later in C order
    error[0, 5, 4] = error[0, 5, 5] = True  # starts first (z = 0)
    largest = largest_error_component(error)
    assert largest[0, 5, 4] and largest[0, 5, 5] and largest.sum() == 2


def test_26_connectivity_joins_diagonal_voxels():
    error = np.zeros((5, 5, 5), bool)
    error[0, 0, 0] = error[1, 1, 1] = error[2, 2, 2] = True  # one 26-connected component of 3
    error[4, 4, 0] = error[4, 4, 1] = True                 # a face-connected pair
    assert largest_error_component(error).sum() == 3


def test_padding_is_a_quarter_and_at_least_one_voxel():
    # a 1x1x1 component touching the volume border still sees background around it (padding 1)
    comp = np.zeros((3, 3, 3), bool)
    comp[0, 0, 0] = True
    assert component_edt(comp).tolist() == [[[1.0]]]
    # a long bar: padding 25% along its length, at least 1 voxel across, so the EDT is 1 everywhere
    bar = np.ones((1, 1, 12), bool)
    assert np.all(component_edt(bar) == 1.0)


def _reference_click(segs, gts, label, pool_threshold):
    """The documented rule on whole volumes, written independently of the module (slow, obvious)."""
    error = (segs.astype(np.uint8) == label) != (gts == label)
    if not error.any():
        return None
    labels, _ = ndimage.label(error, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    comp = labels == np.argmax(sizes)
    coords = np.argwhere(comp)
    lo, hi = coords.min(0), coords.max(0) + 1
    shape = hi - lo
    pad = np.maximum((shape * 0.25).astype(int), 1)
    padded = np.zeros(shape + 2 * pad, np.uint8)
    padded[pad[0]:pad[0] + shape[0], pad[1]:pad[1] + shape[1], pad[2]:pad[2] + shape[2]] = \
        comp[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    pooled = padded.size > pool_threshold
    if pooled:
        even = np.zeros([n + n % 2 for n in padded.shape], np.uint8)
        even[:padded.shape[0], :padded.shape[1], :padded.shape[2]] = padded
        small = np.zeros([n // 2 for n in even.shape], np.uint8)
        for a in range(2):
            for b in range(2):
                for c in range(2):
                    small = np.maximum(small, even[a::2, b::2, c::2])
        edt = ndimage.distance_transform_edt(small)
        edt = np.kron(edt, np.ones((2, 2, 2)))
    else:
        edt = ndimage.distance_transform_edt(padded)
    full = np.zeros(comp.shape)
    full[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = edt[pad[0]:pad[0] + shape[0], pad[1]:pad[1] + shape[1],
                                                      pad[2]:pad[2] + shape[2]]
    full = full * comp
    if full.sum() == 0:
        full = comp
    np.random.seed(42)
    maxima = np.argwhere(full == full.max())
    z, y, x = maxima[np.random.choice(len(maxima))]
    return Click(int(label), "fg" if gts[z, y, x] == label else "bg", int(z), int(y), int(x))


@pytest.mark.parametrize("pool_threshold", [60_000_000, 50])
def test_random_volumes_match_the_whole_volume_reference(pool_threshold):
    rng = np.random.default_rng(7)
    for _ in range(25):
        shape = tuple(int(v) for v in rng.integers(6, 18, 3))
        gts = ndimage.binary_opening(rng.random(shape) > 0.45).astype(np.uint8)
        gts[ndimage.binary_erosion(gts > 0) & (rng.random(shape) > 0.7)] = 2
        segs = gts.copy()
        noise = rng.random(shape) > 0.9
        segs[noise] = rng.integers(0, 3, int(noise.sum()))
        labels = click_classes(gts)
        got = simulate_clicks(segs, gts, pool_threshold=pool_threshold)
        want = [_reference_click(segs, gts, label, pool_threshold) for label in labels]
        assert got == want


def test_pooled_path_uses_block_maxima():
    # an 8x8x8 cube is padded by 2 to 12^3; over the threshold it is pooled to 6^3 blocks holding a 4^3
    # cube, whose EDT peaks at 2 (not 4 as unpooled), and each block's value covers its 2x2x2 voxels
    comp = np.zeros((8, 8, 8), bool)
    comp[:] = True
    edt = component_edt(comp, pool_threshold=10)
    assert edt.shape == (8, 8, 8)
    direct = component_edt(comp)
    assert direct.max() == 4.0 and np.count_nonzero(direct == 4.0) == 8
    assert edt.max() == 2.0 and np.count_nonzero(edt == 2.0) == 64
    assert np.array_equal(edt, np.kron(ndimage.distance_transform_edt(np.pad(np.ones((4, 4, 4)), 1)),
                                       np.ones((2, 2, 2)))[2:10, 2:10, 2:10])
    # odd sizes: 7^3 is padded by 1 to 9^3, then zero-padded at the far end to 10^3 and pooled to 5^3:
    # blocks 0..3 hold the cube, block 4 is empty, and the array edge is not background for the EDT,
    # so the peak (4) is block 0, whose only cube voxel is the corner (0, 0, 0): a pooling artifact
    # the evaluator has too
    odd = component_edt(np.ones((7, 7, 7), bool), pool_threshold=10)
    assert odd.shape == (7, 7, 7) and odd.max() == 4.0
    assert np.argwhere(odd == 4.0).tolist() == [[0, 0, 0]]


def test_cc3d_numbering_agrees_when_available():
    cc3d = pytest.importorskip("cc3d")
    rng = np.random.default_rng(3)
    for _ in range(50):
        error = rng.random((7, 9, 11)) > 0.8
        sizes = np.bincount(cc3d.connected_components(error.astype(np.uint8), connectivity=26).ravel())
        sizes[0] = 0
        official = cc3d.connected_components(error.astype(np.uint8), connectivity=26) == np.argmax(sizes)
        assert np.array_equal(largest_error_component(error), official)


def test_shape_errors():
    with pytest.raises(ValueError, match="shape"):
        simulate_clicks(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="3D"):
        simulate_clicks(np.zeros((2, 2)), np.zeros((2, 2)))
    assert simulate_click(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), 1) is None
