"""Fit a training run's batch to the machine's memory before the first step.

The upstream presets were made for GPUs: fine-tuning takes 32 images of 512 px per step. On a CPU
that batch can need more memory than the machine has, and the kernel's OOM killer then ends the run
with no message. So before the first step on a CPU, :func:`fit_to_memory`

1. measures what a training step needs: one forward and backward pass at batch 1 and one at batch 2
   on the run's own first items, each under :class:`harness.profiling.PeakRSS` (the kernel's peak
   resident set of this process), which gives the step's fixed cost and its cost per item; to that it
   adds AdamW's two moment buffers (twice the trainable parameters' bytes, allocated at the first
   optimiser step), an allowance per data-loading worker (:data:`WORKER_MB`) and the batches the
   workers prepare ahead;
2. compares the configured batch with the memory available now (``MemAvailable``, or the cgroup's
   limit when that is lower), keeping :data:`HEADROOM` of it free;
3. if the batch does not fit, lowers it to the largest divisor of the effective batch
   (``batch_size * grad_accum``) that fits and raises ``grad_accum`` so that the effective batch, and
   with it the learning dynamics and the sampler's position on resume, stays the same; it says so.
   If not even batch 1 fits, it raises :class:`MemoryFitError` with the figures and the flags to use.

``--set fit_memory=false`` turns this off. CUDA runs are left as configured: the CUDA allocator raises
an out-of-memory error that names itself, rather than being killed. The probe's gradients are
discarded and BatchNorm's running statistics and the random generators restored: it changes neither the
weights nor the sampler nor the augmentations that follow.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil
import torch
from torch import nn

from harness.profiling import PeakRSS

from .config import TrainConfig

MB = 1024.0 * 1024.0
WORKER_MB = 400.0
"""Allowance per data-loading worker for its interpreter: a spawned process that has imported torch, numpy,
OpenCV and the augmentations holds 235 MB resident (measured 2026-12-07, Linux, torch 2.13 CPU), plus the
dataset's index it receives. The batches in flight are counted apart (:attr:`StepMemory.item_data_mb`)."""
PREFETCH = 2
"""Batches each worker prepares ahead (the DataLoader's default ``prefetch_factor``)."""
HEADROOM = 0.15
"""Share of the available memory left free for what the probe cannot see (allocator fragmentation, the page
cache the data loading needs, other processes growing)."""


class MemoryFitError(ValueError):
    """The configured training step cannot fit in this machine's memory, even at batch 1."""


@dataclass(frozen=True)
class StepMemory:
    """What one optimiser step of a run needs, in MB (see :func:`measure_step`)."""

    peak_batch1_mb: float  # this process's peak RSS during a step at batch 1 (weights and data included)
    per_item_mb: float  # what each further item of a micro-batch adds
    optimizer_mb: float  # AdamW's moment buffers, allocated at the first step
    item_data_mb: float  # one collated item's tensors (images, masks, boxes)
    workers: int  # data-loading workers

    @property
    def workers_mb(self) -> float:
        return self.workers * WORKER_MB

    def need_mb(self, batch_size: int) -> float:
        """The step's peak at ``batch_size``, the optimiser state, the workers, and the batches they
        prepare ahead (``PREFETCH`` per worker, in shared memory)."""
        in_flight = self.workers * PREFETCH * batch_size * self.item_data_mb
        return (self.peak_batch1_mb + (batch_size - 1) * self.per_item_mb + self.optimizer_mb
                + self.workers_mb + in_flight)


def available_mb() -> float:
    """Memory this process can still take: ``MemAvailable``, or the cgroup (v2) limit minus its usage
    where that is lower."""
    free = psutil.virtual_memory().available / MB
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text().strip())
            free = min(free, (int(limit) - used) / MB)
    except (OSError, ValueError):
        pass
    return max(free, 0.0)


def measure_step(task: Any, module: nn.Module, device: torch.device, bf16: bool, num_workers: int,
                 collate: Callable[[list], dict], to_device: Callable[[dict, torch.device], dict],
                 autocast: Callable[[torch.device, bool], Any]) -> StepMemory:
    """Run a forward and backward pass at batch 1 and at batch 2 on the dataset's first items and measure
    each step's peak RSS. Gradients are discarded afterwards."""
    dataset = task.dataset
    sizes = (1, 2) if len(dataset) >= 2 else (1,)
    peaks = []
    item_mb = 0.0
    was_training = module.training
    # The probe must leave no trace: BatchNorm's running statistics move in a training forward pass, and the
    # dataset's augmentations draw from the random generators.
    buffers = {name: buf.detach().clone() for name, buf in module.named_buffers()}
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    module.train()
    for size in sizes:
        batch = to_device(collate([dataset[i] for i in range(size)]), device)
        if size == 1:
            item_mb = sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor)) / MB
        with PeakRSS() as peak:
            with autocast(device, bf16):
                terms = task.loss(module, batch)
            terms["loss"].backward()
        module.zero_grad(set_to_none=False)  # the gradient buffers stay: training allocates them too
        peaks.append(peak.mb)
        del batch, terms
    for p in module.parameters():
        p.grad = None
    with torch.no_grad():
        for name, buf in module.named_buffers():
            buf.copy_(buffers[name])
    torch.set_rng_state(rng[0])
    np.random.set_state(rng[1])
    random.setstate(rng[2])
    module.train(was_training)
    per_item = max(peaks[1] - peaks[0], 0.0) if len(peaks) == 2 else 0.0
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return StepMemory(peak_batch1_mb=peaks[0], per_item_mb=per_item, optimizer_mb=2 * trainable / MB,
                      item_data_mb=item_mb, workers=num_workers)


def _divisors_descending(n: int) -> list[int]:
    return sorted((d for d in range(1, n + 1) if n % d == 0), reverse=True)


def choose_batch(cfg: TrainConfig, need: StepMemory, free_mb: float) -> TrainConfig:
    """``cfg`` unchanged if its batch fits in ``(1 - HEADROOM) * free_mb``; else the largest batch that
    divides the effective batch and fits, with ``grad_accum`` raised to keep the effective batch.
    Raises :class:`MemoryFitError` when not even batch 1 fits."""
    budget = (1.0 - HEADROOM) * free_mb
    if need.need_mb(cfg.batch_size) <= budget:
        return cfg
    effective = cfg.batch_size * cfg.grad_accum
    for batch in _divisors_descending(effective):
        if batch < cfg.batch_size and need.need_mb(batch) <= budget:
            return replace(cfg, batch_size=batch, grad_accum=effective // batch)
    raise MemoryFitError(
        f"a training step needs about {need.need_mb(1):,.0f} MB even at batch 1 "
        f"({need.peak_batch1_mb:,.0f} MB measured for the step with the model and data loaded, "
        f"{need.optimizer_mb:,.0f} MB of optimiser state, {need.workers_mb:,.0f} MB for "
        f"{cfg.num_workers} data-loading workers), and this machine has {free_mb:,.0f} MB available "
        f"(kept {HEADROOM:.0%} free). Use fewer data-loading workers (--set num_workers=0), a smaller "
        "model, or a machine with more memory; --set fit_memory=false skips this check.")


def fit_to_memory(cfg: TrainConfig, task: Any, module: nn.Module, device: torch.device, bf16: bool,
                  collate, to_device, autocast, log: Callable[[str], None] = print,
                  free_mb: float | None = None, local_processes: int | None = None) -> TrainConfig:
    """The configuration to train with: ``cfg``, or (on a CPU without room for its batch) one with a
    smaller batch and a larger ``grad_accum`` and the same effective batch. ``free_mb`` and
    ``local_processes`` default to :func:`available_mb` and torchrun's ``LOCAL_WORLD_SIZE`` (ranks on
    this machine share its memory)."""
    if not cfg.fit_memory or device.type != "cpu":
        return cfg
    need = measure_step(task, module, device, bf16, cfg.num_workers, collate, to_device, autocast)
    local = local_processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    free = (available_mb() if free_mb is None else free_mb)
    # The probe's own peak is already resident in this process; the other local ranks need theirs too.
    share = free / local + (need.peak_batch1_mb if local > 1 else 0.0)
    fitted = choose_batch(cfg, need, share)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        agreed = torch.tensor([fitted.batch_size])  # every rank trains with the smallest batch any chose
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
        effective = cfg.batch_size * cfg.grad_accum
        fitted = replace(cfg, batch_size=int(agreed), grad_accum=effective // int(agreed))
        if fitted.batch_size == cfg.batch_size:
            fitted = cfg
    if fitted is not cfg:
        log(f"memory: a step at batch {cfg.batch_size} needs about {need.need_mb(cfg.batch_size):,.0f} MB, "
            f"{share:,.0f} MB is available; training with batch {fitted.batch_size} x grad_accum "
            f"{fitted.grad_accum} (the same {fitted.batch_size * fitted.grad_accum} items per step; "
            f"about {need.need_mb(fitted.batch_size):,.0f} MB)")
    else:
        log(f"memory: a step at batch {cfg.batch_size} needs about {need.need_mb(cfg.batch_size):,.0f} MB "
            f"of {share:,.0f} MB available")
    return fitted


__all__ = ["HEADROOM", "WORKER_MB", "MemoryFitError", "StepMemory", "available_mb", "choose_batch",
           "fit_to_memory", "measure_step"]
