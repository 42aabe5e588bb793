"""``harness bench``: execution variants of each model timed side by side, in one process and one sitting.

For every model, each requested variant (faithful path, fast path, bf16, an export backend, an
encoder batch size) is loaded once and warmed up outside the timed region.  Then, for every case,
the variants take turns (``repeat`` rounds, the variants interleaved inside each round), so that
machine noise (other processes, frequency changes) falls on all of them alike; a variant's figure
for a case is the median of its rounds, and the ratios compare medians measured in that same run.

Per model x variant x case the bench records: median seconds; the process's peak RSS during the
case and the part of it the case added above the RSS before it (``case_mb``: working memory:
activations, slice cache); the encoder's achieved GFLOP/s (encoder FLOPs x images encoded / time
inside encoder calls) against this machine's matmul peak at the variant's precision, measured at
start with a large square matmul on the same threads; and how far its masks are from the faithful
fp32 torch variant's (the smallest per-label Dice), so a fast figure never stands without its
accuracy.

Cases: the data folder's cases (default: the bundled demo set) plus, unless ``multibox=0``, one
synthetic multi-box 3D case: a real volume of the folder carrying ``multibox`` boxes with
overlapping z-ranges (the challenge's CT cases carry many organs; single-box volumes cannot show
what a slice-embedding cache saves).  It has no ground truth and is only timed.
"""
from __future__ import annotations

import dataclasses
import gc
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from harness.cases import Case, CaseError, discover_cases, load_case
from harness.choices import EXPORT_BACKENDS, PATHS, PRECISIONS
from harness.metrics import dice_per_label
from harness.pluginmanager import HarnessPlugins
from harness.profiling import PeakRSS, cpu_name, default_threads
from harness.results import write_json_atomic, write_text_atomic
from harness.plugin_api import LoadOptions

VARIANT_BACKENDS = ("torch", *EXPORT_BACKENDS)  # what a variant may name: no "auto", a variant is explicit


@dataclass(frozen=True)
class Variant:
    """One way to execute a model: ``path[+precision][+backend][+bN][+dN]`` (e.g. ``fast+bf16+b4``;
    ``bN`` / ``dN``: the fast path's encoder batch (slices per call) / decoder batch (2D boxes per call))."""

    path: str = "faithful"
    precision: str = "fp32"
    backend: str = "torch"
    encoder_batch: int | None = None  # None: the pipeline's default
    decoder_batch: int | None = None  # None: the pipeline's default

    @classmethod
    def parse(cls, text: str) -> "Variant":
        tokens = [t.strip() for t in text.split("+") if t.strip()]
        if not tokens or tokens[0] not in PATHS:
            raise ValueError(f"variant {text!r}: must start with a path, one of {PATHS}")
        variant = cls(path=tokens[0])
        for token in tokens[1:]:
            if token in PRECISIONS:
                variant = dataclasses.replace(variant, precision=token)
            elif token in VARIANT_BACKENDS:
                variant = dataclasses.replace(variant, backend=token)
            elif token[:1] in ("b", "d") and token[1:].isdigit() and int(token[1:]) >= 1:
                field_name = "encoder_batch" if token[0] == "b" else "decoder_batch"
                variant = dataclasses.replace(variant, **{field_name: int(token[1:])})
            else:
                raise ValueError(f"variant {text!r}: unknown part {token!r} (expected one of "
                                 f"{PRECISIONS + VARIANT_BACKENDS}, bN (the fast path's encoder batch) or dN (its "
                                 "decoder batch))")
        return variant

    @property
    def name(self) -> str:
        parts = [self.path]
        if self.precision != "fp32":
            parts.append(self.precision)
        if self.backend != "torch":
            parts.append(self.backend)
        if self.encoder_batch is not None:
            parts.append(f"b{self.encoder_batch}")
        if self.decoder_batch is not None:
            parts.append(f"d{self.decoder_batch}")
        return "+".join(parts)


def default_variants() -> list[Variant]:
    """faithful, fast, and where this machine can: fast+bf16 and each export backend whose packages
    (runtime and exporter: :func:`harness.choices.missing_packages`) are all installed."""
    from harness import choices
    from models.hardware import cpu_bf16_support

    names = ["faithful", "fast"]
    if cpu_bf16_support():
        names.append("fast+bf16")
    names += [f"fast+{backend}" for backend in choices.EXPORT_BACKENDS if not choices.missing_packages(backend)]
    return [Variant.parse(n) for n in names]


def matmul_peak_gflops(threads: int, dtype: str = "fp32", n: int = 2048, repeats: int = 5) -> float:
    """This machine's measured matmul throughput (GFLOP/s, best of ``repeats``) on ``threads``
    threads: an (n x n) @ (n x n) product, 2 n^3 FLOPs."""
    import torch

    torch.set_num_threads(threads)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n).to(dt)
    b = torch.randn(n, n).to(dt)
    with torch.inference_mode():
        a @ b  # warm-up: oneDNN / MKL kernel selection
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def multibox_case(case: Case, n_boxes: int) -> Case:
    """``case`` (a 3D volume) carrying ``n_boxes`` boxes: the case's first box shifted around the
    volume on a grid, each box's z-range covering a different overlapping part of the depth."""
    if case.dim != 3:
        raise ValueError(f"{case.path}: multi-box bench case needs a 3D volume")
    depth, height, width = case.imgs.shape
    x0, y0, _, x1, y1, _ = (int(v) for v in case.boxes[0])
    bw, bh = max(4, (x1 - x0) // 2), max(4, (y1 - y0) // 2)
    boxes = []
    for i in range(n_boxes):
        cx = int((i % 3 + 0.5) * width / 3)
        cy = int((i // 3 % 3 + 0.5) * height / 3)
        z_lo = int(i * depth / (2 * n_boxes))
        z_hi = min(depth - 1, z_lo + max(2, depth // 2))
        boxes.append([max(0, cx - bw // 2), max(0, cy - bh // 2), z_lo,
                      min(width - 1, cx + bw // 2), min(height - 1, cy + bh // 2), z_hi])
    return dataclasses.replace(case, name=f"{Path(case.name).stem}-{n_boxes}boxes.npz",
                               boxes=np.asarray(boxes, dtype=np.int64))


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _min_dice(segs: np.ndarray, reference: np.ndarray) -> float:
    """Smallest Dice over the labels either map has (1.0 for identical maps)."""
    if np.array_equal(segs, reference):
        return 1.0
    labels = sorted((set(np.unique(reference).tolist()) | set(np.unique(segs).tolist())) - {0})
    scores = dice_per_label(reference, segs, labels) if labels else np.ones(1)
    return float(np.nanmin(scores))


@dataclass
class Measurement:
    model: str
    variant: str
    case: str
    kind: str  # "2D", "3D", "3D multi-box"
    seconds: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    case_mb: float = 0.0
    images_encoded: int = 0
    encoder_seconds: float = 0.0
    encoder_flops: int | None = None  # FLOPs of one encoder pass (multiply-add = 2)
    min_dice_vs_faithful: float | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)


@dataclass
class BenchConfig:
    models: list[str]
    data_dir: Path
    out_dir: Path
    variants: list[Variant] = field(default_factory=default_variants)
    repeat: int = 3
    limit: int | None = None
    multibox: int = 6
    threads: int | None = None
    weights: dict[str, Path] = field(default_factory=dict)
    weights_dir: Path | None = None
    allow_pickle: bool = False


def _cases(config: BenchConfig, log: Callable[[str], None] = print) -> list[tuple[Case, str]]:
    cases = []
    for path in discover_cases(config.data_dir, config.limit):
        try:
            cases.append(load_case(path))
        except CaseError as exc:  # a bench measures speed: an unreadable case is left out, and said so
            log(f"skipped {exc}")
    out = [(c, f"{c.dim}D") for c in cases]
    volumes = [c for c in cases if c.dim == 3]
    if config.multibox and volumes:
        ct = [c for c in volumes if c.modality == "CT"]
        base = max(ct or volumes, key=lambda c: c.imgs.shape[0] * c.imgs.shape[1] * c.imgs.shape[2])
        out.append((multibox_case(base, config.multibox), "3D multi-box"))
    return out


def run_bench(config: BenchConfig, plugins: HarnessPlugins | None = None, log: Callable[[str], None] = print) -> dict:
    """Run the bench; write ``bench.json`` and ``bench.md`` into ``config.out_dir``; return the JSON."""
    import torch

    from models.complexity import encoder_flops

    plugins = plugins or HarnessPlugins()
    specs = [plugins.get(name) for name in config.models]
    threads = config.threads or default_threads()
    torch.set_num_threads(threads)
    peaks = {"fp32": matmul_peak_gflops(threads, "fp32")}
    from models.hardware import cpu_bf16_support

    if cpu_bf16_support():
        peaks["bf16"] = matmul_peak_gflops(threads, "bf16")
    log(f"matmul peak on {threads} threads: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    cases = _cases(config, log)
    measurements: list[Measurement] = []
    notes: dict[str, str] = {}
    for spec in specs:
        loaded = {}
        for variant in config.variants:
            options = LoadOptions(weights=config.weights.get(spec.name), threads=threads,
                                  weights_dir=config.weights_dir, all_weights=dict(config.weights),
                                  allow_pickle=config.allow_pickle, path=variant.path,
                                  precision=variant.precision, backend=variant.backend)
            try:
                segmenter = spec.load(options)
            except Exception as exc:  # noqa: BLE001 - a variant this machine cannot run is reported, not fatal
                notes[f"{spec.name} {variant.name}"] = f"{type(exc).__name__}: {exc}"
                log(f"{spec.name} {variant.name}: not run: {exc}")
                continue
            engine = getattr(segmenter, "engine", None)
            batches = {k: v for k, v in (("encoder_batch", variant.encoder_batch),
                                         ("decoder_batch", variant.decoder_batch)) if v is not None}
            if batches and engine is not None:
                engine.config = engine.config.with_options(**batches)
            segmenter.segment(cases[0][0])  # warm-up outside the timed region
            loaded[variant.name] = segmenter
        if "faithful" not in loaded and loaded:
            log(f"{spec.name}: no faithful fp32 torch variant; masks are not compared")
        first = next(iter(loaded.values()), None)
        model, pipeline = getattr(first, "model", None), getattr(first, "config", None)
        flops = encoder_flops(model, pipeline.input_size) if model is not None and pipeline is not None else None
        for case, kind in cases:
            per_variant = {name: Measurement(spec.name, name, case.name, kind, encoder_flops=flops) for name in loaded}
            reference = None
            for _ in range(config.repeat):
                for name, segmenter in loaded.items():
                    m = per_variant[name]
                    engine = getattr(segmenter, "engine", None)
                    if engine is not None:
                        engine.reset_stats()
                    gc.collect()
                    before = _rss_mb()
                    with PeakRSS() as mem:
                        start = time.perf_counter()
                        segs = segmenter.segment(case)
                        m.seconds.append(time.perf_counter() - start)
                    m.peak_rss_mb = max(m.peak_rss_mb, mem.mb or 0.0)
                    m.case_mb = max(m.case_mb, (mem.mb or before) - before)
                    if engine is not None:
                        m.images_encoded = engine.stats.images_encoded
                        m.encoder_seconds = engine.stats.encoder_seconds
                    if name == "faithful":
                        reference = segs
                    elif reference is not None and m.min_dice_vs_faithful is None:
                        m.min_dice_vs_faithful = _min_dice(segs, reference)
            log(f"{spec.name} {case.name}: " + ", ".join(f"{n} {m.median_s:.2f}s" for n, m in per_variant.items()))
            measurements.extend(per_variant.values())
            _write(config, _result(config, threads, peaks, measurements, notes))  # an interrupted bench keeps its cases
        loaded.clear()
        gc.collect()
    result = _result(config, threads, peaks, measurements, notes)
    _write(config, result)
    return result


def _write(config: BenchConfig, result: dict) -> None:
    config.out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config.out_dir / "bench.json", result)
    write_text_atomic(config.out_dir / "bench.md", render_markdown(result))


def _result(config: BenchConfig, threads: int, peaks: dict, measurements: list[Measurement], notes: dict) -> dict:
    import torch

    rows = []
    for m in measurements:
        flops = m.encoder_flops
        gflops = (flops * m.images_encoded / m.encoder_seconds / 1e9
                  if flops and m.images_encoded and m.encoder_seconds > 0 else None)
        precision = "bf16" if "bf16" in m.variant.split("+") else "fp32"
        rows.append({
            "model": m.model, "variant": m.variant, "case": m.case, "kind": m.kind,
            "median_s": m.median_s, "seconds": m.seconds, "peak_rss_mb": m.peak_rss_mb, "case_mb": m.case_mb,
            "images_encoded": m.images_encoded, "encoder_s": m.encoder_seconds,
            "encoder_gflops": gflops,
            "encoder_peak_fraction": gflops / peaks[precision] if gflops and precision in peaks else None,
            "min_dice_vs_faithful": m.min_dice_vs_faithful,
        })
    faithful = {(r["model"], r["case"]): r["median_s"] for r in rows if r["variant"] == "faithful"}
    for r in rows:
        base = faithful.get((r["model"], r["case"]))
        r["speedup_vs_faithful"] = base / r["median_s"] if base and r["median_s"] > 0 else None
    return {
        "machine": {"processor": cpu_name(), "machine": platform.machine(), "threads": threads,
                    "torch": torch.__version__, "matmul_peak_gflops": peaks},
        "repeat": config.repeat,
        "variants": [v.name for v in config.variants],
        "rows": rows,
        "notes": notes,
    }


def render_markdown(result: dict) -> str:
    """The bench as markdown: per model, one table of cases x variants (median seconds, ratio to the
    faithful path), then memory, encoder efficiency and mask agreement."""
    from tabulate import tabulate

    machine = result["machine"]
    peaks = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in machine["matmul_peak_gflops"].items())
    lines = ["# Bench", "",
             f"{machine['processor']}, {machine['threads']} threads, torch {machine['torch']}; measured matmul peak: "
             f"{peaks}. Median of {result['repeat']} interleaved rounds per case; ratios are faithful seconds / "
             "variant seconds, measured side by side in this run. Memory: the process's peak RSS during the case "
             "(+ what the case added above the RSS before it). Encoder: achieved GFLOP/s and its share of the "
             "matmul peak at the variant's precision. Masks: the smallest per-label Dice against the faithful "
             "fp32 torch masks of the same case.", ""]
    rows = result["rows"]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        variants = list(dict.fromkeys(r["variant"] for r in mine))
        lines += [f"## {model}", ""]
        body = []
        for case in dict.fromkeys(r["case"] for r in mine):
            cells = {r["variant"]: r for r in mine if r["case"] == case}
            kind = next(iter(cells.values()))["kind"]
            row = [f"{Path(case).stem} ({kind})"]
            for v in variants:
                r = cells.get(v)
                if r is None:
                    row.append("-")
                    continue
                ratio = f" ({r['speedup_vs_faithful']:.2f}x)" if r["speedup_vs_faithful"] and v != "faithful" else ""
                row.append(f"{r['median_s']:.2f}s{ratio}")
            body.append(row)
        lines.append(tabulate(body, headers=["case"] + variants, tablefmt="github", disable_numparse=True))
        lines.append("")
        body = []
        for v in variants:
            vr = [r for r in mine if r["variant"] == v]
            eff = [r["encoder_gflops"] for r in vr if r["encoder_gflops"]]
            frac = [r["encoder_peak_fraction"] for r in vr if r["encoder_peak_fraction"]]
            dice = [r["min_dice_vs_faithful"] for r in vr if r["min_dice_vs_faithful"] is not None]
            ratios = [r["speedup_vs_faithful"] for r in vr if r["speedup_vs_faithful"]]
            by_kind = {}
            for r in vr:
                if r["speedup_vs_faithful"]:
                    by_kind.setdefault(r["kind"], []).append(r["speedup_vs_faithful"])
            body.append([
                v,
                ", ".join(f"{k} {statistics.geometric_mean(x):.2f}x" for k, x in by_kind.items()) if ratios else "-",
                f"{max(r['peak_rss_mb'] for r in vr):.0f} MB (+{max(r['case_mb'] for r in vr):.0f})",
                f"{statistics.median(eff):.0f} GFLOP/s ({statistics.median(frac):.0%})" if eff and frac else
                (f"{statistics.median(eff):.0f} GFLOP/s" if eff else "-"),
                f"{min(dice):.4f}" if dice else ("reference" if v == "faithful" else "-"),
            ])
        lines.append(tabulate(body, headers=["variant", "speed-up (geometric mean by kind)", "peak RSS (+case)",
                                             "encoder", "min Dice vs faithful"],
                              tablefmt="github", disable_numparse=True))
        lines.append("")
    if result["notes"]:
        lines += ["Not run:", ""] + [f"- {k}: {v}" for k, v in result["notes"].items()] + [""]
    return "\n".join(lines)
