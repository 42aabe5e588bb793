"""Putting a training run together: distributed set-up, data index, task, trainer."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from harness.atomic import atomic_writer

from .config import TrainConfig
from .loop import Trainer, init_distributed


def select_items(items: list, cfg: TrainConfig) -> list:
    """Upstream distillation samples ``limit_items`` items once (seed 42) from the whole index."""
    if cfg.limit_items is None or cfg.limit_items >= len(items):
        return items
    chosen = np.random.default_rng(cfg.seed).choice(len(items), size=cfg.limit_items, replace=False)
    return [items[i] for i in sorted(chosen)]


def exclude_cases(items: list, folders: list[Path]) -> list:
    """Drop items whose case file name appears in any of ``folders`` (``imgs/`` or the folder itself):
    keeps evaluation cases out of training."""
    names: set[str] = set()
    for folder in folders:
        base = folder / "imgs" if (folder / "imgs").is_dir() else folder
        if not base.is_dir():
            raise FileNotFoundError(f"--exclude folder not found: {folder}")
        names.update(p.name for p in base.glob("*.npz"))
    return [item for item in items if Path(item.path).name not in names]


def train(cfg: TrainConfig, data: list[Path], out: Path, resume: bool = False, device: str = "auto",
          progress: bool = True, log=print, exclude: list[Path] | None = None) -> Path:
    """Run one training task end to end and return the final weights file (``OUT/model.pt``).

    ``exclude``: folders of cases (e.g. an evaluation set) whose files are left out of training.
    """
    from .data import build_index, modality_weights
    from .tasks import DistillTask, FinetuneTask

    info, dev = init_distributed(device)
    say = log if info.is_main else (lambda _msg: None)
    try:
        for folder in data:
            if not folder.is_dir():
                raise FileNotFoundError(f"training data folder not found: {folder}")
        items = build_index(data, log=say)
        if exclude:
            before = len(items)
            items = exclude_cases(items, exclude)
            say(f"excluded {before - len(items)} items of the cases in {', '.join(map(str, exclude))}")
        items = select_items(items, cfg)
        if not items:
            raise ValueError(f"no training items (2D images or 3D slices with foreground) in {', '.join(map(str, data))}")
        torch.manual_seed(cfg.seed)  # the student's initial weights: the same for every run of this config
        task = (DistillTask if cfg.task == "distill" else FinetuneTask)(cfg, items, log=say)
        weights = modality_weights(items) if cfg.balanced else None
        trainer = Trainer(cfg, task, out, info, dev, log=say, progress=progress, sampler_weights=weights)
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            with atomic_writer(out / "config.json", "w") as fh:
                json.dump({**trainer.cfg.to_dict(), "data": [str(d) for d in data], "items": len(items),
                           "world_size": info.world_size, "device": str(dev), "bf16": trainer.bf16}, fh, indent=2)
        return trainer.train(resume=resume)
    finally:
        if info.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
