"""``python -m runtime.predict -i INPUTS -o OUTPUTS --graphs DIR``: segment every case, torch-free.

For every ``INPUTS/*.npz`` (or ``INPUTS/imgs/*.npz``) in name order, reads ``imgs`` and ``boxes``,
segments the case with the exported OpenVINO graphs of ``DIR`` and writes ``OUTPUTS/<same name>``
with the key ``segs`` (uint16), as the CVPR 2024 "MedSAM on Laptop" challenge expects.  The model is
loaded once.  A case that fails is reported on stderr with its file and the problem, and the others
still run; the exit status is 1 if any case failed, 2 for bad arguments or graphs that cannot load.

``DIR`` is an OpenVINO export folder of the harness (``encoder.xml``, ``decoder.xml``,
``manifest.json``; ``harness run --backend openvino`` makes them under
``~/.cache/medsam-harness/exports``), or a folder holding exactly one such folder.  The pipeline (the
model's pre- and postprocessing) is, in order: ``--pipeline``; ``DIR/pipeline.json`` (a JSON object of
:class:`runtime.pipelines.Pipeline` fields, optionally under the key ``"pipeline"``); or the model named
by the manifest's cache key (``litemedsam-...``, ``l0-...``, ``medsam-...``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

__all__ = ["main", "load_segmenter", "resolve_pipeline"]

PIPELINE_FILE = "pipeline.json"


def resolve_pipeline(folder: Path, manifest: dict, requested: Optional[str] = None):
    """The pipeline of an export folder (see the module docstring for the order)."""
    from .pipelines import MODEL_PIPELINES, PRESETS, Pipeline

    if requested:
        return Pipeline.resolve(requested)
    if (folder / PIPELINE_FILE).is_file():
        return Pipeline.resolve(str(folder / PIPELINE_FILE))
    key = str(manifest.get("cache_key", ""))
    # Distilled students are completed with a donor's decoder whose prompt frame the key does not tell.
    for model in sorted((m for m in MODEL_PIPELINES if not m.endswith("-distilled")), key=len, reverse=True):
        if key.startswith(model + "-") and not key.startswith(model + "-distilled"):
            return PRESETS[MODEL_PIPELINES[model]]
    raise ValueError(f"{folder}: cannot tell the model's pipeline (no {PIPELINE_FILE}, and the manifest's cache "
                     f"key {key!r} names no built-in model); pass --pipeline (one of {', '.join(PRESETS)}, a "
                     "built-in model name, or a JSON file of pipeline fields)")


def load_segmenter(graphs: str | os.PathLike, pipeline: Optional[str] = None, threads: Optional[int] = None,
                   cache_mb: float = 1024.0, compile_cache: Optional[str | os.PathLike] = None):
    """A :class:`runtime.engine.Segmenter` over the export folder ``graphs``."""
    from .engine import Segmenter
    from .graphs import Graphs, find_graph_folder, read_manifest

    folder = find_graph_folder(graphs)
    chosen = resolve_pipeline(folder, read_manifest(folder), pipeline)
    return Segmenter(Graphs(folder, threads=threads, cache_dir=compile_cache), chosen, cache_mb=cache_mb)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtime.predict",
        description="Segment every INPUTS/*.npz (or INPUTS/imgs/*.npz) with exported OpenVINO graphs into "
                    "OUTPUTS/<name>.npz (key segs, uint16), without torch.")
    parser.add_argument("-i", "--inputs", required=True, type=Path, help="folder of input cases (.npz with imgs, boxes)")
    parser.add_argument("-o", "--outputs", required=True, type=Path, help="folder for the segs files (created)")
    parser.add_argument("--graphs", type=Path, default=os.environ.get("MEDSAM_RUNTIME_GRAPHS"),
                        help="OpenVINO export folder with encoder.xml and decoder.xml (default: $MEDSAM_RUNTIME_GRAPHS)")
    parser.add_argument("--pipeline", default=None,
                        help="pipeline preset, built-in model name or JSON file (default: GRAPHS/pipeline.json, "
                             "else the model named by the manifest)")
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: OpenVINO's latency hint picks them, the physical cores)")
    parser.add_argument("--cache-mb", type=float, default=1024.0,
                        help="budget of a 3D case's slice-embedding cache in MiB (default 1024)")
    parser.add_argument("--compile-cache", type=Path, default=os.environ.get("MEDSAM_RUNTIME_COMPILE_CACHE") or None,
                        help="OpenVINO compiled-model cache folder (default: none, or $MEDSAM_RUNTIME_COMPILE_CACHE)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-case lines on stdout")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    if args.graphs is None:
        print("runtime.predict: error: --graphs DIR is required (or set MEDSAM_RUNTIME_GRAPHS)", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"runtime.predict: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    from .cases import discover_cases, load_case, save_segs

    try:
        cases = discover_cases(args.inputs)
        segmenter = load_segmenter(args.graphs, args.pipeline, args.threads, args.cache_mb, args.compile_cache)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"runtime.predict: error: {error}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"loaded {segmenter.graphs.folder} ({segmenter.pipeline.name}, {segmenter.graphs.threads} threads) "
              f"in {time.perf_counter() - start:.3f}s", flush=True)
    failed = 0
    for path in cases:
        stage = "loading the case"
        try:
            t0 = time.perf_counter()
            case = load_case(path)
            stage = "segmenting"
            segs = segmenter.segment(case.imgs, case.boxes)
            expected = case.imgs.shape[:2] if case.dim == 2 else case.imgs.shape[:3]
            if segs.shape != expected:
                raise ValueError(f"segs has shape {segs.shape}, the case {expected}")
            stage = "writing segs"
            save_segs(args.outputs / path.name, segs)
            seconds = time.perf_counter() - t0
        except Exception as error:  # noqa: BLE001 - one bad case never stops the others
            failed += 1
            text = str(error) if str(path) in str(error) else f"{path}: {type(error).__name__}: {error}"
            print(f"runtime.predict: error: while {stage}: {text}", file=sys.stderr, flush=True)
            continue
        if not args.quiet:
            print(f"{path.name}: {seconds:.3f}s -> {args.outputs / path.name}", flush=True)
    if failed:
        print(f"runtime.predict: {failed} of {len(cases)} case(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
