"""Two 3D click rules of the built-in SAM-family models compared on the 2025 interactive protocol, side by side
in one run: ``resume`` (the harness's rule: the clicked slice is decoded again and propagation resumes from it)
and ``slice`` (only the clicked slice is decoded again; ``BoxPromptEngine.segment_with_clicks(...,
propagate=False)``).

    python bench/bench_click_rules.py --data CONVERTED [--model litemedsam] [--clicks 5] [--threads 1]
        [--backend openvino] [--limit N] [--out FILE.md]

``CONVERTED`` is a folder made by ``harness convert --to interactive`` (``imgs/`` and ``gts/``). Every case runs
through the protocol once per rule (:func:`harness.interactive.protocol.run_interactive_case`: the same click
simulation, scores and AUC as ``harness run --protocol interactive``), each rule on its own chain of
predictions and clicks. A case's slice embeddings are computed once and reused by both rules and every step
(the embeddings depend on the slice alone, so the masks are the ones a fresh run gives; only the time is not
the protocol's, and none is reported).

Printed: per modality and overall (the mean of the modalities, as the challenge averages), the DSC after the
box step and after the last click, DSC_AUC and NSD_AUC; how many clicks raised, lowered or kept (within
0.001) the case's DSC; how many cases ended above, below or within 0.005 of their box step; and, per case,
``slice`` against ``resume`` on DSC_AUC, NSD_AUC and the last DSC: cases better / worse, the median
difference and the two-sided Wilcoxon signed-rank test's p (scipy.stats.wilcoxon, zero differences dropped).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RULES = {"resume": True, "slice": False}  # rule -> segment_with_clicks(propagate=...)


def _memoised_slices(engine) -> dict:
    """Make ``engine.encode_slice`` keep every slice embedding of the current case in a dict (returned; clear
    it between cases)."""
    memo: dict = {}
    original = engine.encode_slice

    def encode_slice(z):
        key = engine._slice_key(z)
        if key is None:
            return original(z)
        if key not in memo:
            memo[key] = original(z)
        return memo[key]

    engine.encode_slice = encode_slice
    return memo


def compare_rules(segmenter, cases: list[Path], gts_dir: Path, clicks: int, log=lambda line: None) -> dict:
    """``{rule: [(modality, InteractiveResult), ...]}``: every case through the protocol once per rule, with a
    loaded SAM-family segmenter (one with an ``engine``)."""
    from harness.cases import modality_from_name
    from harness.interactive.protocol import run_interactive_case
    from harness.interactive.run import case_from_input
    from harness.interactive.safe_npz import read_interactive_input

    engine = segmenter.engine
    memo = _memoised_slices(engine)
    results: dict[str, list] = {rule: [] for rule in RULES}
    try:
        with tempfile.TemporaryDirectory(prefix="click-rules-") as tmp:
            for n, case_path in enumerate(cases, 1):
                memo.clear()
                for rule, propagate in RULES.items():

                    def step(input_path: Path, outputs_dir: Path, propagate=propagate):
                        case = case_from_input(read_interactive_input(input_path), segmenter.prompts)
                        if case.clicks:
                            return engine.segment_with_clicks(case.imgs, case.boxes, case.clicks, case.prev_segs,
                                                              propagate=propagate)
                        return engine.segment(case.imgs, case.boxes)

                    result = run_interactive_case(case_path, gts_dir / case_path.name, step,
                                                  Path(tmp) / rule / case_path.stem, n_clicks=clicks)
                    results[rule].append((modality_from_name(case_path.name), result))
                line = "  ".join(f"{rule} " + " ".join(f"{d:.3f}" for d in results[rule][-1][1].dsc_per_step)
                                 for rule in RULES)
                log(f"[{n}/{len(cases)}] {case_path.name}: {line}")
    finally:
        memo.clear()
        del engine.encode_slice  # the engine's own method again
    return results


def _summary(results: list, name: str) -> list[str]:
    by_modality: dict[str, list] = {}
    for modality, result in results:
        by_modality.setdefault(modality, []).append(result)
    modalities = sorted(by_modality)

    def cell(values_of) -> list[str]:
        means = [statistics.fmean(values_of(r) for r in by_modality[m]) for m in modalities]
        return [f"{v:.2f}" for v in means] + [f"{statistics.fmean(means):.2f}"]

    rows = [
        (f"{name}: DSC after the box step", cell(lambda r: 100 * r.dsc_per_step[0])),
        (f"{name}: DSC after the last click", cell(lambda r: 100 * r.dsc_per_step[-1])),
        (f"{name}: DSC_AUC", cell(lambda r: r.dsc_auc)),
        (f"{name}: NSD_AUC", cell(lambda r: r.nsd_auc)),
    ]
    return [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]


def _click_effects(results: list) -> tuple[int, int, int, int, int, int]:
    up = down = flat = 0
    higher = lower = same = 0
    for _, result in results:
        dscs = result.dsc_per_step
        for before, after in zip(dscs, dscs[1:]):
            if after > before + 0.001:
                up += 1
            elif after < before - 0.001:
                down += 1
            else:
                flat += 1
        change = dscs[-1] - dscs[0]
        higher += change > 0.005
        lower += change < -0.005
        same += abs(change) <= 0.005
    return up, down, flat, higher, lower, same


def _paired(results: dict) -> list[str]:
    """Per case, ``slice`` minus ``resume``: better / worse, the median difference, Wilcoxon's p."""
    import numpy as np
    from scipy.stats import wilcoxon

    lines = []
    for label, value in (("DSC_AUC", lambda r: r.dsc_auc), ("NSD_AUC", lambda r: r.nsd_auc),
                         ("DSC after the last click", lambda r: r.dsc_per_step[-1])):
        diff = np.array([value(b) - value(a) for (_, a), (_, b) in zip(results["resume"], results["slice"])])
        nonzero = diff[diff != 0]
        p = wilcoxon(nonzero).pvalue if len(nonzero) else float("nan")
        lines.append(f"| {label} | {int((diff > 0).sum())} / {int((diff < 0).sum())} | {np.median(diff):+.4f} | "
                     f"{p:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder from `harness convert --to interactive`")
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="openvino", help="as harness run --backend (default openvino)")
    parser.add_argument("--limit", type=int, default=None, help="first N cases by name")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args(argv)

    from harness.pluginmanager import HarnessPlugins
    from harness.plugin_api import LoadOptions
    from harness.profiling import cpu_name

    cases = sorted((args.data / "imgs").glob("*.npz"))[: args.limit]
    if not cases:
        parser.error(f"{args.data / 'imgs'}: no .npz cases (make them with harness convert --to interactive)")
    segmenter = HarnessPlugins().get(args.model).load(
        LoadOptions(weights=args.weights, threads=args.threads, path="fast", backend=args.backend))
    started = time.time()
    results = compare_rules(segmenter, cases, args.data / "gts", args.clicks, log=lambda line: print(line, flush=True))

    modalities = sorted({m for m, _ in results["resume"]})
    lines = [f"# Click rules: {args.model} ({args.backend}, {args.threads} thread(s)), {len(cases)} case(s), "
             f"{args.clicks} clicks, {cpu_name()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}", "",
             "| | " + " | ".join(modalities) + " | all (mean of modalities) |",
             "|---|" + "---|" * (len(modalities) + 1)]
    for rule in RULES:
        lines += _summary(results[rule], rule)
    lines += ["", "| rule | clicks that raised / lowered / kept the DSC | cases above / below / within 0.005 of "
              "their box step |", "|---|---|---|"]
    for rule in RULES:
        up, down, flat, higher, lower, same = _click_effects(results[rule])
        lines.append(f"| {rule} | {up} / {down} / {flat} | {higher} / {lower} / {same} |")
    lines += ["", "| slice against resume, per case | cases better / worse | median difference | Wilcoxon p |",
              "|---|---|---|---|", *_paired(results)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
