"""Fine-tuning losses for box-prompted SAM-style segmenters (pure torch, float32 math).

Upstream recipes these follow (hieplpvip/medficientsam ``src/losses/`` and ``configs/model/finetune.yaml``;
bowang-lab/MedSAM, branch LiteMedSAM):

* **MedficientSAM fine-tuning** (5.2), the defaults of :class:`SAMLoss`:
  ``1.0 * DiceLoss(sigmoid=True, squared_pred=True) + 20.0 * FocalLoss(use_softmax=False)``
  ``+ 1.0 * MSE(iou_pred, IoU(logits > 0, gt))``, computed on logits upsampled 256 -> 512.
* **LiteMedSAM fine-tuning** (5.4): ``Dice(sigmoid, squared_pred) + BCEWithLogits + MSE(iou_pred, IoU)``,
  each weighted 1, at 256. BCE is the focal loss with ``gamma = 0``, so this recipe is
  ``SAMLoss(dice_weight=1, focal_weight=1, iou_weight=1, focal_gamma=0)``.

The upstream code calls MONAI's ``DiceLoss`` and ``FocalLoss``. MONAI is not a dependency here; the
functions below reimplement the same formulas with MONAI's defaults, looked up in MONAI's
``monai/losses/dice.py`` and ``monai/losses/focal_loss.py`` (Project-MONAI/MONAI, ``dev`` branch;
https://docs.monai.io/en/stable/losses.html):

* ``DiceLoss``: ``smooth_nr = 1e-5``, ``smooth_dr = 1e-5``, ``batch = False`` (the Dice is formed per
  sample and per channel, reducing spatial dimensions only), ``reduction = "mean"`` (mean over batch and
  channels), ``include_background = True``. With ``squared_pred = True`` both the prediction and the
  target are squared in the denominator.
* ``FocalLoss``: ``gamma = 2.0``, ``alpha = None``, ``weight = None``, ``reduction = "mean"`` (mean over
  every element), ``use_softmax = False`` (sigmoid focal loss); MONAI casts input and target to float.

Every function casts its inputs to float32 and runs with autocast disabled, so under bf16/fp16 mixed
precision the losses (and their gradients into the logits) are still computed in float32.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["dice_loss", "focal_loss", "iou_of", "SAMLoss"]

# Devices on which torch.autocast exists; elsewhere there is no autocast to switch off.
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def _no_autocast(t: Tensor):
    """A context that disables autocast on ``t``'s device (a no-op where autocast does not exist)."""
    if t.device.type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type=t.device.type, enabled=False)
    return contextlib.nullcontext()


def _check_same_shape(logits: Tensor, targets: Tensor) -> None:
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape; "
                         "upsample the logits to the target size first")
    if logits.dim() < 2:
        raise ValueError(f"expected (B, C, *spatial) tensors, got shape {tuple(logits.shape)}")


def dice_loss(logits: Tensor, targets: Tensor, squared_pred: bool = True,
              smooth_nr: float = 1e-5, smooth_dr: float = 1e-5) -> Tensor:
    """Soft Dice loss on sigmoid probabilities: MONAI ``DiceLoss(sigmoid=True, squared_pred=True)``.

    ``p = sigmoid(logits)``; for every sample ``b`` and channel ``c``, over the spatial dimensions,
    ``loss[b, c] = 1 - (2 * sum(p * t) + smooth_nr) / (sum(p**2) + sum(t**2) + smooth_dr)``
    (``sum(p) + sum(t)`` when ``squared_pred`` is False); the result is the mean over ``b`` and ``c``.

    Defaults are the ones MedficientSAM (5.2) and LiteMedSAM (5.4) use: ``squared_pred=True`` set
    explicitly upstream, ``smooth_nr = smooth_dr = 1e-5`` and mean reduction from MONAI's defaults.
    An empty target with an all-negative prediction scores ~0 (both smoothing terms dominate).

    Args:
        logits: (B, C, *spatial) raw scores, any float dtype.
        targets: same shape, values in [0, 1].

    Returns:
        A float32 scalar.
    """
    _check_same_shape(logits, targets)
    with _no_autocast(logits):
        x = logits.float()
        t = targets.float()
        p = torch.sigmoid(x)
        dims = tuple(range(2, x.dim()))
        intersection = (p * t).sum(dim=dims)
        if squared_pred:
            denominator = (p * p).sum(dim=dims) + (t * t).sum(dim=dims)
        else:
            denominator = p.sum(dim=dims) + t.sum(dim=dims)
        per_item = 1.0 - (2.0 * intersection + smooth_nr) / (denominator + smooth_dr)
        return per_item.mean()


def focal_loss(logits: Tensor, targets: Tensor, gamma: float = 2.0, alpha: float | None = None) -> Tensor:
    """Sigmoid focal loss: MONAI ``FocalLoss(use_softmax=False)`` with its defaults (gamma 2, no alpha).

    Per element, with ``p = sigmoid(x)`` and target ``t``:
    ``BCE(x, t) * (1 - p_t) ** gamma``, where ``1 - p_t`` is ``1 - p`` for ``t = 1`` and ``p`` for ``t = 0``,
    optionally times ``alpha * t + (1 - alpha) * (1 - t)``; the result is the mean over every element.
    ``gamma = 0`` and ``alpha = None`` give exactly ``binary_cross_entropy_with_logits(..., "mean")``.

    Numerically stable for any finite logits: the cross entropy is written as
    ``t * softplus(-x) + (1 - t) * softplus(x)`` (no ``log(sigmoid)`` of a saturated value, no
    cancellation for hard targets), and the modulating factor as ``exp(gamma * logsigmoid(z))`` with
    ``z = x * (1 - 2 t)``, which equals ``(1 - p_t) ** gamma`` for hard targets and never overflows.

    MedficientSAM (5.2) uses the MONAI defaults with weight 20 in :class:`SAMLoss`.

    Args:
        logits: (B, C, *spatial) raw scores, any float dtype.
        targets: same shape, values in [0, 1].
        gamma: focusing exponent (MONAI default 2.0).
        alpha: class balance for positives, in [0, 1]; None (MONAI default) applies none.

    Returns:
        A float32 scalar.
    """
    _check_same_shape(logits, targets)
    with _no_autocast(logits):
        x = logits.float()
        t = targets.float()
        bce = t * F.softplus(-x) + (1.0 - t) * F.softplus(x)
        if gamma != 0:
            log_one_minus_pt = F.logsigmoid(x * (1.0 - 2.0 * t))
            loss = torch.exp(gamma * log_one_minus_pt) * bce
        else:
            loss = bce
        if alpha is not None:
            loss = (alpha * t + (1.0 - alpha) * (1.0 - t)) * loss
        return loss.mean()


def iou_of(logits: Tensor, targets: Tensor, eps: float = 1e-7) -> Tensor:
    """Hard IoU of each predicted mask, the regression target of the IoU head.

    ``IoU = |(logits > 0) & (targets > 0.5)| / (|(logits > 0) | (targets > 0.5)| + eps)`` over all
    non-batch dimensions. ``eps = 1e-7`` in the denominator follows MedficientSAM's IoU loss (5.2), so
    an empty prediction against an empty target scores 0, as upstream. ``logits > 0`` is the same mask
    as LiteMedSAM's ``sigmoid(logits) > 0.5`` (5.4). Not differentiable (a target, not a loss).

    Args:
        logits: (B, ...) raw scores.
        targets: same shape, values in [0, 1].

    Returns:
        float32 tensor of shape (B,).
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
    with torch.no_grad():
        pred = (logits > 0).flatten(1)
        gt = (targets > 0.5).flatten(1)
        intersection = (pred & gt).sum(dim=1).float()
        union = (pred | gt).sum(dim=1).float()
        return intersection / (union + eps)


class SAMLoss(nn.Module):
    """Dice + focal + IoU-head regression, SAM's mask loss as MedficientSAM fine-tunes with it.

    ``loss = dice_weight * dice_loss + focal_weight * focal_loss + iou_weight * MSE(iou_pred, iou_of)``.

    The defaults (1, 20, 1, gamma 2) are MedficientSAM's fine-tuning recipe (upstream 5.2), computed there
    at 512 x 512. LiteMedSAM's recipe (5.4: Dice + BCE + IoU MSE, each 1, at 256) is
    ``SAMLoss(focal_weight=1.0, focal_gamma=0.0)``.

    ``forward(logits, iou_pred, targets)``:
        logits: (N, 1, H, W) mask logits, already upsampled by the caller to the targets' size.
        iou_pred: (N, 1) (or (N,)) predicted IoU.
        targets: (N, 1, H, W) binary masks in {0, 1}.

    Returns a dict of float32 scalars: ``"loss"`` (the weighted total, to backpropagate) and the
    unweighted components ``"dice"``, ``"focal"`` and ``"iou"``. The IoU target is
    ``iou_of(logits, targets)`` and carries no gradient; the IoU term's gradient flows into ``iou_pred``.
    """

    def __init__(self, dice_weight: float = 1.0, focal_weight: float = 20.0, iou_weight: float = 1.0,
                 focal_gamma: float = 2.0) -> None:
        super().__init__()
        self.dice_weight = float(dice_weight)
        self.focal_weight = float(focal_weight)
        self.iou_weight = float(iou_weight)
        self.focal_gamma = float(focal_gamma)

    def forward(self, logits: Tensor, iou_pred: Tensor, targets: Tensor) -> dict[str, Tensor]:
        _check_same_shape(logits, targets)
        n = logits.shape[0]
        if iou_pred.numel() != n:
            raise ValueError(f"iou_pred {tuple(iou_pred.shape)} does not hold one value per mask ({n})")
        dice = dice_loss(logits, targets)
        focal = focal_loss(logits, targets, gamma=self.focal_gamma)
        with _no_autocast(iou_pred):
            iou_target = iou_of(logits, targets).detach()
            iou = F.mse_loss(iou_pred.float().reshape(n), iou_target)
            total = self.dice_weight * dice + self.focal_weight * focal + self.iou_weight * iou
        return {"loss": total, "dice": dice, "focal": focal, "iou": iou}

    def extra_repr(self) -> str:
        return (f"dice_weight={self.dice_weight}, focal_weight={self.focal_weight}, "
                f"iou_weight={self.iou_weight}, focal_gamma={self.focal_gamma}")
