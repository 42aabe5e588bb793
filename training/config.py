"""Training configurations: one dataclass, and the upstream runs as named presets.

Every field can be overridden from the command line (``harness train ... --set lr=1e-4`` or the
named flags). The presets reproduce medficientsam's configs (hieplpvip/medficientsam, ``configs/experiment/``):

=========================  ==================================================================
preset                     upstream
=========================  ==================================================================
``distill_l0/l1/l2``       ``configs/experiment/distill_l{0,1,2}_no_extracted.yaml``: MSE between
                           student (512) and frozen teacher embeddings; AdamW lr 0.075, wd 5e-4;
                           ExponentialLR(0.5) per epoch of 50k steps; 400k steps of batch 8;
                           flips only; 400k sampled items; clip 0.5; bf16-mixed
``finetune_l0/l1/l2``      ``finetune_l{0,1,2}.yaml``: Dice + 20 Focal + IoU-MSE at 512, 5 masks
                           per image, box jitter U{0..5}; flips + ShiftScaleRotate; AdamW lr 2e-6
                           (wd 0.01); cosine T_max 345k steps; batch 32; clip 0.5; bf16-mixed
``finetune_l*_unaugmented``  the same with flips only (upstream's "unaugmented" still flips)
=========================  ==================================================================

Where a default here differs from upstream, the field's comment says why: the distillation
teacher defaults to the bundled LiteMedSAM (MedSAM's weights are not redistributable), and data
loading uses fewer workers by default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields, replace
from typing import Any, Optional


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``steps`` counts optimiser steps; a step sees ``batch_size * grad_accum``
    items per process."""

    task: str = "distill"  # "distill" | "finetune"
    model: str = "l0"  # student / model architecture: "l0" | "l1" | "l2"
    # --- data
    augment: str = "flips"  # "full" (flips + shift-scale-rotate) | "flips" | "none"
    balanced: bool = False  # modality-balanced sampling (upstream: uniform over items, CT dominates)
    limit_items: Optional[int] = None  # sample this many items once (upstream distillation: 400000)
    num_workers: int = 2  # upstream 8 (distill) / 32 (fine-tune): laptop-sized default
    # --- optimisation
    steps: int = 400_000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 0.075
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 0.5
    schedule: str = "exponential"  # "exponential" (gamma per epoch) | "cosine" (per step) | "constant"
    gamma: float = 0.5
    steps_per_epoch: int = 50_000  # epoch length for the exponential schedule (upstream: 400k items / 8)
    t_max: int = 345_000  # cosine period in steps
    precision: str = "auto"  # "auto" (bf16 autocast where supported) | "bf16" | "fp32"
    seed: int = 42
    # --- distillation
    teacher: str = "litemedsam"  # upstream: MedSAM ViT-B at 1024 (pass --teacher medsam=PATH)
    teacher_weights: Optional[str] = None
    # --- fine-tuning
    init: Optional[str] = None  # the distilled student (or any l0-l2 weights) to start from
    decoder_from: Optional[str] = None  # "medsam" | "litemedsam": prompt encoder + decoder donor
    decoder_weights: Optional[str] = None
    mask_num: int = 5
    box_jitter: int = 5
    dice_weight: float = 1.0
    focal_weight: float = 20.0
    iou_weight: float = 1.0
    # --- bookkeeping
    max_minutes: Optional[float] = None  # stop (checkpoint + model.pt) after this much training time
    log_every: int = 10
    ckpt_every: int = 10_000
    keep_checkpoints: int = 3
    fit_memory: bool = True  # on a CPU, lower the batch (raising grad_accum) when a step would not fit (training/memory.py)

    def __post_init__(self) -> None:
        choices = {"task": ("distill", "finetune"), "model": ("l0", "l1", "l2"),
                   "augment": ("full", "flips", "none"), "schedule": ("exponential", "cosine", "constant"),
                   "precision": ("auto", "bf16", "fp32")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {allowed}")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every", "mask_num"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def override(self, **changes: Any) -> "TrainConfig":
        """A copy with ``changes`` applied; unknown names raise ValueError listing the fields."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return replace(self, **changes)

    def override_from_strings(self, assignments: list[str]) -> "TrainConfig":
        """Apply ``key=value`` strings (``--set lr=1e-4``), converting to each field's type."""
        types = {f.name: f.type for f in fields(self)}
        changes: dict[str, Any] = {}
        for item in assignments:
            key, sep, text = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in types:
                raise ValueError(f"--set expects KEY=VALUE with KEY one of {', '.join(sorted(types))}; got {item!r}")
            changes[key] = _parse(text.strip(), getattr(self, key))
        return self.override(**changes)


def _parse(text: str, current: Any) -> Any:
    if text.lower() in ("none", "null"):
        return None
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected a boolean, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if isinstance(current, int):
        return int(float(text)) if "e" in text.lower() else int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, tuple):
        return tuple(float(v) for v in text.split(","))
    if current is None:  # Optional[...] fields: keep numbers numeric
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
    return text


_DISTILL = TrainConfig(
    task="distill", augment="flips", limit_items=400_000, steps=400_000, batch_size=8, lr=0.075,
    weight_decay=5e-4, grad_clip=0.5, schedule="exponential", gamma=0.5, steps_per_epoch=50_000,
    precision="auto", ckpt_every=10_000,
)
_FINETUNE = TrainConfig(
    task="finetune", augment="full", steps=345_000, batch_size=32, lr=2e-6, weight_decay=0.01,
    grad_clip=0.5, schedule="cosine", t_max=345_000, precision="auto", mask_num=5, box_jitter=5,
    ckpt_every=10_000, decoder_from=None,
)

PRESETS: dict[str, TrainConfig] = {}
for _variant in ("l0", "l1", "l2"):
    PRESETS[f"distill_{_variant}"] = _DISTILL.override(model=_variant)
    PRESETS[f"finetune_{_variant}"] = _FINETUNE.override(model=_variant)
    PRESETS[f"finetune_{_variant}_unaugmented"] = _FINETUNE.override(model=_variant, augment="flips")


def preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None


__all__ = ["PRESETS", "TrainConfig", "preset"]
