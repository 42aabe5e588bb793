"""The training loop: plain PyTorch, step-based, resumable, single process or torchrun.

One :class:`Trainer` runs any :class:`Task` (distillation or fine-tuning, ``training/tasks.py``):

* AdamW, a per-step LR schedule, gradient accumulation and clipping, bf16 autocast where the
  device supports it (on CPUs: AVX512-BF16 or AMX, read from the CPU flags at run time);
* data from a :class:`training.data.ResumableSampler`, whose position is part of the checkpoint,
  and per-item augmentation seeds, so a resumed run sees exactly the batches the uninterrupted
  run would have seen;
* ``OUT/checkpoints/step_NNNNNN.pt`` every ``ckpt_every`` steps and at the end (model, optimiser,
  scheduler, step, sampler position, torch RNG state, config; written atomically, the last
  ``keep_checkpoints`` kept), ``OUT/log.csv`` (one row per ``log_every`` steps), a progress bar
  with loss and throughput, and at the end ``OUT/model.pt``: the weights file ``harness run``
  loads (``--weights l0=OUT/model.pt``);
* under ``torchrun``: DistributedDataParallel, each rank its shard of the sampler, rank 0 alone
  logs and writes files. The same command runs on one CPU.
"""
from __future__ import annotations

import csv
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from harness.atomic import atomic_writer

from models.hardware import cpu_bf16_support

from .config import TrainConfig
from .memory import fit_to_memory

CHECKPOINT_FORMAT = "medsam-harness/train-state"


class Task(Protocol):
    """What the loop needs from a training task."""

    module: nn.Module  # the trainable module (wrapped by DDP under torchrun)
    dataset: Dataset
    num_items: int

    def loss(self, module: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Loss terms for one micro-batch; key ``"loss"`` is optimised, the others are logged."""

    def export(self, module: nn.Module, path: Path) -> Path:
        """Write the final weights file ``harness run`` loads."""


# --------------------------------------------------------------------------- devices
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> tuple[DistInfo, torch.device]:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and pick the device.

    One process without torchrun: rank 0 of 1, no process group. Under torchrun: NCCL on GPUs,
    gloo on CPUs.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device in (None, "auto"):
        device = f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return info, dev


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "fp32":
        return False
    supported = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_bf16_support()
    if precision == "bf16" and not supported:
        raise RuntimeError(f"--precision bf16: {device} has no native bf16 support")
    return supported


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if enabled else nullcontext()


# --------------------------------------------------------------------------- schedule
def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule: exponential decay by ``gamma`` once per ``steps_per_epoch`` (upstream's
    per-epoch ExponentialLR), cosine over ``t_max`` steps, or constant."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.t_max)
    if cfg.schedule == "exponential":
        gamma, period = cfg.gamma, cfg.steps_per_epoch
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: gamma ** (step // period))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


# --------------------------------------------------------------------------- trainer
class Trainer:
    """Runs ``task`` for ``cfg.steps`` optimiser steps, writing into ``out_dir``."""

    def __init__(self, cfg: TrainConfig, task: Task, out_dir: str | os.PathLike, dist_info: DistInfo,
                 device: torch.device, log: Callable[[str], None] = print, progress: bool = True,
                 sampler_weights=None):
        from .data import ResumableSampler

        self.cfg = cfg
        self.task = task
        self.out = Path(out_dir)
        self.dist = dist_info
        self.device = device
        self.log = log if dist_info.is_main else (lambda _msg: None)
        self.progress = progress and dist_info.is_main
        self.bf16 = use_bf16(cfg.precision, device)
        if hasattr(task, "to"):  # frozen parts the task keeps outside the trainable module (a teacher)
            task.to(device)
        module = task.module.to(device)
        # On a CPU, a batch that would not fit in memory is split into grad_accum micro-batches (training/memory.py).
        self.cfg = cfg = fit_to_memory(cfg, task, module, device, self.bf16, _collate, _to_device, autocast,
                                       log=self.log)
        if dist_info.world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        self.module = module
        params = [p for p in task.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.scheduler = make_scheduler(cfg, self.optimizer)
        self.sampler = ResumableSampler(task.num_items, seed=cfg.seed, rank=dist_info.rank,
                                        world_size=dist_info.world_size, weights=sampler_weights)
        self.step = 0

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoint_dir / f"step_{step:06d}.pt"

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.checkpoint_dir.glob("step_*.pt"))
        return found[-1] if found else None

    def save_checkpoint(self) -> Path | None:
        if not self.dist.is_main:
            return None
        path = self.checkpoint_path(self.step)
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "model": self.task.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "config": self.cfg.to_dict(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(path, "wb") as fh:
            torch.save(state, fh)
        for old in sorted(self.checkpoint_dir.glob("step_*.pt"))[: -self.cfg.keep_checkpoints]:
            old.unlink(missing_ok=True)
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything a checkpoint holds; the next step is the one after it."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not a medsam-harness training checkpoint")
        self.task.module.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        self.log(f"resumed from {path} at step {self.step}")

    # ---------------------------------------------------------------- logging
    def _log_row(self, row: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        path = self.out / "log.csv"
        new = not path.exists()
        with path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def _trim_log(self) -> None:
        """On resume, drop log rows after the resumed step (they are about to be redone)."""
        path = self.out / "log.csv"
        if not self.dist.is_main or not path.exists():
            return
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        kept = [r for r in rows if int(r["step"]) <= self.step]
        if len(kept) != len(rows) and rows:
            with atomic_writer(path, "w") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(kept)

    # ---------------------------------------------------------------- the loop
    def _out_of_time(self, deadline: float) -> bool:
        """Rank 0's clock decides for every rank, so all ranks stop after the same step."""
        stop = time.monotonic() >= deadline
        if self.dist.world_size > 1 and math.isfinite(deadline):
            flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
            dist.broadcast(flag, src=0)
            stop = bool(flag.item())
        return stop

    def check_ranks_agree(self) -> None:
        """All ranks must hold identical weights after DDP steps; raise if they do not."""
        local = parameter_checksum(self.task.module).to(self.device)
        gathered = [torch.zeros_like(local) for _ in range(self.dist.world_size)]
        dist.all_gather(gathered, local)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(f"ranks disagree after step {self.step}: {[g.tolist() for g in gathered]}")
        self.log(f"all {self.dist.world_size} ranks hold identical weights after step {self.step}")

    def _batches(self):
        loader = DataLoader(
            self.task.dataset,
            batch_size=self.cfg.batch_size,
            sampler=self.sampler,
            num_workers=self.cfg.num_workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            multiprocessing_context="spawn" if self.cfg.num_workers > 0 and sys.platform != "win32" else None,
        )
        return iter(loader)

    def train(self, resume: bool = False) -> Path:
        """Run to ``cfg.steps``; with ``resume``, continue from the latest checkpoint in ``out_dir``.

        Returns the path of the final weights file (``OUT/model.pt``).
        """
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            latest = self.latest_checkpoint()
            if latest is None:
                self.log(f"no checkpoint in {self.checkpoint_dir}; starting from step 0")
            else:
                self.load_checkpoint(latest)
                self._trim_log()
        cfg = self.cfg
        self.module.train()
        batches = self._batches() if self.step < cfg.steps else None
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.task} {cfg.model}", unit="step",
                       file=sys.stderr, dynamic_ncols=True)
        window_items, window_start = 0, time.perf_counter()
        deadline = time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
        sums: dict[str, float] = {}
        while self.step < cfg.steps:
            if self._out_of_time(deadline):
                self.log(f"time budget of {cfg.max_minutes} min reached at step {self.step}; "
                         "--resume continues from here")
                break
            self.optimizer.zero_grad(set_to_none=True)
            for micro in range(cfg.grad_accum):
                batch = _to_device(next(batches), self.device)
                sync = micro == cfg.grad_accum - 1 or not isinstance(self.module, nn.parallel.DistributedDataParallel)
                with (nullcontext() if sync else self.module.no_sync()):
                    with autocast(self.device, self.bf16):
                        terms = self.task.loss(self.module, batch)
                    (terms["loss"] / cfg.grad_accum).backward()
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach()) / cfg.grad_accum
                window_items += _batch_len(batch)
            if cfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.task.module.parameters(), cfg.grad_clip))
            else:
                grad_norm = math.nan
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            self.sampler.advance(cfg.batch_size * cfg.grad_accum)
            if not math.isfinite(sums.get("loss", 0.0)):
                raise FloatingPointError(f"loss is {sums['loss']} at step {self.step}; lower the learning rate")
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                elapsed = time.perf_counter() - window_start
                steps_in_window = (self.step - 1) % cfg.log_every + 1
                row = {"step": self.step, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                       **{k: v / steps_in_window for k, v in sums.items()},
                       "items_per_s": window_items * self.dist.world_size / max(elapsed, 1e-9),
                       "seconds": elapsed}
                self._log_row(row)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4g}", img_s=f"{row['items_per_s']:.1f}", refresh=False)
                sums, window_items, window_start = {}, 0, time.perf_counter()
            if bar is not None:
                bar.update(1)
            if self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        if self.dist.world_size > 1:
            self.check_ranks_agree()
        final = self.out / "model.pt"
        if self.dist.is_main:
            if not self.checkpoint_path(self.step).is_file():
                self.save_checkpoint()
            self.task.export(self.task.module, final)
            self.log(f"wrote {final} (step {self.step})")
        if self.dist.world_size > 1:
            dist.barrier()
        return final


def parameter_checksum(module: nn.Module) -> torch.Tensor:
    """(sum, sum of squares) of all parameters in float64: equal on ranks that hold equal weights."""
    total = torch.zeros(2, dtype=torch.float64)
    for p in module.parameters():
        data = p.detach().to("cpu", torch.float64)
        total += torch.stack([data.sum(), (data * data).sum()])
    return total


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _batch_len(batch: dict[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    return 0
