"""Command line: ``harness run | score | leaderboard | plugins | train``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness import __version__
from harness.pluginmanager import PluginError, UnknownSegmenterError
from harness.results import StoreLockedError

DEMO_DIR = Path(__file__).resolve().parent / "demo"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _weights_arg(values: list[str]) -> dict[str, Path]:
    weights: dict[str, Path] = {}
    for item in values:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"harness: --weights expects NAME=PATH, got '{item}'")
        weights[name.strip()] = Path(path).expanduser()
    return weights


def cmd_run(args: argparse.Namespace) -> int:
    from harness.runner import RunConfig, run
    from leaderboard import write_leaderboard

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise SystemExit("harness run: --models needs at least one name")
    weights = _weights_arg(args.weights)
    for name, path in weights.items():
        if not path.is_file():
            raise SystemExit(f"harness run: --weights {name}={path}: no such file")
    weights_dir = Path(args.weights_dir).expanduser() if args.weights_dir else None
    if weights_dir is not None and not weights_dir.is_dir():
        raise SystemExit(f"harness run: --weights-dir {weights_dir}: no such folder")
    config = RunConfig(
        models=models,
        data_dir=Path(args.data),
        out_dir=Path(args.out),
        limit=args.limit,
        weights=weights,
        weights_dir=weights_dir,
        allow_pickle=args.allow_pickle,
        threads=args.threads,
        path=args.path,
        precision=args.precision,
        backend=args.backend,
        retry_errors=args.retry_errors,
        progress=not args.no_progress,
    )
    report = run(config)
    board = write_leaderboard(config.out_dir, reported=not args.no_published)
    print(board.read_text())
    print(
        f"{report.done} cases done, {report.errors} errors, {report.skipped} already finished; "
        f"results in {config.out_dir / 'results.jsonl'}, leaderboard in {board}"
    )
    for name, message in report.failed_models.items():
        print(f"{name}: not run: {message}", file=sys.stderr)
    return 0 if not report.failed_models else 1


def cmd_score(args: argparse.Namespace) -> int:
    from harness.scoring import score_dirs

    frame = score_dirs(Path(args.segs), Path(args.gts), workers=args.workers, imgs_dir=args.imgs)
    if args.output:
        frame.to_csv(args.output, index=False, float_format="%.17g")
        print(f"wrote {len(frame)} rows to {args.output}")
    else:
        frame.to_csv(sys.stdout, index=False, float_format="%.17g")
    errors = frame["error"].astype(bool).sum() if "error" in frame else 0
    if errors:
        print(f"{errors} case(s) could not be scored (see the error column)", file=sys.stderr)
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from leaderboard import write_leaderboard

    out = Path(args.out_dir)
    if not (out / "results.jsonl").is_file():
        raise SystemExit(f"harness leaderboard: {out}/results.jsonl not found")
    target = write_leaderboard(out, args.output, reported=not args.no_published)
    print(target.read_text())
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from harness.pluginmanager import HarnessPlugins

    plugins = HarnessPlugins()
    specs = plugins.segmenters()
    for info in plugins.plugins():
        print(f"{info.name}  {info.distribution} {info.version}  ({info.module})")
        for seg in info.segmenters:
            spec = specs[seg]
            res = f"{spec.resolution}px" if spec.resolution else "-"
            print(f"    {seg:<12} {spec.title}  [{spec.family}, {res}]  {spec.reference}")
    for message in plugins.failed.values():
        print(f"FAILED: {message}")
    return 0 if not plugins.failed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness",
        description="Evaluate and benchmark box-prompted medical image segmenters on challenge npz cases.",
    )
    parser.add_argument("--version", action="version", version=f"medsam-harness {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="segment, time and score cases with one or more models (resumable)",
                       description="Run models over a data folder; results go to OUT/results.jsonl as each case "
                                   "finishes, segs to OUT/segs/<model>/, the leaderboard to OUT/leaderboard.md. "
                                   "Running the same command again skips finished (model, case) pairs.")
    p.add_argument("--models", required=True, help="comma-separated segmenter names (see `harness plugins`)")
    p.add_argument("--data", default=str(DEMO_DIR),
                   help="folder with imgs/*.npz and optionally gts/*.npz (default: the bundled demo set)")
    p.add_argument("--out", default="results", help="output folder (default: ./results)")
    p.add_argument("--limit", type=_positive_int, default=None,
                   help="at most N cases, taken round-robin over modalities (for quick checks)")
    p.add_argument("--weights", action="extend", nargs="+", default=[], metavar="NAME=PATH",
                   help="weights file per model, e.g. --weights medsam=medsam_vit_b.pth l0=best.ckpt "
                        "(state_dict, medficientsam Lightning .ckpt or medsam-harness weights); a name "
                        "not in --models supplies a part (medsam=PATH completes a distilled student); "
                        "default: the model's bundled weights or --weights-dir")
    p.add_argument("--weights-dir", default=None, metavar="DIR",
                   help="folder to look up weights in: NAME.pt|.pth|.ckpt, NAME/model.pt or the upstream "
                        "file names (medsam_vit_b.pth, finetuned-l0-augmented/best.ckpt, ...); "
                        "default: $HARNESS_WEIGHTS_DIR")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load whole-module pickles (medficientsam's model.pth); this runs code "
                        "from the file: only for files you trust")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads to pin (default: all available)")
    p.add_argument("--path", choices=("faithful", "fast"), default="faithful",
                   help="execution path of the torch segmenters: faithful (the upstream call pattern, default) "
                        "or fast (3D slices encoded once per case in batches and cached, 2D boxes decoded "
                        "in one call; same masks within the reference bars)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="numeric precision of the torch segmenters' image encoder: fp32 (default) or bf16 "
                        "(needs a CPU with AMX or AVX512-BF16, detected at run time, or a GPU)")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "openvino"), default="torch",
                   help="what executes the encoder and decoder: torch (default), or an exported graph "
                        "run by onnxruntime or openvino (exported once per weights file, cached)")
    p.add_argument("--retry-errors", action="store_true", help="run again the cases recorded as errors")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-published", action="store_true",
                   help="leave the published reference rows out of the leaderboard")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("score", help="challenge DSC/NSD of a segs folder against a gts folder",
                       description="Drop-in for the challenge's compute_metrics.py: one CSV row per gts file with "
                                   "case, dsc, nsd at full precision, plus modality and error.")
    p.add_argument("--segs", required=True, help="folder of <case>.npz files with key 'segs'")
    p.add_argument("--gts", required=True, help="folder of <case>.npz files with key 'gts' (and 'spacing' for 3D)")
    p.add_argument("--imgs", help="folder of the input cases, for the 3D spacing of gts files that lack it")
    p.add_argument("-o", "--output", help="CSV file to write (default: stdout)")
    p.add_argument("--workers", type=_positive_int, default=1, help="processes to score with")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("leaderboard", help="render the markdown leaderboard of a run folder")
    p.add_argument("out_dir", help="a `harness run` output folder")
    p.add_argument("-o", "--output", help="markdown file to write (default: OUT_DIR/leaderboard.md)")
    p.add_argument("--no-published", action="store_true",
                   help="leave the published reference rows (marked '(published)') out")
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("plugins", help="list the loaded plugins, their versions and segmenters")
    p.set_defaults(func=cmd_plugins)

    from training.cli import add_parsers as add_train_parsers  # argparse only: torch loads when training starts

    add_train_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        hint = ("checkpoints are kept; add --resume to continue" if args.command == "train"
                else "finished cases are kept, run the same command again to resume")
        print(f"interrupted; {hint}", file=sys.stderr)
        return 130
    except (UnknownSegmenterError, PluginError, StoreLockedError, FileNotFoundError) as exc:
        print(f"harness {args.command}: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        if args.command != "train":  # bad settings; elsewhere a ValueError is a bug worth its traceback
            raise
        print(f"harness train: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
