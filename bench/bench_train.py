"""Training throughput of L0 distillation (images/s), measured side by side in one run.

For each device (CPU; CUDA when present) and precision (fp32; bf16 autocast where the device
supports it), time full optimiser steps of the distillation task as ``harness train distill``
runs them: the L0 student forward + backward at 512, the frozen teacher's forward, AdamW, grad
clipping. Inputs are real-sized synthetic batches, so data loading is excluded (the loader runs
in worker processes during training). Prints a markdown table with the bf16 / fp32 ratio.

    python bench/bench_train.py [--teacher litemedsam] [--batch-size 4] [--steps 5] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.builders import build_efficientvit_encoder  # noqa: E402
from models.hardware import cpu_bf16_support  # noqa: E402
from training.loop import autocast  # noqa: E402
from training.tasks import TEACHER_TRANSFORMS, load_full_model, _weights_for  # noqa: E402


def measure(device: torch.device, bf16: bool, teacher_name: str, batch: int, steps: int, warmup: int = 1) -> float:
    torch.manual_seed(0)
    student = build_efficientvit_encoder("l0").to(device).train()
    teacher = load_full_model(teacher_name, _weights_for(teacher_name, None)).image_encoder.to(device).eval()
    teacher.requires_grad_(False)
    size = TEACHER_TRANSFORMS[teacher_name][0]
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    x_student = torch.rand(batch, 3, 512, 512, device=device)
    x_teacher = torch.rand(batch, 3, size, size, device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, bf16):
            with torch.no_grad():
                target = teacher(x_teacher)
            loss = F.mse_loss(student(x_student).float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 0.5)
        optimizer.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="litemedsam", choices=sorted(TEACHER_TRANSFORMS))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gpu-batch-size", type=int, default=16)
    parser.add_argument("--gpu-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [(torch.device("cpu"), False, args.batch_size, args.steps)]
    if cpu_bf16_support():
        runs.append((torch.device("cpu"), True, args.batch_size, args.steps))
    if torch.cuda.is_available():
        runs.append((torch.device("cuda"), False, args.gpu_batch_size, args.gpu_steps))
        if torch.cuda.is_bf16_supported():
            runs.append((torch.device("cuda"), True, args.gpu_batch_size, args.gpu_steps))
    results = []
    for device, bf16, batch, steps in runs:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        ips = measure(device, bf16, args.teacher, batch, steps)
        results.append({"device": name, "precision": "bf16" if bf16 else "fp32", "batch": batch, "images_per_s": ips})
        print(f"{name} {'bf16' if bf16 else 'fp32'} batch {batch}: {ips:.2f} images/s", file=sys.stderr)
    print(f"\nL0 distillation from {args.teacher} (student 512 px), optimiser steps on synthetic batches\n")
    print("| device | precision | batch | images/s | vs fp32 on the same device |")
    print("|---|---|---|---|---|")
    for r in results:
        base = next(x for x in results if x["device"] == r["device"] and x["precision"] == "fp32")
        print(f"| {r['device']} | {r['precision']} | {r['batch']} | {r['images_per_s']:.2f} | "
              f"{r['images_per_s'] / base['images_per_s']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
