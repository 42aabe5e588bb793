"""training.memory: the batch is fitted to the machine's memory before the first step (issue 17, item 6)."""
from __future__ import annotations

import json
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch import nn

from training.config import TrainConfig, preset
from training.memory import (HEADROOM, PREFETCH, WORKER_MB, MemoryFitError, StepMemory, choose_batch,
                             fit_to_memory, measure_step)


def _need(peak=1000.0, per_item=500.0, optimizer=100.0, item=10.0, workers=0) -> StepMemory:
    return StepMemory(peak_batch1_mb=peak, per_item_mb=per_item, optimizer_mb=optimizer, item_data_mb=item,
                      workers=workers)


def test_need_adds_step_optimizer_workers_and_batches_in_flight():
    need = _need(workers=2)
    # batch 4: step 1000 + 3 x 500, optimiser 100, two workers, 2 workers x PREFETCH x 4 items x 10 MB
    assert need.need_mb(4) == pytest.approx(1000 + 1500 + 100 + 2 * WORKER_MB + 2 * PREFETCH * 4 * 10)


def test_a_batch_that_fits_is_kept():
    cfg = TrainConfig(batch_size=8, grad_accum=1)
    free = _need(workers=0).need_mb(8) / (1 - HEADROOM) + 1
    assert choose_batch(cfg, _need(workers=0), free) is cfg


def test_a_batch_that_does_not_fit_is_split_keeping_the_effective_batch():
    cfg = TrainConfig(batch_size=32, grad_accum=1)
    need = _need(workers=0)  # need(b) = 600 + 500 b
    free = need.need_mb(6) / (1 - HEADROOM)  # room for 6 items: the largest divisor of 32 that fits is 4
    fitted = choose_batch(cfg, need, free)
    assert (fitted.batch_size, fitted.grad_accum) == (4, 8)
    assert fitted.batch_size * fitted.grad_accum == 32
    assert fitted.lr == cfg.lr and fitted.steps == cfg.steps


def test_accumulation_already_configured_is_kept_in_the_effective_batch():
    cfg = TrainConfig(batch_size=6, grad_accum=2)  # effective 12
    need = _need(workers=0)
    fitted = choose_batch(cfg, need, need.need_mb(3) / (1 - HEADROOM))
    assert (fitted.batch_size, fitted.grad_accum) == (3, 4)


def test_not_even_batch_one_fits_names_the_figures_and_flags():
    cfg = TrainConfig(batch_size=4, num_workers=2)
    need = _need(workers=2)
    with pytest.raises(MemoryFitError) as err:
        choose_batch(cfg, need, need.need_mb(1) / 2)
    text = str(err.value)
    assert f"{need.need_mb(1):,.0f} MB" in text and "num_workers=0" in text and "fit_memory=false" in text


class _Noisy:
    """Images drawn from the global generator, as augmentations draw."""

    def __init__(self, items: int):
        self.items = items

    def __len__(self):
        return self.items

    def __getitem__(self, i):
        return {"image": torch.rand(3, 256, 256)}


class _ConvTask:
    """A task whose activations grow with the batch: a 3x3 conv stack on 3 x 256 x 256 images."""

    def __init__(self, items: int = 4):
        self.dataset = _Noisy(items)
        self.module = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                    nn.Conv2d(32, 32, 3, padding=1))

    def loss(self, module, batch):
        return {"loss": module(batch["image"]).square().mean()}


def _collate(items):
    return {"image": torch.stack([i["image"] for i in items])}


def _autocast(device, enabled):
    return nullcontext()


PROBE = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from test_training_memory import _ConvTask, _collate, _autocast
from training.memory import measure_step

task = _ConvTask()
before = [t.detach().clone() for t in task.module.state_dict().values()]
rng = torch.get_rng_state()
need = measure_step(task, task.module, torch.device("cpu"), False, 0, _collate, lambda b, d: b, _autocast)
print(json.dumps({
    "per_item_mb": need.per_item_mb, "item_data_mb": need.item_data_mb, "optimizer_mb": need.optimizer_mb,
    "params": sum(p.numel() for p in task.module.parameters()),
    "no_grads": all(p.grad is None for p in task.module.parameters()),
    "same_state": all(torch.equal(a, b) for a, b in zip(before, task.module.state_dict().values())),
    "same_rng": torch.equal(rng, torch.get_rng_state()),
}))
"""


def test_the_probe_measures_memory_per_item_and_leaves_no_trace():
    # In a fresh interpreter: memory that earlier tests freed but the allocator kept would hide the growth.
    done = subprocess.run([sys.executable, "-c", PROBE, str(Path(__file__).parent)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    # each item carries two 32 x 256 x 256 float32 activations (8 MB each) kept for backward
    assert got["per_item_mb"] > 8
    assert got["item_data_mb"] == pytest.approx(3 * 256 * 256 * 4 / 2**20)
    assert got["optimizer_mb"] == pytest.approx(2 * got["params"] * 4 / 2**20)
    # no gradients left, weights and BatchNorm's running statistics as they were, the generator where it was
    assert got["no_grads"] and got["same_state"] and got["same_rng"]


def test_fit_to_memory_lowers_the_batch_and_says_so(monkeypatch):
    import training.memory as memory

    task = _ConvTask()
    cfg = TrainConfig(batch_size=4, grad_accum=1, num_workers=0)
    need = _need(peak=500.0, per_item=100.0, optimizer=10.0, workers=0)  # need(b) = 410 + 100 b
    monkeypatch.setattr(memory, "measure_step", lambda *args, **kwargs: need)
    said = []
    fitted = fit_to_memory(cfg, task, task.module, torch.device("cpu"), False, _collate, lambda b, d: b,
                           _autocast, log=said.append, free_mb=need.need_mb(3) / (1 - HEADROOM), local_processes=1)
    assert (fitted.batch_size, fitted.grad_accum) == (2, 2)  # 3 items fit, but 3 does not divide 4
    assert "batch 2 x grad_accum 2" in said[0]


def test_fit_memory_false_and_cuda_devices_keep_the_configuration():
    task = _ConvTask()
    cfg = TrainConfig(batch_size=4, fit_memory=False)
    assert fit_to_memory(cfg, task, task.module, torch.device("cpu"), False, _collate, lambda b, d: b,
                         _autocast, free_mb=1.0) is cfg
    cfg = TrainConfig(batch_size=4)
    assert fit_to_memory(cfg, task, task.module, torch.device("meta"), False, _collate, lambda b, d: b,
                         _autocast, free_mb=1.0) is cfg


def test_presets_fit_memory_by_default():
    assert preset("finetune_l0").fit_memory and preset("distill_l0").fit_memory


def test_the_trainer_trains_with_the_fitted_batch(monkeypatch, tmp_path):
    """Trainer fits the batch before its first step: the micro-batches it draws have the fitted size, the
    sampler still advances by the effective batch, and the saved configuration says what ran."""
    import training.memory as memory
    from training.loop import DistInfo, Trainer

    task = _ConvTask(items=8)
    task.num_items = len(task.dataset)
    need = _need(peak=500.0, per_item=100.0, optimizer=10.0, workers=0)  # the probe's figures (measured above)
    probed = []
    monkeypatch.setattr(memory, "measure_step", lambda *args, **kwargs: probed.append(args) or need)
    monkeypatch.setattr(memory, "available_mb", lambda: need.need_mb(3) / (1 - HEADROOM))
    said = []
    cfg = TrainConfig(batch_size=4, grad_accum=1, num_workers=0, steps=1, precision="fp32", schedule="constant")
    trainer = Trainer(cfg, task, tmp_path, DistInfo(), torch.device("cpu"), log=said.append, progress=False)
    assert len(probed) == 1 and (trainer.cfg.batch_size, trainer.cfg.grad_accum) == (2, 2)
    assert any("batch 2 x grad_accum 2" in line for line in said)
    seen = []
    loss = task.loss
    task.loss = lambda module, batch: (seen.append(batch["image"].shape[0]), loss(module, batch))[1]
    task.export = lambda module, path: path
    trainer.train()
    assert seen == [2, 2]  # one step of 4 items in two micro-batches
    assert trainer.sampler.state_dict() == {"epoch": 0, "position": 4}  # advanced by the effective batch
