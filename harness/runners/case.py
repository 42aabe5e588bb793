"""The per-case steps every runner shares: the record of a case, the timed segmentation, checking the
segs, saving and scoring them, and recording an error.

A runner decides where ``segment`` happens and how it is timed; every runner, built-in or plugin, ends a
case in :func:`save_and_score` and builds its record with :func:`new_record`, so the records of all
runners have the same fields and the same metrics.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from harness import __version__
from harness.cases import Case, CaseError, load_ground_truth, save_segs, set_max_case_gb
from harness.choices import resolved_backend
from harness.metrics import DISTANCE_METRICS, case_metrics, distance_metrics
from harness.profiling import PeakRSS
from harness.plugin_api import LoadOptions, SegmenterSpec

if TYPE_CHECKING:
    from harness.pluginmanager import HarnessPlugins
    from harness.run import RunConfig


def _gts_path(data_dir: Path, case_path: Path) -> Path | None:
    candidate = data_dir / "gts" / case_path.name
    return candidate if candidate.is_file() or candidate.is_symlink() else None


def check_segs(segs: object, case: Case) -> np.ndarray:
    """``segs`` if it is an integer array of the case's spatial shape with labels ``0..N`` (N boxes: box
    ``i`` prompts label ``i + 1``), else ValueError/TypeError saying what was returned. A boolean mask is
    refused too: it says nothing about which box a pixel belongs to."""
    if not isinstance(segs, np.ndarray):
        raise TypeError(f"segmenter returned {type(segs).__name__}, not a numpy array")
    if tuple(segs.shape) != tuple(case.spatial_shape):
        raise ValueError(f"segmenter returned segs of shape {segs.shape}, expected {case.spatial_shape}")
    expected = f"integer labels 0..{case.n_boxes} (0 background, label i + 1 for box i)"
    if segs.dtype.kind not in "iu":
        raise ValueError(f"segmenter returned segs of dtype {segs.dtype}, expected {expected}")
    if segs.size:
        low, high = int(segs.min()), int(segs.max())
        if low < 0 or high > case.n_boxes:
            bad = low if low < 0 else high
            raise ValueError(f"segmenter returned label {bad} for a case with {case.n_boxes} box(es); expected "
                             f"{expected}")
    return segs


def error_text(exc: BaseException, path: Path | None = None) -> str:
    """A CaseError already names its file; any other error is prefixed with ``path``. A MemoryError
    says so in words, and an OSError whose file is not ``path`` (a segs file on a full disk) keeps its
    own file name in the text."""
    if isinstance(exc, CaseError):
        return str(exc)
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError):
        text += " (not enough memory for this case; --max-case-gb refuses oversized files before loading them)"
    return f"{path}: {text}" if path is not None else text


def new_record(entry: str, segmenter: str, case_path: Path, config: "RunConfig", threads: int | None,
               timing_mode: str = "in-process", backend: str | None = "") -> dict:
    """The record of one (entry, case) before it runs: every field present, nothing measured yet.
    ``backend`` is the one that runs the model (a segmenter whose ``auto`` export failed runs on torch;
    None for a segmenter without that choice); default ``""``: what ``config.backend`` resolves to.

    Every runner starts a case here, before it reads the case file, so this is also where the run's
    ``max_case_gb`` becomes the limit the case loaders apply (:func:`harness.cases.set_max_case_gb`: this
    process and the processes it starts)."""
    set_max_case_gb(getattr(config, "max_case_gb", None))
    return {
        "model": entry,
        "segmenter": segmenter,
        "case": case_path.name,
        "modality": None,
        "dim": None,
        "n_boxes": None,
        "status": "ok",
        "error": None,
        "dsc": None,
        "nsd": None,
        "dsc_per_label": None,
        "nsd_per_label": None,
        "seconds": None,
        "peak_rss_mb": None,
        "memory_method": None,
        "timing_mode": timing_mode,
        "runner": config.runner,
        "threads": threads,
        "device": config.device,
        "path": config.path,
        "precision": config.precision,
        "backend": resolved_backend(config) if backend == "" else backend,
        "warnings": [],
        "segs": None,
        "finished_at": None,
        "harness_version": __version__,
    }


class Stage:
    """What a case is doing now, for the error message (``while <stage>: ...``), and the file it is
    working on when that is not the case file (the gts file while scoring), named in the message."""

    def __init__(self, name: str = "loading the case", path: Path | None = None):
        self.name = name
        self.path = path


def describe_case(record: dict, case: Case) -> None:
    record.update(modality=case.modality, dim=f"{case.dim}D", n_boxes=case.n_boxes, warnings=list(case.warnings))


def timed_segment(segmenter, case: Case) -> tuple[object, float, PeakRSS]:
    """The timed segmentation of one case, shared by ``harness run`` and ``harness predict``:
    ``(segs, seconds, peak)``, segs as the segmenter returned them (check them with :func:`check_segs`)."""
    with PeakRSS() as mem:
        start = time.perf_counter()
        segs = segmenter.segment(case)
        seconds = time.perf_counter() - start
    return segs, seconds, mem


def save_and_score(record: dict, case: Case, segs: np.ndarray, case_path: Path, config: RunConfig,
                   stage: Stage) -> None:
    """Write ``OUT/segs/<entry>/<case>.npz`` and score it against ``gts/<case>.npz`` where there is
    one; every runner ends a case here. ``segs`` are checked first (:func:`check_segs`), whichever
    runner produced them."""
    segs = check_segs(segs, case)
    stage.name = "writing segs"
    seg_path = config.out_dir / "segs" / record["model"] / case.name
    save_segs(seg_path, segs)
    record["segs"] = str(seg_path.relative_to(config.out_dir))
    gts_path = _gts_path(config.data_dir, case_path)
    if gts_path is not None:
        stage.name = "scoring"
        stage.path = gts_path
        gt = load_ground_truth(gts_path, case)
        metrics = case_metrics(gt.gts, segs, spacing=gt.spacing)
        record.update(
            dsc=metrics.dsc,
            nsd=metrics.nsd,
            dsc_per_label=list(metrics.dsc_per_label),
            nsd_per_label=list(metrics.nsd_per_label),
        )
        extras = [name for name in config.metrics if name in DISTANCE_METRICS]
        if extras:
            distances = distance_metrics(gt.gts, segs, spacing=gt.spacing, metrics=extras)
            record.update({key: list(value) if key.endswith("_per_label") else value
                           for key, value in distances.items()})


def record_error(record: dict, stage: Stage, exc: BaseException, case_path: Path) -> None:
    record["status"] = "error"
    record["error"] = f"while {stage.name}: {error_text(exc, stage.path or case_path)}"
    if os.environ.get("HARNESS_DEBUG"):
        traceback.print_exc()


def finish_record(record: dict) -> dict:
    record["finished_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return record


def model_info(spec: SegmenterSpec, described: dict, plugins: HarnessPlugins, tags: list[str]) -> dict:
    reported = dataclasses.asdict(spec.reported) if spec.reported is not None else None
    owner = next((p for p in plugins.plugins() if spec.name in p.segmenters), None)
    return {
        "segmenter": spec.name,
        "tags": tags,
        "title": spec.title,
        "family": spec.family,
        "resolution": spec.resolution,
        "reference": spec.reference,
        "plugin": owner.source if owner else None,
        "reported": reported,
        **described,
        "host": {"machine": platform.machine(), "processor": platform.processor(), "python": sys.version.split()[0]},
    }


def load_options(spec: SegmenterSpec, config: RunConfig, threads: int) -> LoadOptions:
    """What a run hands ``spec.load``; ``harness predict`` builds the same from its flags."""
    return LoadOptions(
        weights=config.weights.get(spec.name),
        device=config.device,
        threads=threads,
        weights_dir=config.weights_dir,
        all_weights=dict(config.weights),
        allow_pickle=config.allow_pickle,
        path=config.path,
        precision=config.precision,
        backend=config.backend,
    )
