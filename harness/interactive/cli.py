"""The ``harness convert`` and ``harness clicks`` commands (argparse only; numpy and scipy load when run)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_parsers", "cmd_convert", "cmd_clicks"]

_RULE = ("largest 26-connected error component, its EDT on the 25%-padded bounding box (2x2x2 max-pooled above "
         "6e7 voxels), the seed-42 choice among the maxima, fg where the ground truth has the class, else bg; "
         "no click for a class already perfect (the rule of CVPR25_iter_eval.py, repository "
         "JunMa11/CVPR-MedSegFMCompetition)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``convert`` and ``clicks`` to the harness CLI."""
    p = sub.add_parser(
        "convert", help="turn 2024-format 3D cases into 2025 interactive-protocol inputs plus separate gts",
        description="Read DIR/imgs/*.npz and DIR/gts/*.npz (the 2024 format) and write, for each 3D case, "
                    "OUT/imgs/<name>.npz with imgs, spacing and boxes (one dict per class: z_min, z_max, z_mid "
                    "and the box on the middle slice z_mid, the median of the class's slices, grown by a seeded "
                    "random 0-5 px per side scaled by image size / 256 and clipped; the rule of get_boxes.py, "
                    "repository JunMa11/CVPR-MedSegFMCompetition) and OUT/gts/<name>.npz with gts and spacing. "
                    "2D cases are skipped. Only OUT is written; OUT may not be DIR or hold its imgs/gts. A case "
                    "that cannot be read is reported and the others still convert (exit 1 when any failed).")
    p.add_argument("data", metavar="DIR", help="folder with imgs/*.npz and gts/*.npz (2024 format)")
    p.add_argument("out", metavar="OUT", help="output folder (imgs/ and gts/ are written inside)")
    p.add_argument("--to", required=True, choices=("interactive",),
                   help="target format: interactive (the CVPR 2025 interactive track's inputs)")
    p.add_argument("--seed", type=int, default=None, help="seed of the box perturbation (default 2025, the organisers')")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "clicks", help="print, as JSON, the click per class that the 2025 evaluator would give next",
        description="For a prediction PRED.npz and its ground truth GTS.npz (3D), print as JSON the next "
                    "simulated click of each class, in the order of the sorted unique gts labels: "
                    "{\"label\", \"kind\" (fg/bg), \"z\", \"y\", \"x\"} (array indices) or null when the class "
                    f"is already perfect. The rule: {_RULE}. The prediction is cast to uint8 first, as the "
                    "evaluator does.")
    p.add_argument("--pred", required=True, metavar="PRED.npz", help="npz with the prediction (key --key)")
    p.add_argument("--gts", required=True, metavar="GTS.npz", help="npz with the ground truth (key gts)")
    p.add_argument("--key", default="segs", help="key of the prediction in PRED.npz (default segs; e.g. prev_pred)")
    p.set_defaults(func=cmd_clicks)


def cmd_convert(args: argparse.Namespace) -> int:
    from harness.interactive.convert import BOX_SEED, convert_to_interactive

    try:
        report = convert_to_interactive(Path(args.data), Path(args.out),
                                        seed=BOX_SEED if args.seed is None else args.seed)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"harness convert: {exc}") from None
    for name, error in sorted(report.errors.items()):
        print(f"error: {name}: {error}", file=sys.stderr)
    print(f"converted {len(report.converted)} 3D case(s) into {args.out} (imgs/, gts/); "
          f"skipped {len(report.skipped)} 2D case(s); {len(report.errors)} error(s)")
    return 1 if report.errors else 0


def _load_plain(path: Path, key: str):
    """One non-pickled array of an npz file; SystemExit naming the file and the problem."""
    import numpy as np

    from harness.cases import CaseError
    from harness.interactive.safe_npz import read_pickled_key

    try:
        value = read_pickled_key(path, key)
    except CaseError as exc:
        raise SystemExit(f"harness clicks: {exc}") from None
    if value is None:
        raise SystemExit(f"harness clicks: {path}: missing key '{key}'")
    if value.dtype.hasobject or value.dtype.kind not in "biu":
        raise SystemExit(f"harness clicks: {path}: key '{key}' has dtype {value.dtype}; expected integer labels")
    return np.asarray(value)


def cmd_clicks(args: argparse.Namespace) -> int:
    from harness.interactive.clicks import click_classes, simulate_clicks

    pred = _load_plain(Path(args.pred), args.key)
    gts = _load_plain(Path(args.gts), "gts")
    if pred.shape != gts.shape:
        raise SystemExit(f"harness clicks: {args.pred}: '{args.key}' has shape {pred.shape}, "
                         f"{args.gts}'s gts has {gts.shape}")
    if gts.ndim != 3:
        raise SystemExit(f"harness clicks: {args.gts}: gts has shape {gts.shape}; the interactive protocol is 3D")
    labels = click_classes(gts)
    if not labels:
        raise SystemExit(f"harness clicks: {args.gts}: gts has no class (a single value throughout)")
    clicks = simulate_clicks(pred, gts, labels)
    out = [c.to_dict() if c is not None else None for c in clicks]
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0
