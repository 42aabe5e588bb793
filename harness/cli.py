"""Command line: ``harness run | predict | bench | score | leaderboard | compare | rank | plugins | build | export | train``."""
from __future__ import annotations

import argparse
import errno
import signal
import sys
import threading
from pathlib import Path

from harness import __version__
from harness.choices import BACKENDS, DEFAULT_BACKEND, DEFAULT_PATH, DEFAULT_PRECISION, DEFAULT_RUNNER, PATHS, PRECISIONS
from harness.pluginmanager import PluginError, UnknownRunnerError, UnknownSegmenterError
from harness.results import StoreLockedError

DEMO_DIR = Path(__file__).resolve().parent / "demo"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _metrics_arg(text: str) -> tuple[str, ...]:
    """``--metrics``: comma-separated names, as a tuple that always holds dsc and nsd."""
    from harness.metrics import parse_metrics

    try:
        return parse_metrics(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_METRICS_HELP = ("comma-separated metrics, from dsc,nsd,hd95,masd (default dsc,nsd, the challenge's; dsc and nsd "
                 "are always computed): hd95 is the 95th-percentile Hausdorff distance and masd the mean "
                 "(symmetric) average surface distance, both in mm with the case spacing (pixels for 2D)")


def _weights_arg(values: list[str]) -> dict[str, Path]:
    weights: dict[str, Path] = {}
    for item in values:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"harness: --weights expects NAME=PATH, got '{item}'")
        weights[name.strip()] = Path(path).expanduser()
    return weights


def _weights_dir(args: argparse.Namespace, command: str) -> Path | None:
    """``--weights-dir`` as a Path (None when not given); a folder that does not exist stops the command."""
    if not args.weights_dir:
        return None
    folder = Path(args.weights_dir).expanduser()
    if not folder.is_dir():
        raise SystemExit(f"harness {command}: --weights-dir {folder}: no such folder")
    return folder


def _runner_options(args: argparse.Namespace) -> dict:
    """The ``--ray-*`` flags as ``RunConfig.runner_options["ray"]`` (only those given)."""
    ray = {key: getattr(args, f"ray_{key}") for key in ("address", "workers", "cpus_per_worker", "gpus_per_worker")
           if getattr(args, f"ray_{key}") is not None}
    ray.update({key: True for key in ("exclusive", "shared_data") if getattr(args, f"ray_{key}")})
    if ray and (args.runner or DEFAULT_RUNNER) != "ray":
        raise SystemExit(f"harness run: the --ray-* options need --runner ray (not {args.runner or DEFAULT_RUNNER})")
    return {"ray": ray} if ray else {}


def cmd_run(args: argparse.Namespace) -> int:
    from harness.run import RunConfig, run
    from harness.runners.base import RunnerError
    from leaderboard import write_leaderboard

    board_options = _board_options(args)  # bad statistics settings stop the command before any case runs
    models = [m.strip() for m in (args.models or "").split(",") if m.strip()]
    if not models and not args.image:
        raise SystemExit("harness run: --models needs at least one name (or --image for a docker image)")
    weights = _weights_arg(args.weights)
    for name, path in weights.items():
        if not path.is_file():
            raise SystemExit(f"harness run: --weights {name}={path}: no such file")
    weights_dir = _weights_dir(args, "run")
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
        runner=args.runner or ("docker" if args.image else DEFAULT_RUNNER),
        runner_options=_runner_options(args),
        image=args.image,
        timeout=args.timeout,
        memory=args.memory,
        isolate=args.isolate,
        retry_errors=args.retry_errors,
        progress=not args.no_progress,
        metrics=args.metrics,
        max_case_gb=args.max_case_gb,
        protocol=args.protocol,
        clicks=args.clicks,
    )
    from harness.cases import set_max_case_gb

    set_max_case_gb(args.max_case_gb)  # also for the processes the run starts (workers, `harness predict`)
    if args.memory and config.runner not in ("native", "subprocess", "docker"):
        raise SystemExit(f"harness run: --memory limits the native (isolated), subprocess and docker runners, not "
                         f"--runner {config.runner}")
    if args.isolate and config.runner != "native":
        raise SystemExit(f"harness run: --isolate is the native runner's; --runner {config.runner} already runs "
                         "cases outside this process")
    try:
        if args.box_jitter:
            from harness.jitter import run_box_jitter

            report = run_box_jitter(config, args.box_jitter, seed=args.jitter_seed)
        else:
            report = run(config)
    except RunnerError as exc:
        print(f"harness run: {exc}", file=sys.stderr)
        return 2
    board = write_leaderboard(config.out_dir, reported=not args.no_published, options=board_options)
    print(board.read_text())
    print(
        f"{report.done} cases done, {report.errors} errors, {report.skipped} already finished; "
        f"results in {config.out_dir / 'results.jsonl'}, leaderboard in {board}"
    )
    for name, message in report.failed_models.items():
        print(f"{name}: not run: {message}", file=sys.stderr)
    if report.errors:
        print(f"harness run: {report.errors} case(s) ended in error (status 'error' in results.jsonl, with the "
              "reason); --retry-errors runs them again", file=sys.stderr)
    return 0 if not report.failed_models and not report.errors else 1


def cmd_predict(args: argparse.Namespace) -> int:
    from harness.pluginmanager import HarnessPlugins
    from harness.predict import predict, split_weights

    plugins = HarnessPlugins()
    plugins.get(args.model)  # an unknown name fails here, with the known ones listed
    weights = split_weights(args.weights, args.model, set(plugins.segmenters()))
    weights_dir = _weights_dir(args, "predict")
    try:
        report = predict(args.model, args.inputs, args.outputs, weights=weights, weights_dir=weights_dir,
                         allow_pickle=args.allow_pickle, threads=args.threads, device=args.device,
                         path=args.path, precision=args.precision, backend=args.backend, plugins=plugins,
                         max_case_gb=args.max_case_gb)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model did not load: say so in one line
        print(f"harness predict: {args.model} cannot load: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if not report.written and not report.failed:
        print(f"harness predict: no *.npz cases in {args.inputs}", file=sys.stderr)
    if report.failed:
        print(f"harness predict: {len(report.failed)} of {len(report.written) + len(report.failed)} cases "
              f"failed: {', '.join(report.failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from harness.benchmark import BenchConfig, Variant, default_variants, render_markdown, run_bench

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise SystemExit("harness bench: --models needs at least one name")
    try:
        variants = ([Variant.parse(v) for v in args.variants.split(",") if v.strip()]
                    if args.variants else default_variants())
    except ValueError as exc:
        raise SystemExit(f"harness bench: --variants: {exc}") from None
    if "faithful" not in [v.name for v in variants]:
        variants.insert(0, Variant())  # the reference every ratio and mask comparison needs
    config = BenchConfig(models=models, data_dir=Path(args.data), out_dir=Path(args.out), variants=variants,
                         repeat=args.repeat, limit=args.limit, multibox=args.multibox, threads=args.threads,
                         weights=_weights_arg(args.weights), weights_dir=_weights_dir(args, "bench"),
                         allow_pickle=args.allow_pickle)
    result = run_bench(config)
    print(render_markdown(result))
    print(f"bench tables in {config.out_dir / 'bench.md'}, raw figures in {config.out_dir / 'bench.json'}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from harness.scoring import score_dirs

    frame = score_dirs(Path(args.segs), Path(args.gts), workers=args.workers, imgs_dir=args.imgs,
                       metrics=args.metrics, max_case_gb=args.max_case_gb)
    if args.output:
        frame.to_csv(args.output, index=False, float_format="%.17g")
        print(f"wrote {len(frame)} rows to {args.output}")
    else:
        frame.to_csv(sys.stdout, index=False, float_format="%.17g")
    errors = frame["error"].astype(bool).sum() if "error" in frame else 0
    if errors:
        print(f"{errors} case(s) could not be scored (see the error column)", file=sys.stderr)
    return 1 if errors else 0


def _board_options(args: argparse.Namespace):
    """The leaderboard's statistics settings (--bootstrap, --seed, --rank-weights / rank's --weights)."""
    from leaderboard.stats import DEFAULT_RANK_WEIGHTS, DEFAULT_RESAMPLES, DEFAULT_SEED, parse_weights
    from leaderboard.tables import BoardOptions

    text = getattr(args, "rank_weights", None)
    try:
        weights = parse_weights(text) if text else dict(DEFAULT_RANK_WEIGHTS)
    except ValueError as exc:
        raise SystemExit(f"harness {args.command}: {'--weights' if args.command == 'rank' else '--rank-weights'}: "
                         f"{exc}") from None
    return BoardOptions(bootstrap=args.bootstrap or DEFAULT_RESAMPLES,
                        seed=DEFAULT_SEED if args.seed is None else args.seed, rank_weights=weights)


def _run_folder(args: argparse.Namespace) -> Path:
    out = Path(args.out_dir)
    if not (out / "results.jsonl").is_file():
        raise SystemExit(f"harness {args.command}: {out}/results.jsonl not found (not a `harness run` output folder)")
    return out


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from leaderboard import write_leaderboard

    out = _run_folder(args)
    target = write_leaderboard(out, args.output, reported=not args.no_published, options=_board_options(args),
                               figures=not args.no_figures)
    print(target.read_text())
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from leaderboard.reports import compare_report

    out = _run_folder(args)
    metrics = tuple(m.strip().lower() for m in args.metric.split(",") if m.strip())
    try:
        print(compare_report(out, args.a, args.b, metrics, args.margin, _board_options(args)))
    except ValueError as exc:
        print(f"harness compare: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    from leaderboard.reports import rank_report

    out = _run_folder(args)
    try:
        print(rank_report(out, _board_options(args)))
    except ValueError as exc:
        print(f"harness rank: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from harness.cases import CaseError
    from leaderboard.show import ShowError, show_case

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    try:
        target = show_case(args.out_dir, args.case, args.data, models=models, output=args.output)
    except (ShowError, CaseError) as exc:
        print(f"harness show: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"wrote {target}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from harness.pluginmanager import HarnessPlugins

    plugins = HarnessPlugins()
    specs = plugins.segmenters()
    runners = plugins.runners()
    for info in plugins.plugins():
        print(f"{info.name}  {info.distribution} {info.version}  ({info.module})")
        for seg in info.segmenters:
            spec = specs[seg]
            res = f"{spec.resolution}px" if spec.resolution else "-"
            print(f"    {seg:<12} {spec.title}  [{spec.family}, {res}]  {spec.reference}")
        for name in info.runners:
            runner = runners[name]
            print(f"    runner {name:<12} {runner.timing_mode:<11} {runner.description}")
    for message in plugins.failed.values():
        print(f"FAILED: {message}")
    return 0 if not plugins.failed else 1


# --------------------------------------------------------------------------- docker images
# `harness build` and `harness export` (harness.container): challenge-style images of the segmenters.
def _image_weights(args: argparse.Namespace, command: str) -> dict[str, Path]:
    weights = _weights_arg(args.weights)
    for name, path in weights.items():
        if not path.is_file():
            raise SystemExit(f"harness {command}: --weights {name}={path}: no such file")
    return weights


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_build(args: argparse.Namespace) -> int:
    from harness.container.client import EngineUnavailable, connect
    from harness.container.common import ImageBuildError
    from harness.container.model_image import image_parts
    from harness.container.slim_image import build_model_image

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise SystemExit("harness build: --models needs at least one name")
    if args.tag and len(models) > 1:
        raise SystemExit("harness build: --tag names one image; give it with a single model")
    weights = _image_weights(args, "build")
    if args.protocol == "interactive" and args.runtime == "slim":
        raise SystemExit(_INTERACTIVE_SLIM.format(command="build"))
    try:
        client = connect()
    except EngineUnavailable as exc:
        print(f"harness build: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for model in models:
        try:
            info = build_model_image(args.runtime, model, tag=args.tag, weights=weights.get(model), client=client,
                                     log=_stderr, extra_weights=image_parts(model, weights),
                                     compile_cache=args.compile_cache, protocol=args.protocol)
        except (ImageBuildError, ValueError, FileNotFoundError, UnknownSegmenterError) as exc:
            print(f"harness build: {model}: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{info.tag}  {info.size_bytes / 1e6:.0f} MB  {info.id.split(':')[-1][:12]}")
    return 1 if failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    from harness.container.client import EngineUnavailable, connect
    from harness.container.archives import export_image, team_from_archive
    from harness.container.common import ImageBuildError
    from harness.container.model_image import image_parts
    from harness.container.slim_image import build_model_image

    out = Path(args.output).expanduser()
    if args.team and args.team.strip().lower() != team_from_archive(out):
        # The organisers' script reads the team from the file name; a mismatch fails every case there.
        print(f"harness export: --team {args.team!r} differs from the team the challenge reads from the archive "
              f"name {out.name!r} ({team_from_archive(out)!r}, the part before the first '.'); name the file "
              f"{args.team.strip().lower()}.tar.gz, or leave --team out", file=sys.stderr)
        return 2
    team = (args.team or team_from_archive(out)).lower()
    weights = _image_weights(args, "export")
    if args.protocol == "interactive" and args.runtime == "slim":
        raise SystemExit(_INTERACTIVE_SLIM.format(command="export"))
    try:
        client = connect()
    except EngineUnavailable as exc:
        print(f"harness export: {exc}", file=sys.stderr)
        return 2
    try:
        info = build_model_image(args.runtime, args.model, tag=args.tag, weights=weights.get(args.model),
                                 client=client, log=_stderr, extra_weights=image_parts(args.model, weights),
                                 compile_cache=args.compile_cache, protocol=args.protocol)
        export_image(client, info.tag, out, team, log=_stderr)
    except (ImageBuildError, ValueError) as exc:
        print(f"harness export: {exc}", file=sys.stderr)
        return 1
    print(f"{out}  {team}:latest  ({info.tag}, {out.stat().st_size / 1e6:.0f} MB)")
    return 0


_INTERACTIVE_SLIM = ("harness {command}: --protocol interactive needs the full runtime (--runtime full or auto): "
                     "the slim runtime takes boxes only, not the 2025 inputs' clicks and previous prediction")


def _add_image_parsers(sub) -> None:
    weights_help = ("weights file per model, e.g. --weights l0=l0.ckpt (default: what `harness run` uses: the "
                    "bundled weights or $HARNESS_WEIGHTS_DIR); baked into a full image under /opt/weights (a slim "
                    "image holds the graphs exported from them)")
    runtime_help = ("slim: the torch-free runtime on the model's exported OpenVINO graphs (numpy, OpenCV, "
                    "OpenVINO; tag <model>:<version>-slim); full: torch and the whole harness running `harness "
                    "predict`; auto (default): slim for the models that run on exported graphs, else full")
    protocol_help = ("interactive: an image for the 2025 interactive protocol (a box, then clicks; one container per "
                     "step): the full image (--runtime full; slim is refused, its torch-free runtime takes boxes "
                     "only), whose predict.sh runs `harness predict`, which reads the 2025 inputs (boxes as "
                     "per-class dicts, clicks, clicks_order, prev_pred; pickled keys through a restricted reader) "
                     "and gives the clicks to models that take points (the SAM-family models); labelled "
                     "org.medsam-harness.protocol=interactive. Run it with `harness run --protocol interactive "
                     "--image TAG`. standard (default): the 2024 box-only protocol")
    cache_help = ("slim images: leave out the OpenVINO compiled-model cache made at build time (a weightless "
                  "cache, under 1 MB; without it each case compiles the graphs at start-up, about 0.15 s more "
                  "for L0 on 2 cores)")
    p = sub.add_parser("build", help="build challenge-style Docker images of segmenters (one per model)",
                       description="Build one image per model on Debian bookworm with a non-root user and "
                                   "/workspace/predict.sh. Slim (--runtime slim, the default for models that "
                                   "run on exported OpenVINO graphs): numpy, OpenCV, OpenVINO and the torch-free "
                                   "runtime with the graphs in /opt/graphs. Full (--runtime full): CPU torch and "
                                   "the harness in /opt/venv, the weights in /opt/weights, `harness predict` "
                                   "(which also reads the 2025 interactive inputs: --protocol interactive). "
                                   "Needs a Docker engine "
                                   "(scripts/dockerd-local.sh start) and mmdebstrap for the first base image.")
    p.add_argument("--models", required=True, help="comma-separated segmenter names (see `harness plugins`)")
    p.add_argument("--tag", help="image tag (one model only; default medsam-harness/<model>:<version>)")
    p.add_argument("--weights", action="extend", nargs="+", default=[], metavar="NAME=PATH", help=weights_help)
    p.add_argument("--runtime", choices=("auto", "slim", "full"), default="auto", help=runtime_help)
    p.add_argument("--protocol", choices=("standard", "interactive"), default="standard", help=protocol_help)
    p.add_argument("--no-compile-cache", dest="compile_cache", action="store_false", help=cache_help)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("export", help="save a model's image as <team>:latest in a team.tar.gz for the challenge",
                       description="Build the model's image (reused when up to date), tag it <team>:latest and "
                                   "write `docker save | gzip` of it to the output file.")
    p.add_argument("--model", required=True, help="segmenter name")
    p.add_argument("-o", "--output", required=True, metavar="TEAM.tar.gz",
                   help="archive to write; the challenge reads the team name from it (before the first '.')")
    p.add_argument("--team", help="team name, lowercased (default: the output file name before the first '.'); "
                                  "must agree with the file name, which is where the challenge reads it (exit 2 if not)")
    p.add_argument("--tag", help="tag of the model image (default medsam-harness/<model>:<version>)")
    p.add_argument("--weights", action="extend", nargs="+", default=[], metavar="NAME=PATH", help=weights_help)
    p.add_argument("--runtime", choices=("auto", "slim", "full"), default="auto", help=runtime_help)
    p.add_argument("--protocol", choices=("standard", "interactive"), default="standard", help=protocol_help)
    p.add_argument("--no-compile-cache", dest="compile_cache", action="store_false", help=cache_help)
    p.set_defaults(func=cmd_export)


def _add_execution_choices(p: argparse.ArgumentParser) -> None:
    """--path, --precision and --backend, shared by run and predict."""
    p.add_argument("--path", choices=PATHS, default=DEFAULT_PATH,
                   help="execution path of the torch segmenters: fast (default: 3D slices encoded once per case "
                        "and cached, on the backend --backend picks, BatchNorm folded on torch; the upstream masks "
                        "within the reference bars) or faithful (the upstream call pattern on torch, stored as "
                        "NAME[faithful])")
    p.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                   help="numeric precision of the torch segmenters' image encoder: fp32 (default) or bf16 "
                        "(needs a CPU with AMX or AVX512-BF16, detected at run time, or a GPU)")
    p.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND,
                   help="what executes the encoder and decoder: torch, or a graph exported from it (once per "
                        "weights file, cached) run by onnxruntime or openvino. auto (default): openvino on the "
                        "fast path where medsam-harness[backends] is installed (parity-tested for every built-in "
                        "model, the fastest), else torch; the faithful path runs on torch")


_WEIGHTS_HELP = ("weights file per model, e.g. --weights medsam=medsam_vit_b.pth l0=best.ckpt (state_dict, "
                 "medficientsam Lightning .ckpt or medsam-harness weights); a name not in --models supplies a "
                 "part (medsam=PATH completes a distilled student); default: the model's bundled weights or "
                 "--weights-dir")


def _add_model_sources(p: argparse.ArgumentParser, weights_metavar: str = "NAME=PATH",
                       weights_help: str = _WEIGHTS_HELP) -> None:
    """--weights, --weights-dir, --allow-pickle and --threads: where a command finds its models' weights
    and how many threads it runs them on (run, predict and bench take the same)."""
    p.add_argument("--weights", action="extend", nargs="+", default=[], metavar=weights_metavar, help=weights_help)
    p.add_argument("--weights-dir", default=None, metavar="DIR",
                   help="folder to look up weights in: NAME.pt|.pth|.ckpt, NAME/model.pt or the upstream "
                        "file names (medsam_vit_b.pth, finetuned-l0-augmented/best.ckpt, ...); "
                        "default: $HARNESS_WEIGHTS_DIR")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load whole-module pickles (medficientsam's model.pth): loading one imports and "
                        "runs the code of the classes it names, so only for files you trust whose code you "
                        "have; a file whose pickle calls anything that runs commands or opens files is refused "
                        "even then")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads to pin (default: all available)")


def _add_statistics(p: argparse.ArgumentParser) -> None:
    """--bootstrap and --seed: the resampling behind every interval, paired test and rank stability.
    (Defaults: leaderboard.stats, not imported here: every command, predict in a container too, parses this.)"""
    p.add_argument("--bootstrap", type=_positive_int, default=None, metavar="N",
                   help="bootstrap resamples for the 95%% confidence intervals and rank stability (default 2000)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the resampling: the same seed gives the same intervals (default 0)")


def _add_max_case_gb(p: argparse.ArgumentParser, what: str = "case file") -> None:
    """``--max-case-gb``: the decompressed-size limit of one npz file (:func:`harness.cases.max_case_bytes`)."""
    from harness.cases import MAX_CASE_ENV, default_max_case_bytes

    p.add_argument("--max-case-gb", type=_positive_float, default=None, metavar="GB",
                   help=f"refuse a {what} whose arrays would take more than GB (10^9 bytes) once decompressed, "
                        "read from the npz's .npy headers before anything is decompressed (an error row naming "
                        f"the file, the array, its size and the limit); default: {MAX_CASE_ENV} if set, else a "
                        f"quarter of this machine's physical memory ({default_max_case_bytes() / 1e9:.1f} GB here)")


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
                                   "Running the same command again skips finished (model, case) pairs. The exit "
                                   "status is 1 when a model could not load or a case ended in error (the run "
                                   "goes on past both), 2 for bad settings.")
    p.add_argument("--models", default=None,
                   help="comma-separated segmenter names (see `harness plugins`); required unless --image")
    p.add_argument("--data", default=str(DEMO_DIR),
                   help="folder with imgs/*.npz and optionally gts/*.npz (default: the bundled demo set)")
    p.add_argument("--out", default="results", help="output folder (default: ./results)")
    p.add_argument("--limit", type=_positive_int, default=None,
                   help="at most N cases, taken round-robin over modalities (for quick checks)")
    _add_model_sources(p)
    _add_execution_choices(p)
    p.add_argument("--runner", default=None, metavar="NAME",
                   help="how cases are executed: native (default: in this process, a case's time is its "
                        "segmentation), subprocess (one `harness predict` process per case) or docker (one "
                        "container per case, `sh predict.sh` as the challenge runs it), both timed end to end "
                        "(start, model load, I/O included); ray (a Ray cluster, see --ray-*); or a runner a "
                        "plugin adds (`harness plugins` lists them). Entries of a runner other than native are "
                        "stored under their own names, e.g. litemedsam[docker]")
    ray = p.add_argument_group("ray runner (--runner ray; pip install -e '.[ray]')")
    ray.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                     help="join this Ray cluster (`ray start --head` on one machine, `ray start --address` on the "
                          "others); default: start a local Ray instance for this run")
    ray.add_argument("--ray-workers", type=_positive_int, default=None, metavar="N",
                     help="workers (each loads the model once; default: as many as the cluster's CPUs allow)")
    ray.add_argument("--ray-cpus-per-worker", type=_positive_float, default=None, metavar="C",
                     help="CPUs each worker reserves (default 1)")
    ray.add_argument("--ray-gpus-per-worker", type=float, default=None, metavar="G",
                     help="GPUs each worker reserves (default 0)")
    ray.add_argument("--ray-exclusive", action="store_true",
                     help="at most one case per node at a time, timed in-process per node (default: cases "
                          "share nodes and are recorded with timing mode 'distributed')")
    ray.add_argument("--ray-shared-data", action="store_true",
                     help="workers read --data themselves (every node mounts it at the same path); default: the "
                          "driver ships each case's bytes through Ray's object store")
    p.add_argument("--image", default=None, metavar="TAG_OR_TARBALL",
                   help="docker runner: evaluate this image (a tag, or a submission team.tar.gz, loaded first) "
                        "instead of building the harness's own image of --models; implies --runner docker")
    p.add_argument("--isolate", action="store_true",
                   help="native runner: segment in a worker process that loads the model once, so that a segmenter "
                        "calling os._exit, crashing or hanging ends only its case (an error naming the exit) and "
                        "the next case gets a fresh worker; timed inside the worker as in-process. Implied by "
                        "--timeout and --memory")
    p.add_argument("--timeout", type=_positive_float, default=None, metavar="SECONDS",
                   help="kill a case after this many seconds (an error naming the limit; default: no limit): "
                        "native (in an isolated worker), subprocess, docker and ray runners (ray: the case's "
                        "worker is killed and replaced)")
    p.add_argument("--memory", default=None, metavar="SIZE",
                   help="memory limit such as 4g or 512m. docker: the container's (a cgroup's, resident memory; "
                        "default 8G, the challenge's; 32G with --protocol interactive, the 2025 evaluator's). "
                        "native (isolated worker) and subprocess: a memory cgroup per "
                        "process where the harness can make one (resident memory; the kernel's OOM kill is the "
                        "evidence), else RLIMIT_AS, a cap on the process's address space (virtual memory: runtimes "
                        "that reserve large virtual areas may need more; HARNESS_MEMORY_LIMIT=rlimit|cgroup picks). "
                        "Going past it is an error naming the limit. Default there: no limit")
    _add_max_case_gb(p)
    p.add_argument("--retry-errors", action="store_true", help="run again the cases recorded as errors")
    p.add_argument("--box-jitter", default=None, metavar="LEVELS",
                   help="box robustness sweep, e.g. 0,5,10,20: each level is its own entry <model>[jitter=L] whose "
                        "box sides each move by a seeded random -a..a pixels, a = L * image size / 256 (z by the "
                        "same distance in mm), clipped; level 0 is the plain run (harness.jitter)")
    p.add_argument("--jitter-seed", type=int, default=0, help="seed of --box-jitter's perturbations (default 0)")
    p.add_argument("--protocol", choices=("standard", "interactive"), default="standard",
                   help="standard: the 2024 protocol, one box per object (default); interactive: the 2025 protocol on "
                        "3D inputs from `harness convert --to interactive` (DATA/imgs + DATA/gts): a box step, then "
                        "one simulated click per class per step, each scored; entries <model>[interactive]. "
                        "--runner native runs the steps in this process; --runner subprocess / docker and --image "
                        "run each step in a fresh `harness predict` process / container on that step's input file, "
                        "as the official evaluator does (docker: -m 32G unless --memory is given; --timeout is per "
                        "step) (harness.interactive.run, harness.interactive.external)")
    p.add_argument("--clicks", type=int, default=5, metavar="N",
                   help="--protocol interactive: click steps after the box step (default 5, the challenge's)")
    p.add_argument("--metrics", type=_metrics_arg, default=("dsc", "nsd"), metavar="M1,M2,...",
                   help=_METRICS_HELP + "; stored per case in results.jsonl. A resumed run does not rescore the "
                        "cases already finished: use a new --out to add metrics to a finished run, or "
                        "`harness score` on its segs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-published", action="store_true",
                   help="leave the published reference rows out of the leaderboard")
    _add_statistics(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("predict", help="segment every *.npz of a folder with one model (a container's predict.sh)",
                       description="Load one segmenter, segment every case of INPUTS (challenge npz files) and write "
                                   "OUTPUTS/<same name> with key 'segs'. A failed case is reported with its file and "
                                   "the others still run; the exit status is 1 if any failed, 2 if the model did not "
                                   "load.")
    p.add_argument("--model", required=True, help="segmenter name (see `harness plugins`)")
    p.add_argument("-i", "--inputs", required=True, help="folder of <case>.npz files (or with imgs/*.npz)")
    p.add_argument("-o", "--outputs", required=True, help="folder to write <case>.npz segmentations into")
    _add_model_sources(p, "PATH|NAME=PATH", "the model's weights file; NAME=PATH supplies a part from another "
                                            "segmenter (medsam=PATH completes a distilled student)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    _add_execution_choices(p)
    _add_max_case_gb(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("bench", help="time execution variants (faithful, fast, bf16, backends) side by side",
                       description="For each model, run each variant over the cases in one process, interleaved, "
                                   "and print median seconds per case, speed-ups over the faithful path, peak RSS, the "
                                   "encoder's GFLOP/s against this machine's measured matmul peak, and how far each "
                                   "variant's masks are from the faithful ones. Writes OUT/bench.md and OUT/bench.json.")
    p.add_argument("--models", required=True, help="comma-separated segmenter names")
    p.add_argument("--data", default=str(DEMO_DIR), help="folder with imgs/*.npz (default: the bundled demo set)")
    p.add_argument("--out", default="bench-results", help="output folder (default: ./bench-results)")
    p.add_argument("--variants", default=None, metavar="V1,V2,...",
                   help="variants as path[+precision][+backend][+bN][+dN], e.g. faithful,fast,fast+b4,fast+bf16,"
                        "fast+openvino; a variant without a backend runs on torch (default: faithful, fast, and "
                        "fast+bf16 / fast+onnxruntime / fast+openvino where this machine has them); bN / dN set the "
                        "fast path's encoder batch (slices per call) / decoder batch (2D boxes per call), default 1")
    p.add_argument("--repeat", type=_positive_int, default=3, help="interleaved rounds per case (default 3)")
    p.add_argument("--limit", type=_positive_int, default=None, help="at most N cases of --data")
    p.add_argument("--multibox", type=int, default=6,
                   help="boxes of the synthetic multi-box 3D case built on the largest CT volume (0: none; default 6)")
    _add_model_sources(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("score", help="challenge DSC/NSD of a segs folder against a gts folder",
                       description="Drop-in for the challenge's compute_metrics.py: one CSV row per gts file with "
                                   "case, dsc, nsd at full precision, plus modality and error. The exit status is "
                                   "1 when any case could not be scored.")
    p.add_argument("--segs", required=True, help="folder of <case>.npz files with key 'segs'")
    p.add_argument("--gts", required=True, help="folder of <case>.npz files with key 'gts' (and 'spacing' for 3D)")
    p.add_argument("--imgs", help="folder of the input cases, for the 3D spacing of gts files that lack it")
    p.add_argument("-o", "--output", help="CSV file to write (default: stdout)")
    p.add_argument("--workers", type=_positive_int, default=1, help="processes to score with")
    p.add_argument("--metrics", type=_metrics_arg, default=("dsc", "nsd"), metavar="M1,M2,...",
                   help=_METRICS_HELP + "; extra metrics are columns after nsd")
    _add_max_case_gb(p, "file")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("leaderboard", help="render the markdown leaderboard of a run folder (with CIs, paired "
                                           "tests, ranking and figures)",
                       description="Write OUT_DIR/leaderboard.md, OUT_DIR/summary.json and the figures "
                                   "(leaderboard-*.png, beside the markdown) of a run folder.")
    p.add_argument("out_dir", help="a `harness run` output folder")
    p.add_argument("-o", "--output", help="markdown file to write (default: OUT_DIR/leaderboard.md)")
    p.add_argument("--no-published", action="store_true",
                   help="leave the published reference rows (marked '(published)') out")
    _add_statistics(p)
    p.add_argument("--rank-weights", default=None, metavar="dsc=1,nsd=1,time=1",
                   help="weights of the metrics in the challenge-style ranking (default dsc=1,nsd=1,time=1; "
                        "hd95 and masd may be added where they were computed)")
    p.add_argument("--no-figures", action="store_true", help="write no PNG figures")
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("compare", help="one pair of entries in detail: A - B per modality, CIs, Wilcoxon, "
                                       "non-inferiority",
                       description="Compare entry A with entry B of a run folder on the cases both finished: the "
                                   "mean paired difference per modality and overall with bootstrap 95% CIs, "
                                   "Wilcoxon signed-rank p-values and the verdict at 5%. With --margin M, say "
                                   "whether A is non-inferior to B: the lower CI bound of A - B is above -M points.")
    p.add_argument("out_dir", help="a `harness run` output folder")
    p.add_argument("a", help="entry A (e.g. litemedsam[bf16]; see the leaderboard's paired table)")
    p.add_argument("b", help="entry B (e.g. litemedsam)")
    p.add_argument("--metric", default="dsc,nsd", help="metrics to compare (default dsc,nsd)")
    p.add_argument("--margin", type=_positive_float, default=None, metavar="POINTS",
                   help="non-inferiority margin in points of %% (e.g. 0.5)")
    _add_statistics(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("rank", help="challenge-style ranking of a run folder's entries, with bootstrap stability",
                       description="Rank then aggregate: every case ranks the entries on each metric (ties "
                                   "averaged; a failed or missing case takes the worst value), ranks are averaged "
                                   "over cases and weighted metrics; also aggregate-then-rank, and how stable the "
                                   "ranking is under bootstrap resampling of the cases. Challenge-style: not the "
                                   "official CVPR 2024 code, which is not published.")
    p.add_argument("out_dir", help="a `harness run` output folder")
    p.add_argument("--weights", dest="rank_weights", default=None, metavar="dsc=1,nsd=1,time=1",
                   help="metric weights (default dsc=1,nsd=1,time=1; also hd95, masd where computed)")
    _add_statistics(p)
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser("show", help="one case as a PNG: the image with its boxes, the ground truth and each "
                                    "model's segmentation",
                       description="Draw CASE (a file name of --data's imgs/, with or without .npz) of a run folder: "
                                   "the image with its boxes, the ground truth when gts/ has it, and each entry's "
                                   "segmentation with its DSC/NSD, side by side; 3D cases as three slices of the "
                                   "first box's z-range. Writes OUT_DIR/show-<case>.png unless -o.")
    p.add_argument("out_dir", help="a `harness run` output folder")
    p.add_argument("case", help="case file name, e.g. 2DBox_US_hc18-158 (.npz optional)")
    p.add_argument("--models", default=None,
                   help="comma-separated entries to show (default: every entry with a seg for the case)")
    p.add_argument("--data", default=str(DEMO_DIR),
                   help="folder with imgs/*.npz and optionally gts/*.npz (default: the bundled demo set)")
    p.add_argument("-o", "--output", default=None, help="PNG file to write (default: OUT_DIR/show-<case>.png)")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("plugins", help="list the loaded plugins, their versions, segmenters and runners")
    p.set_defaults(func=cmd_plugins)

    _add_image_parsers(sub)  # harness build / harness export (docker images)

    from harness.interactive.cli import add_parsers as add_interactive_parsers  # harness convert / harness clicks

    add_interactive_parsers(sub)

    from training.cli import add_parsers as add_train_parsers  # argparse only: torch loads when training starts

    add_train_parsers(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into the same orderly stop as Ctrl-C (the current case cleaned up, nothing lost)."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except KeyboardInterrupt as exc:
        hint = ("checkpoints are kept; add --resume to continue" if args.command == "train"
                else "finished cases are kept, run the same command again to resume")
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"{what}; {hint}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except (UnknownSegmenterError, UnknownRunnerError, PluginError, StoreLockedError, FileNotFoundError) as exc:
        print(f"harness {args.command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # a full disk: no traceback; what was stored before stays (results.jsonl is cut back to whole lines)
        print(f"harness {args.command}: {exc}; free some space and run the same command again", file=sys.stderr)
        return 1
    except ValueError as exc:
        if args.command != "train":  # bad settings; elsewhere a ValueError is a bug worth its traceback
            raise
        print(f"harness train: {exc}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
