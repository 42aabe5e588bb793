"""Embedding MSE of a distilled student against its teacher on held-out cases.

    python bench/distill_mse.py --student OUT/model.pt [--data harness/demo] [--max-items 40]
    python bench/distill_mse.py --init l0 --seed 42     # the untrained student training starts from

For every 2D image and every foreground 3D slice of the evaluation cases (no augmentation), the
student sees the 512 px letterbox and the teacher its own transform (LiteMedSAM: 256 px), as in
``harness train distill``; prints the mean MSE over the items and per modality.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.builders import build_efficientvit_encoder  # noqa: E402
from models.weights.checkpoints import read_checkpoint  # noqa: E402
from training.data import DistillDataset, build_index  # noqa: E402
from training.tasks import TEACHER_TRANSFORMS, _weights_for, load_full_model, resolve_teacher  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--student", help="a distillation model.pt (encoder-only weights)")
    source.add_argument("--init", choices=("l0", "l1", "l2"), help="the untrained student (seeded like training)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--teacher", default=None, help="litemedsam or medsam=PATH (default: the one the student names)")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "harness" / "demo"))
    parser.add_argument("--max-items", type=int, default=40, help="evenly spaced items, at most this many")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    if args.student:
        ckpt = read_checkpoint(args.student)
        variant = str(ckpt.meta.get("model", "l0"))
        student = build_efficientvit_encoder(variant)
        student.load_state_dict({k[len("image_encoder."):]: v for k, v in ckpt.state.items()}, strict=True)
        teacher_spec = args.teacher or str(ckpt.meta.get("decoder_from", "litemedsam"))
    else:
        torch.manual_seed(args.seed)
        student = build_efficientvit_encoder(args.init)
        teacher_spec = args.teacher or "litemedsam"
    name, path = resolve_teacher(teacher_spec)
    teacher = load_full_model(name, _weights_for(name, path)).image_encoder.eval()
    student.eval()
    items = build_index([Path(args.data)], log=lambda _m: None)
    picks = np.linspace(0, len(items) - 1, num=min(args.max_items, len(items))).round().astype(int)
    size, resize = TEACHER_TRANSFORMS[name]
    dataset = DistillDataset(items, teacher_size=size, teacher_resize=resize, augment="none")
    per_modality: dict[str, list[float]] = defaultdict(list)
    targets = []
    with torch.inference_mode():
        for i in sorted(set(picks.tolist())):
            sample = dataset[(i, 0)]
            target = teacher(sample["teacher"][None])
            targets.append(target)
            mse = F.mse_loss(student(sample["student"][None]), target).item()
            per_modality[sample["modality"]].append(mse)
    values = [v for vs in per_modality.values() for v in vs]
    stacked = torch.cat(targets)
    constant = F.mse_loss(stacked, stacked.mean(0, keepdim=True).expand_as(stacked)).item()
    print(f"embedding MSE over {len(values)} items of {args.data}: {np.mean(values):.4f} "
          f"(a constant prediction, the teacher's mean embedding over these items: {constant:.4f})")
    for modality, vs in sorted(per_modality.items()):
        print(f"  {modality}: {np.mean(vs):.4f} ({len(vs)} items)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
