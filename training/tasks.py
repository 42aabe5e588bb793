"""The two MedficientSAM training tasks: distillation and fine-tuning (hieplpvip/medficientsam ``src/models/distill_module.py``, ``finetune_module.py``).

* :class:`DistillTask`: the EfficientViT-SAM student encoder (from scratch, 512 px) learns to
  reproduce a frozen teacher's 256 x 64 x 64 image embedding, MSE loss. The teacher is MedSAM's
  ViT-B encoder at 1024 (upstream) or the bundled LiteMedSAM TinyViT at 256 (the default here: its
  weights ship with the project); both emit 256 x 64 x 64, so no adapter is needed. The same
  augmented image is letterboxed once per encoder with that encoder's own inference transform.
  The output is an encoder-only weights file that records its teacher, so ``harness run``
  completes it with the teacher's prompt encoder and mask decoder.
* :class:`FinetuneTask`: the whole model (nothing frozen), initialised from a distilled student
  plus a donor's prompt encoder and mask decoder, trained with Dice + 20 x focal + IoU-MSE at 512
  on ``mask_num`` box prompts per image. The output is a full L0/L1/L2 weights file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.builders import INPUT_SIZE, build_efficientvit_encoder, build_model
from models.weights.checkpoints import Checkpoint, check_state, read_checkpoint, save_harness_checkpoint
from models.weights.zoo import prompt_parts

from .config import TrainConfig
from .losses import SAMLoss

# Each teacher's own inference transform (what its encoder saw in training).
TEACHER_TRANSFORMS = {"litemedsam": (256, "area"), "medsam": (1024, "bilinear_u8")}


def resolve_teacher(spec: str, weights: Optional[str] = None) -> tuple[str, Optional[Path]]:
    """``"litemedsam"`` | ``"medsam=PATH"`` | ``"NAME=PATH"`` -> (name, weights path or None)."""
    name, sep, path = spec.partition("=")
    name = name.strip()
    if name not in TEACHER_TRANSFORMS:
        raise ValueError(f"unknown teacher {name!r}; expected one of {sorted(TEACHER_TRANSFORMS)} (as NAME or NAME=PATH)")
    chosen = path or weights
    return name, Path(chosen).expanduser() if chosen else None


def _weights_for(name: str, path: Optional[Path]) -> Path:
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"{name} weights not found: {path}")
        return path
    if name == "litemedsam":
        from models.weights.checkpoints import default_litemedsam_checkpoint

        return default_litemedsam_checkpoint()
    raise FileNotFoundError(f"the {name} teacher needs its weights: pass {name}=PATH (e.g. medsam=medsam_vit_b.pth)")


def load_full_model(name: str, path: Path) -> nn.Module:
    """A registered model with the weights in ``path`` (any layout models.weights.checkpoints reads)."""
    from models.weights.checkpoints import load_weights

    return load_weights(build_model(name), path).eval()


class DistillTask:
    """MSE between the student's and the frozen teacher's image embeddings."""

    def __init__(self, cfg: TrainConfig, items: list, log=print):
        from .data import DistillDataset

        self.cfg = cfg
        self.teacher_name, teacher_path = resolve_teacher(cfg.teacher, cfg.teacher_weights)
        self.teacher_path = _weights_for(self.teacher_name, teacher_path)
        teacher = load_full_model(self.teacher_name, self.teacher_path)
        self.teacher = teacher.image_encoder.requires_grad_(False).eval()
        self.module = build_efficientvit_encoder(cfg.model)
        size, resize = TEACHER_TRANSFORMS[self.teacher_name]
        self.dataset = DistillDataset(items, student_size=INPUT_SIZE, student_resize="bilinear_u8",
                                      teacher_size=size, teacher_resize=resize, augment=cfg.augment)
        self.num_items = len(items)
        log(f"distill {cfg.model} from {self.teacher_name} ({self.teacher_path}) on {len(items)} items")

    def to(self, device: torch.device) -> "DistillTask":
        self.teacher.to(device)
        return self

    def loss(self, module: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            target = self.teacher(batch["teacher"])
        prediction = module(batch["student"])
        return {"loss": F.mse_loss(prediction.float(), target.float())}

    def export(self, module: nn.Module, path: Path) -> Path:
        """Encoder-only weights, with the teacher recorded for completion at evaluation time."""
        return save_harness_checkpoint(
            path, self.cfg.model, module.state_dict(), component="image_encoder",
            decoder_from=self.teacher_name, decoder_weights=str(self.teacher_path), task="distill",
        )


class FinetuneTask:
    """The full model on box prompts: Dice + focal + IoU-MSE at 512 (upstream SAMLoss)."""

    def __init__(self, cfg: TrainConfig, items: list, log=print):
        from .data import FinetuneDataset

        self.cfg = cfg
        self.model = build_model(cfg.model)
        source = self._initialise(log)
        self.module = BoxPromptBatch(self.model).train()
        self.loss_fn = SAMLoss(cfg.dice_weight, cfg.focal_weight, cfg.iou_weight)
        self.dataset = FinetuneDataset(items, size=INPUT_SIZE, resize="bilinear_u8", mask_num=cfg.mask_num,
                                       box_jitter=cfg.box_jitter, augment=cfg.augment)
        self.num_items = len(items)
        log(f"finetune {cfg.model} from {source} on {len(items)} items")

    def _initialise(self, log) -> str:
        """Encoder from ``cfg.init``; prompt encoder + decoder from the init file when it holds a full
        model, else from the donor (``decoder_from``: the student's teacher by default)."""
        cfg = self.cfg
        if not cfg.init:
            raise ValueError("finetune needs --init: the distilled student (or l0-l2 weights) to start from")
        init: Checkpoint = read_checkpoint(cfg.init)
        state = dict(init.state)
        if init.encoder_only:
            donor, donor_path = resolve_teacher(cfg.decoder_from or str(init.meta.get("decoder_from") or "medsam"),
                                                cfg.decoder_weights)
            if donor_path is None and donor == init.meta.get("decoder_from") and init.meta.get("decoder_weights"):
                donor_path = Path(str(init.meta["decoder_weights"]))
            donor_file = _weights_for(donor, donor_path)
            state.update(prompt_parts(read_checkpoint(donor_file), donor))
            source = f"{init.path} + {donor} prompt encoder/decoder ({donor_file})"
        else:
            source = str(init.path)
        check_state(self.model, Checkpoint(init.path, init.format, state, init.meta), model_name=cfg.model)
        self.model.load_state_dict(state, strict=True)
        return source

    def loss(self, module: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        masks = batch["masks"]
        logits, ious = module(batch["image"], batch["boxes"])  # through DDP when distributed
        logits = F.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
        targets = masks.reshape(-1, 1, *masks.shape[-2:]).float()
        return self.loss_fn(logits, ious.float(), targets)

    def export(self, module: nn.Module, path: Path) -> Path:
        return save_harness_checkpoint(path, self.cfg.model, module.model.state_dict(), component="full",
                                       task="finetune", init=str(self.cfg.init))


class BoxPromptBatch(nn.Module):
    """Training forward of a promptable model: B images, ``mask_num`` boxes each.

    ``forward(images (B, 3, S, S), boxes (B, M, 4))`` -> low-res logits (B * M, 1, 256, 256) and
    IoU predictions (B * M, 1). One module call, so DistributedDataParallel sees the whole step.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.model.image_encoder(images)
        logits, ious = [], []
        for i in range(images.shape[0]):
            low_res, iou = self.model.decode_boxes(embeddings[i : i + 1], boxes[i])
            logits.append(low_res)
            ious.append(iou)
        return torch.cat(logits), torch.cat(ious)
