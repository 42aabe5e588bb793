"""training.losses: closed-form values, stability, gradients, bf16, and MONAI parity when installed."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import SAMLoss, dice_loss, focal_loss, iou_of


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _t(values, shape) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


def _perfect_logits(targets: torch.Tensor, magnitude: float = 50.0) -> torch.Tensor:
    return torch.where(targets > 0.5, magnitude, -magnitude)


@pytest.fixture
def small_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 6, 5, generator=g) * 3
    targets = (torch.rand(3, 1, 6, 5, generator=g) > 0.6).float()
    iou_pred = torch.rand(3, 1, generator=g)
    return logits, iou_pred, targets


# ----------------------------------------------------------------------------------------- closed form

def test_perfect_prediction_gives_zero_dice_and_focal():
    targets = _t([1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1], (2, 1, 2, 3))
    logits = _perfect_logits(targets)
    assert dice_loss(logits, targets).item() == pytest.approx(0.0, abs=1e-6)
    assert focal_loss(logits, targets).item() == pytest.approx(0.0, abs=1e-12)


def test_all_wrong_prediction_gives_dice_one():
    targets = _t([1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1], (2, 1, 2, 3))
    logits = -_perfect_logits(targets)
    # No overlap: 1 - smooth_nr / (|p|^2 + |t|^2 + smooth_dr), with 3 + 3 px per sample.
    assert dice_loss(logits, targets).item() == pytest.approx(1.0 - 1e-5 / (6 + 1e-5), abs=1e-7)
    # Every element is confidently wrong: focal ~ BCE ~ 50 per element (modulating factor ~1).
    assert focal_loss(logits, targets).item() == pytest.approx(50.0, rel=1e-5)


def test_empty_target_with_empty_prediction_scores_zero_dice():
    targets = torch.zeros(1, 1, 3, 3)
    assert dice_loss(torch.full((1, 1, 3, 3), -60.0), targets).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_hand_computed_per_sample_per_channel_mean():
    # Sample 0 / channel 0 and 1, sample 1 / channel 0 and 1; each a 1x3 "image".
    x = [[[0.0, 2.0, -1.0], [1.5, -0.5, 0.3]],
         [[-2.0, 0.7, 3.0], [0.0, 0.0, 0.0]]]
    t = [[[1, 1, 0], [0, 1, 1]],
         [[0, 0, 1], [0, 0, 0]]]
    smooth = 1e-5

    def expected(squared: bool) -> float:
        per = []
        for b in range(2):
            for c in range(2):
                p = [_sig(v) for v in x[b][c]]
                tt = t[b][c]
                inter = sum(pi * ti for pi, ti in zip(p, tt))
                if squared:
                    den = sum(pi * pi for pi in p) + sum(ti * ti for ti in tt)
                else:
                    den = sum(p) + sum(tt)
                per.append(1.0 - (2.0 * inter + smooth) / (den + smooth))
        return sum(per) / len(per)

    logits = torch.tensor(x).reshape(2, 2, 1, 3)
    targets = torch.tensor(t, dtype=torch.float32).reshape(2, 2, 1, 3)
    assert dice_loss(logits, targets).item() == pytest.approx(expected(True), abs=1e-6)
    assert dice_loss(logits, targets, squared_pred=False).item() == pytest.approx(expected(False), abs=1e-6)


def test_focal_hand_computed():
    x = [2.0, -1.0, 0.0, 0.5, -3.0, 4.0]
    t = [1, 0, 1, 0, 1, 0]

    def expected(gamma: float, alpha: float | None) -> float:
        total = 0.0
        for xi, ti in zip(x, t):
            p = _sig(xi)
            pt = p if ti == 1 else 1.0 - p
            a = 1.0 if alpha is None else (alpha if ti == 1 else 1.0 - alpha)
            total += -a * (1.0 - pt) ** gamma * math.log(pt)
        return total / len(x)

    logits = _t(x, (1, 1, 2, 3))
    targets = _t(t, (1, 1, 2, 3))
    assert focal_loss(logits, targets).item() == pytest.approx(expected(2.0, None), rel=1e-5)
    assert focal_loss(logits, targets, gamma=1.5).item() == pytest.approx(expected(1.5, None), rel=1e-5)
    assert focal_loss(logits, targets, alpha=0.25).item() == pytest.approx(expected(2.0, 0.25), rel=1e-5)


def test_focal_gamma0_equals_bce_with_logits(small_batch):
    logits, _, targets = small_batch
    got = focal_loss(logits, targets, gamma=0.0)
    ref = F.binary_cross_entropy_with_logits(logits, targets)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    soft = targets * 0.7 + 0.1  # soft labels too, as BCEWithLogits accepts them
    torch.testing.assert_close(focal_loss(logits, soft, gamma=0.0),
                               F.binary_cross_entropy_with_logits(logits, soft), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- stability and gradients

def test_extreme_logits_are_finite():
    targets = _t([1, 0, 1, 0, 0, 1, 1, 0], (2, 1, 2, 2))
    logits = _t([1e4, -1e4, -1e4, 1e4, 1e4, 1e4, -1e4, -1e4], (2, 1, 2, 2)).requires_grad_(True)
    iou_pred = torch.tensor([[0.5], [0.2]], requires_grad=True)
    out = SAMLoss()(logits, iou_pred, targets)
    for key in ("loss", "dice", "focal", "iou"):
        assert torch.isfinite(out[key]), key
    out["loss"].backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(iou_pred.grad).all()
    # Half the elements are wrong by 1e4: focal = mean of BCE = 4 * 1e4 / 8.
    assert out["focal"].item() == pytest.approx(5e3, rel=1e-6)


def test_focal_gradient_matches_analytic_including_zero_logits():
    x = _t([0.0, 0.0, 3.0, -2.0, 30.0, -30.0], (1, 1, 1, 6)).requires_grad_(True)
    t = _t([1, 0, 0, 1, 1, 0], (1, 1, 1, 6))
    focal_loss(x, t, gamma=0.0).backward()
    expected = [(_sig(v) - ti) / 6 for v, ti in zip(x.detach().flatten().tolist(), t.flatten().tolist())]
    torch.testing.assert_close(x.grad.flatten(), torch.tensor(expected), rtol=1e-5, atol=1e-8)


def test_gradients_finite_on_random_batch(small_batch):
    logits, iou_pred, targets = small_batch
    logits = logits.clone().requires_grad_(True)
    iou_pred = iou_pred.clone().requires_grad_(True)
    SAMLoss()(logits, iou_pred, targets)["loss"].backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert torch.isfinite(iou_pred.grad).all()


# ----------------------------------------------------------------------------------------------- IoU

def test_iou_of_known_masks():
    targets = torch.zeros(4, 1, 2, 4)
    logits = torch.full((4, 1, 2, 4), -1.0)
    targets[0, 0, 0, :] = 1                      # 4 px, predicted 2 of them: IoU 2/4
    logits[0, 0, 0, :2] = 1.0
    targets[1, 0, :, :2] = 1                     # 4 px, predicted 2 of them + 2 outside: IoU 2/6
    logits[1, 0, 0, :] = 1.0
    targets[2, 0, 1, 1] = 1                      # exact match, but logit 0 is not positive: IoU 0
    logits[2, 0, 1, 1] = 0.0
    # sample 3: both empty -> 0 (MedficientSAM: intersection / (union + 1e-7))
    got = iou_of(logits, targets)
    assert got.shape == (4,) and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([0.5, 1 / 3, 0.0, 0.0]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(iou_of(_perfect_logits(targets[:2]), targets[:2]), torch.ones(2),
                               rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- SAMLoss

def test_samloss_combines_components_with_weights(small_batch):
    logits, iou_pred, targets = small_batch
    d = dice_loss(logits, targets)
    f = focal_loss(logits, targets)
    i = ((iou_pred.flatten() - iou_of(logits, targets)) ** 2).mean()

    out = SAMLoss()(logits, iou_pred, targets)
    torch.testing.assert_close(out["dice"], d)
    torch.testing.assert_close(out["focal"], f)
    torch.testing.assert_close(out["iou"], i)
    torch.testing.assert_close(out["loss"], d + 20.0 * f + i)

    custom = SAMLoss(dice_weight=0.5, focal_weight=3.0, iou_weight=2.0)(logits, iou_pred, targets)
    torch.testing.assert_close(custom["loss"], 0.5 * d + 3.0 * f + 2.0 * i)


def test_samloss_litemedsam_recipe_is_dice_plus_bce_plus_mse(small_batch):
    logits, iou_pred, targets = small_batch
    out = SAMLoss(focal_weight=1.0, focal_gamma=0.0)(logits, iou_pred, targets)
    expected = (dice_loss(logits, targets) + F.binary_cross_entropy_with_logits(logits, targets)
                + F.mse_loss(iou_pred.flatten(), iou_of(logits, targets)))
    torch.testing.assert_close(out["loss"], expected)


def test_samloss_iou_target_carries_no_gradient(small_batch):
    logits, iou_pred, targets = small_batch
    logits = logits.clone().requires_grad_(True)
    iou_pred = iou_pred.clone().requires_grad_(True)
    SAMLoss(dice_weight=0.0, focal_weight=0.0, iou_weight=1.0)(logits, iou_pred, targets)["loss"].backward()
    assert logits.grad is None or logits.grad.abs().sum() == 0
    expected = 2 * (iou_pred.detach().flatten() - iou_of(logits, targets)) / 3
    torch.testing.assert_close(iou_pred.grad.flatten(), expected)


def test_shape_mismatch_raises(small_batch):
    logits, iou_pred, targets = small_batch
    with pytest.raises(ValueError):
        SAMLoss()(logits[..., :3], iou_pred, targets)
    with pytest.raises(ValueError):
        SAMLoss()(logits, iou_pred[:2], targets)


def test_bf16_inputs_under_autocast_give_float32_losses(small_batch):
    logits, iou_pred, targets = small_batch
    lb, ib = logits.bfloat16(), iou_pred.bfloat16()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = SAMLoss()(lb, ib, targets.bfloat16())
    ref_rounded = SAMLoss()(lb.float(), ib.float(), targets)  # same values, fp32 end to end
    ref = SAMLoss()(logits, iou_pred, targets)
    for key in ("loss", "dice", "focal", "iou"):
        assert out[key].dtype == torch.float32, key
        torch.testing.assert_close(out[key], ref_rounded[key], rtol=1e-6, atol=1e-7)
    # bf16 rounding of the inputs (8 mantissa bits) moves the losses only slightly.
    for key in ("dice", "focal"):
        torch.testing.assert_close(out[key], ref[key], rtol=2e-2, atol=1e-3)


# ------------------------------------------------------------------------------------ MONAI parity

def test_matches_monai_when_installed(small_batch):
    monai_losses = pytest.importorskip("monai.losses")
    logits, _, targets = small_batch
    g = torch.Generator().manual_seed(3)
    multi = torch.randn(2, 3, 4, 4, generator=g) * 4
    multi_t = (torch.rand(2, 3, 4, 4, generator=g) > 0.5).float()
    for x, t in ((logits, targets), (multi, multi_t)):
        ref_dice = monai_losses.DiceLoss(sigmoid=True, squared_pred=True)(x, t)
        ref_focal = monai_losses.FocalLoss(use_softmax=False)(x, t)
        torch.testing.assert_close(dice_loss(x, t), ref_dice, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(focal_loss(x, t), ref_focal, rtol=1e-5, atol=1e-6)
