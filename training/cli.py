"""``harness train distill | finetune``: the command line of the training package.

Examples (see the README, section Training)::

    harness train distill --student l0 --data DATA --out runs/distill-l0 \\
        --steps 200 --batch-size 4 --set lr=1e-3
    harness train finetune --model l0 --init runs/distill-l0/model.pt --data DIR --out runs/ft-l0
    torchrun --nproc-per-node 4 -m training.cli distill --student l1 --teacher medsam=medsam_vit_b.pth ...

Defaults come from the upstream preset of the task and model (``--preset`` picks another); the
named flags and ``--set KEY=VALUE`` override any field of :class:`training.config.TrainConfig`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import PRESETS, TrainConfig, preset


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` with its ``distill`` / ``finetune`` subcommands to the harness CLI."""
    train = sub.add_parser("train", help="distil or fine-tune MedficientSAM-L0/L1/L2 (resumable; torchrun-ready)",
                           description="Train MedficientSAM models with the upstream recipes (hieplpvip/medficientsam, configs/experiment/). "
                                       "Writes OUT/checkpoints/, OUT/log.csv and OUT/model.pt, which "
                                       "`harness run --models lX --weights lX=OUT/model.pt` loads.")
    tsub = train.add_subparsers(dest="train_command", required=True)

    d = tsub.add_parser("distill", help="distil a student encoder from a frozen teacher encoder (MSE on embeddings)")
    d.add_argument("--student", default="l0", choices=("l0", "l1", "l2"), help="student architecture (default l0)")
    d.add_argument("--teacher", default="litemedsam", metavar="NAME[=PATH]",
                   help="teacher encoder: litemedsam (bundled weights, 256 px; the default) or medsam=PATH "
                        "(MedSAM ViT-B at 1024, upstream's teacher)")
    _common(d)
    d.set_defaults(func=_run, task="distill")

    f = tsub.add_parser("finetune", help="fine-tune the whole model on box prompts (Dice + focal + IoU loss)")
    f.add_argument("--model", default="l0", choices=("l0", "l1", "l2"), help="architecture (default l0)")
    f.add_argument("--init", required=True, help="starting weights: a distilled student (OUT/model.pt of distill, "
                                                 "a medficientsam student_encoder .ckpt) or full l0-l2 weights")
    f.add_argument("--decoder-from", default=None, metavar="NAME[=PATH]",
                   help="prompt encoder + mask decoder donor for an encoder-only --init: medsam=PATH or litemedsam "
                        "(default: the teacher recorded in --init, else medsam)")
    f.add_argument("--no-augment", action="store_true",
                   help="upstream's 'unaugmented' recipe: flips only, no shift-scale-rotate")
    _common(f)
    f.set_defaults(func=_run, task="finetune")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", required=True, metavar="DIR",
                   help="training data folders: challenge layout (train_npz/<Modality>/**/*.npz with imgs+gts) "
                        "or evaluation layout (imgs/ + gts/)")
    p.add_argument("--out", required=True, help="output folder (checkpoints, log.csv, model.pt)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="DIR",
                   help="leave out the cases found in these folders (e.g. the evaluation set: harness/demo)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from this preset (default: the task's upstream one)")
    p.add_argument("--steps", type=int, help="optimiser steps to run in total")
    p.add_argument("--batch-size", type=int, help="items per step and process")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), help="auto: bf16 autocast where supported")
    p.add_argument("--balanced", action="store_true", help="modality-balanced sampling (upstream: uniform over items)")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda:0, ...")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting, e.g. --set grad_accum=4 --set ckpt_every=500")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The preset for the task and model, then the named flags, then ``--set``."""
    model = args.student if args.task == "distill" else args.model
    cfg = preset(args.preset) if args.preset else preset(f"{args.task}_{model}")
    if cfg.task != args.task:
        raise ValueError(f"preset {args.preset} is a {cfg.task} preset, not {args.task}")
    changes = {"model": model}
    for flag, field_name in (("steps", "steps"), ("batch_size", "batch_size"), ("lr", "lr"),
                             ("precision", "precision")):
        if getattr(args, flag) is not None:
            changes[field_name] = getattr(args, flag)
    if args.balanced:
        changes["balanced"] = True
    if args.task == "distill":
        changes["teacher"] = args.teacher
    else:
        changes["init"] = args.init
        if args.decoder_from:
            changes["decoder_from"] = args.decoder_from
        if args.no_augment:
            changes["augment"] = "flips"
    return cfg.override(**changes).override_from_strings(args.set)


def _run(args: argparse.Namespace) -> int:
    from .run import train

    cfg = build_config(args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    path = train(cfg, [Path(d) for d in args.data], Path(args.out), resume=args.resume, device=args.device,
                 progress=not args.no_progress, exclude=[Path(d) for d in args.exclude])
    print(f"weights: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m training.cli`` (what torchrun launches)."""
    parser = argparse.ArgumentParser(prog="python -m training.cli", description="harness train, for torchrun")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(argv if argv is not None else sys.argv[1:])])
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"harness train: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
