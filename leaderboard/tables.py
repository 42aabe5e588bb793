"""Leaderboard tables from a run folder (``results.jsonl`` + ``models.json``).

Two tables, shaped like the seed tables of the MedficientSAM / reproduction READMEs:

1. per model: Method, Res, Params, FLOPs, DSC, NSD, 2D/3D runtime, 2D/3D memory, cases;
2. per modality x model: DSC / NSD.

Under each measured row, the figures a segmenter's plugin declares as published
(:class:`harness.plugin_api.Reported`) appear as separate rows marked *(published)* and
*(published, reproduced)*, and as extra columns of the per-modality table; they are never
averaged with or substituted for measurements. ``reported=False`` leaves them out.

Aggregation follows the published tables: DSC and NSD (in %) are the **unweighted mean of the
per-modality means**, so a modality with many cases counts as much as one with few. A case whose
DSC is undefined (NaN: a label absent from both ground truth and prediction, stored as null) is
left out of the means and counted in the ``NaN`` column. Runtime is the mean seconds per case;
memory is the largest per-case peak RSS, per dimension. Only successful cases enter any figure;
errors are counted beside them.

Every DSC and NSD figure carries a seeded bootstrap 95% interval, and three sections say what the
numbers mean (:mod:`leaderboard.stats`): paired comparisons of every two entries (the mean paired
difference with its interval, Wilcoxon's signed-rank test Holm-corrected over the pairs, a verdict), a
challenge-style ranking with its bootstrap stability, and the figures (:mod:`leaderboard.plots`), PNG
files written beside the markdown and linked from it.

A segmenter run under more than one ``--runner`` (native in-process, subprocess, docker: separate
entries such as ``litemedsam[docker]``) also gets a "Runner overhead" table: its mean seconds per case
under each runner on the cases all of them finished, and the mean per-case differences.

Entries of a box-jitter sweep (``model[jitter=L]``) also get a "Box robustness" table and curve, and
entries of the interactive protocol an "Interactive protocol" table and DSC-per-step curve
(:mod:`leaderboard.prompts`); both are in ``summary.json`` too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from harness.results import (
    RESULTS_FILE,
    latest_records,
    read_models,
    read_records,
    write_json_atomic,
    write_text_atomic,
)
from leaderboard import prompts, stats


@dataclass
class BoardOptions:
    """How the statistics of a leaderboard are computed: bootstrap resamples and seed, ranking weights."""

    bootstrap: int = stats.DEFAULT_RESAMPLES
    seed: int = stats.DEFAULT_SEED
    rank_weights: dict[str, float] = field(default_factory=lambda: dict(stats.DEFAULT_RANK_WEIGHTS))


def load_results(out_dir: str | Path) -> tuple[pd.DataFrame, dict[str, dict]]:
    """The latest record per (model, case) as a DataFrame, and the models.json entries."""
    out_dir = Path(out_dir)
    records = latest_records(read_records(out_dir / RESULTS_FILE))
    columns = ["model", "case", "modality", "dim", "status", "dsc", "nsd", "seconds", "peak_rss_mb",
               "timing_mode", "runner", "threads", "path", "segmenter"]
    frame = pd.DataFrame.from_records(records)
    for col in columns:
        if col not in frame:
            frame[col] = None
    for col in ("dsc", "nsd", "seconds", "peak_rss_mb") + tuple(d for d in DISTANCES if d in frame):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame, read_models(out_dir)


def _fmt_count(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    if n == 0:
        return "0"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:.0f}"


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


#: Optional distance metrics (``harness run --metrics``), in mm, lower is better; shown where recorded.
DISTANCES = ("hd95", "masd")


def distance_metrics(frame: pd.DataFrame) -> list[str]:
    """The optional distance metrics some record of ``frame`` carries a value of."""
    return [d for d in DISTANCES if d in frame and frame[d].notna().any()]


def modality_means(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model x modality: mean DSC and NSD (fractions) over successful cases with a defined DSC, and counts."""
    ok = frame[frame["status"] == "ok"]
    scored = ok[ok["dsc"].notna()]
    grouped = scored.groupby(["model", "modality"], sort=True)
    table = grouped[["dsc", "nsd"] + distance_metrics(frame)].mean()
    table["cases"] = grouped.size()
    return table.reset_index()


def model_summary(frame: pd.DataFrame, models: dict[str, dict]) -> pd.DataFrame:
    """One row per model with the aggregate figures (fractions and seconds, unformatted)."""
    rows = []
    per_modality = modality_means(frame)
    order = list(dict.fromkeys(list(models) + frame["model"].dropna().tolist()))
    for model in order:
        sub = frame[frame["model"] == model]
        if sub.empty:
            continue
        ok = sub[sub["status"] == "ok"]
        mods = per_modality[per_modality["model"] == model]
        info = models.get(model, {})
        path = execution_path(ok if not ok.empty else sub, info)
        title = info.get("title", model)
        tags = info.get("tags")
        if tags is None:  # results written before variants were tagged
            tags = [path] if path and path != "faithful" else []
        row = {
            "model": model,
            "segmenter": info.get("segmenter", model),
            "title": title,
            "path": path,
            "tags": ",".join(tags),
            "method": f"{title} [{', '.join(tags)}]" if tags else title,
            "resolution": info.get("resolution"),
            "params": info.get("params"),
            "flops": info.get("flops"),
            **{d: mods[d].mean() if not mods.empty else float("nan") for d in distance_metrics(frame)},
            "dsc": mods["dsc"].mean() if not mods.empty else float("nan"),
            "nsd": mods["nsd"].mean() if not mods.empty else float("nan"),
            "modalities": len(mods),
            "cases": len(sub),
            "ok": len(ok),
            "errors": int((sub["status"] != "ok").sum()),
            "nan_dsc": int((ok["dsc"].isna() & _has_gt(ok)).sum()),
        }
        modes = sub["timing_mode"].dropna()
        row["timing_mode"] = modes.mode().iloc[0] if not modes.empty else None
        for dim in ("2D", "3D"):
            part = ok[ok["dim"] == dim]
            row[f"runtime_{dim}"] = part["seconds"].mean() if not part.empty else float("nan")
            row[f"memory_{dim}"] = part["peak_rss_mb"].max() if not part.empty else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def execution_path(records: pd.DataFrame, info: dict) -> str | None:
    """The execution path (``--path``) behind a model's row: the paths its records name
    ("fast+faithful" when a resumed run mixed them), else the one models.json records; None for a
    segmenter without execution paths (a baseline)."""
    if "path" not in info:
        return None
    paths = sorted({str(p) for p in records.get("path", pd.Series(dtype=object)).dropna()})
    if not paths:
        return str(info.get("path") or "faithful")
    return "+".join(paths)


def _has_gt(frame: pd.DataFrame) -> pd.Series:
    if "dsc_per_label" in frame:
        return frame["dsc_per_label"].notna()
    return pd.Series(False, index=frame.index)


def render_markdown(out_dir: str | Path, reported: bool = True, options: BoardOptions | None = None) -> str:
    """The leaderboard of a run folder as markdown; ``reported`` adds the published reference rows."""
    frame, models = load_results(out_dir)
    return _markdown(frame, models, reported=reported, analysis=analyse(frame, models, options or BoardOptions()))


REPORTED_TAG = "*(published)*"
REPRODUCED_TAG = "*(published, reproduced)*"


def _markdown(frame: pd.DataFrame, models: dict[str, dict], reported: bool = True,
              analysis: Analysis | None = None, figures: dict[str, str] | None = None) -> str:
    if frame.empty:
        return "# Leaderboard\n\nNo results yet.\n"
    analysis = analysis or analyse(frame, models, BoardOptions())
    summary = analysis.summary
    lines = ["# Leaderboard", ""]
    modes = sorted({f"{r} / {t}" for r, t in zip(frame["runner"].fillna("?"), frame["timing_mode"].fillna("?"))})
    threads = sorted({int(t) for t in frame["threads"].dropna()})
    lines.append(
        f"Runner / timing mode: {', '.join(modes)}; CPU threads: {', '.join(map(str, threads)) or '-'}. "
        "DSC and NSD in %, the unweighted mean of the per-modality means, with a bootstrap 95% confidence "
        f"interval in brackets ({analysis.options.bootstrap} resamples of the cases within each modality, seed "
        f"{analysis.options.seed}); runtime is the mean seconds per case, "
        "memory the largest per-case peak RSS. FLOPs count multiply-accumulates for one image and one box at the "
        "model's resolution (the published tables' unit)."
    )
    if distance_metrics(frame):
        lines.append("")
        lines.append(
            "HD95 (95th-percentile Hausdorff distance) and MASD (mean average surface distance): lower is better, "
            "in mm with the case spacing (pixels for 2D cases), averaged as DSC is (`harness run --metrics`)."
        )
    default_backends = _untagged_backends(frame, summary)
    if default_backends:
        lines.append("")
        lines.append(
            "Untagged rows of the torch segmenters ran the defaults: the fast execution path, fp32, backend "
            f"{' / '.join(default_backends)} (`--backend auto`: openvino where installed, else torch; "
            "each parity-tested against the upstream masks)."
        )
    if (summary["method"] != summary["title"]).any():
        lines.append("")
        lines.append(
            "Tags name how a row differs from those defaults: [faithful] the upstream call pattern on torch "
            "(`--path faithful`), [bf16] the encoder in bfloat16 (`--precision bf16`), [torch] / [onnxruntime] / "
            "[openvino] the backend (`--backend`), [subprocess] / [docker] timed end to end per case (`--runner`). "
            "Results written before this tagging are tagged [fast] when fast."
        )
    carriers = _published_carriers(summary)
    if reported and any(_reported_of(models, m) for m in carriers):
        lines.append("")
        lines.append(
            f"Rows marked {REPORTED_TAG} are figures copied from the cited publications (other data subsets and "
            f"hardware), and {REPRODUCED_TAG} a third party's reproduction of them; they are references, not "
            "measurements of this run."
        )
    lines.append("")
    distances = distance_metrics(frame)
    headers = ["Method", "Res", "Params", "FLOPs", "DSC", "NSD"] + [f"{d.upper()} (mm)" for d in distances] + [
        "2D runtime", "3D runtime", "2D memory", "3D memory", "Cases"]
    body = []
    for _, r in summary.iterrows():
        cases = f"{r['ok']}/{r['cases']}"
        if r["errors"]:
            cases += f" ({r['errors']} errors)"
        if r["nan_dsc"]:
            cases += f" ({r['nan_dsc']} NaN)"
        body.append([
            r["method"],
            _fmt(r["resolution"], ".0f") if r["resolution"] else "-",
            _fmt_count(r["params"]),
            _fmt_count(r["flops"]),
            _fmt_estimate(analysis.overall(r["model"], "dsc"), r["dsc"], overall=True),
            _fmt_estimate(analysis.overall(r["model"], "nsd"), r["nsd"], overall=True),
            *[_fmt(r[d], ".2f") for d in distances],
            *_timed([_fmt(r["runtime_2D"], ".2f", "s"), _fmt(r["runtime_3D"], ".2f", "s"),
                     _fmt(r["memory_2D"], ".0f", "MB"), _fmt(r["memory_3D"], ".0f", "MB")], r["timing_mode"]),
            cases,
        ])
        rep = _reported_of(models, r["model"]) if reported and r["model"] in carriers else None
        if rep:  # the publications give no distances: blank cells in those columns
            body.extend(row[:6] + ["-"] * len(distances) + row[6:] for row in _reported_rows(r, rep))
    lines.append(tabulate(body, headers=headers, tablefmt="github", disable_numparse=True))
    if (summary["timing_mode"] == DISTRIBUTED).any():
        lines += ["", f"{DISTRIBUTED_MARK} Timing mode distributed (`--runner ray`): cases shared a node's CPUs with "
                      "other cases, so these runtimes and memory figures are not comparable with in-process or "
                      "end-to-end ones (`--ray-exclusive` times one case per node at a time)."]
    overhead = runner_overhead(frame, models)
    if not overhead.empty:
        lines += ["", "## Runner overhead (seconds per case)", "", _overhead_text(overhead)]
    for section in (prompts.robustness_markdown(prompts.robustness_table(frame)),
                    prompts.interactive_markdown(prompts.interactive_table(frame))):
        if section:
            lines += ["", section]
    for metric, label in (("dsc", "DSC"), ("nsd", "NSD")):
        lines += ["", f"## Per modality: {label} (%, bootstrap 95% CI)", ""]
        lines.append(_modality_table(frame, summary, analysis, metric, models if reported else {}))
    if any(e.cases < stats.MIN_CASES for by in analysis.cis.values() for est in by.values()
           for e in est["per_modality"].values()):
        lines += ["", f"A modality with fewer than {stats.MIN_CASES} cases gets no interval of its own (\"n=2, no "
                      "CI\"): a bootstrap of one or two cases says nothing; it is still resampled inside the average."]
    lines += ["", "## Paired comparisons (A - B, points of %)", "", _paired_text(analysis)]
    lines += ["", "## Challenge-style ranking", "", ranking_text(analysis.ranking, analysis.ranking_error)]
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{caption}]({name})" for name, caption in figures.items()]
    sources = _sources(summary, models) if reported else ""
    if sources:
        lines += ["", "## Sources of the published rows", "", sources]
    lines.append("")
    return "\n".join(lines)


@dataclass
class Analysis:
    """The statistics of one leaderboard (:mod:`leaderboard.stats`), computed once for markdown and JSON."""

    options: BoardOptions
    summary: pd.DataFrame  # model_summary(): one row per entry, in leaderboard order
    cis: dict[str, dict[str, dict]]
    paired: list[tuple[str, str, dict[str, stats.PairedMetric]]]
    ranking: stats.Ranking | None
    ranking_error: str | None = None

    @property
    def order(self) -> list[str]:
        return list(self.summary["model"]) if not self.summary.empty else []

    def overall(self, model: str, metric: str) -> stats.Estimate | None:
        return (self.cis.get(model) or {}).get(metric, {}).get("overall")

    def modality(self, model: str, metric: str, modality: str) -> stats.Estimate | None:
        return (self.cis.get(model) or {}).get(metric, {}).get("per_modality", {}).get(modality)


def analyse(frame: pd.DataFrame, models: dict[str, dict], options: BoardOptions) -> Analysis:
    summary = model_summary(frame, models) if not frame.empty else pd.DataFrame(columns=["model"])
    order = list(summary["model"])
    cis = stats.bootstrap_cis(frame, options.bootstrap, options.seed) if order else {}
    scored = [m for m in order if m in cis]
    paired = stats.paired_comparisons(frame, scored, options.bootstrap, options.seed)
    ranking, error = rank(frame, order, options)
    return Analysis(options, summary, cis, paired, ranking, error)


def rank(frame: pd.DataFrame, order: list[str], options: BoardOptions) -> tuple[stats.Ranking | None, str | None]:
    """The challenge-style ranking of the entries in ``order``, or why there is none."""
    if not order:
        return None, "no results"
    try:
        return stats.rank_models(frame, order, options.rank_weights, options.bootstrap, options.seed), None
    except ValueError as exc:
        return None, str(exc)


def _fmt_estimate(est: stats.Estimate | None, value: float | None = None, overall: bool = False) -> str:
    """``70.75 [68.12-73.49]`` (in %); ``(n=2, no CI)`` where the modality has too few cases."""
    if est is None or est.cases == 0:
        return _fmt(None if value is None else value * 100, ".2f")
    text = f"{est.value * 100:.2f}"
    if not est.has_interval:
        return f"{text} (no CI: n<{stats.MIN_CASES} per modality)" if overall else f"{text} (n={est.cases}, no CI)"
    return f"{text} [{est.lo * 100:.2f}-{est.hi * 100:.2f}]"


def fmt_difference(est: stats.Estimate) -> str:
    """``-0.52 [-1.10, +0.05]`` (points of %)."""
    if est.cases == 0 or math.isnan(est.value):
        return "-"
    text = f"{est.value * 100:+.2f}"
    if not est.has_interval:
        return f"{text} (n={est.cases}, no CI)"
    return f"{text} [{est.lo * 100:+.2f}, {est.hi * 100:+.2f}]"


def fmt_p(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _paired_text(analysis: Analysis) -> str:
    if len(analysis.paired) == 0:
        return "One entry only: nothing to compare."
    intro = ("Every two entries on the cases both finished with a score: the mean paired difference A - B "
             "(aggregated as above: the mean over modalities of the per-modality mean differences) with its "
             "bootstrap 95% CI (case pairs resampled within each modality), the p-value of Wilcoxon's "
             f"signed-rank test on the per-case differences, Holm-corrected over the {len(analysis.paired)} "
             "pair(s) of this table, and the verdict at 5%. `harness compare OUT A B` shows one pair per "
             "modality, with a non-inferiority margin (`--margin`).")
    headers = ["A", "B", "Cases", "DSC A - B [95% CI]", "p (Holm)", "DSC: A is", "NSD A - B [95% CI]", "p (Holm)",
               "NSD: A is"]
    body = []
    for a, b, res in analysis.paired:
        row = [f"`{a}`", f"`{b}`", str(res["dsc"].effect.cases)]
        for metric in ("dsc", "nsd"):
            m = res[metric]
            row += [fmt_difference(m.effect), fmt_p(m.p_holm), m.verdict]
        body.append(row)
    return intro + "\n\n" + tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


def ranking_text(ranking: stats.Ranking | None, error: str | None = None) -> str:
    if ranking is None:
        return f"No ranking: {error}."
    weights = ", ".join(f"{k}={v:g}" for k, v in ranking.weights.items())
    intro = ("Challenge-style, not the official CVPR 2024 rule (which is not published as code). Rank then "
             f"aggregate: on each of the {ranking.cases} cases every metric ranks the entries (ties share "
             "their mean rank; a failed or missing case takes the worst value), and an entry's score is its "
             f"mean rank over cases and metrics, weighted {weights}; the lowest score ranks first. Aggregate "
             "then rank: each metric's aggregate is ranked instead. Stability: the cases are resampled within "
             f"each modality {ranking.resamples} times and ranked again; P(same) is how often the entry keeps "
             "its rank, P(1st) how often it ranks first.")
    metric_names = {"dsc": "DSC", "nsd": "NSD", "time": "runtime", "hd95": "HD95", "masd": "MASD"}
    headers = (["Rank", "Entry", "Score"] + [f"Mean rank {metric_names[m]}" for m in ranking.weights]
               + ["Aggregate-then-rank", "P(same)", "P(1st)"])
    body = []
    for model in ranking.rank.sort_values(kind="stable").index:
        body.append([str(ranking.rank[model]), f"`{model}`", f"{ranking.score[model]:.2f}"]
                    + [f"{ranking.mean_ranks.loc[model, m]:.2f}" for m in ranking.weights]
                    + [str(ranking.aggregate_rank[model]), f"{ranking.keeps_rank[model]:.2f}",
                       f"{ranking.first[model]:.2f}"])
    return intro + "\n\n" + tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


DISTRIBUTED_MARK = "(d)"


def _timed(cells: list[str], timing_mode: str | None) -> list[str]:
    """Runtime and memory cells, marked where the figures come from a distributed run."""
    if timing_mode != DISTRIBUTED:
        return cells
    return [f"{c} {DISTRIBUTED_MARK}" if c != "-" else c for c in cells]


def _untagged_backends(frame: pd.DataFrame, summary: pd.DataFrame) -> list[str]:
    """The backends the records of untagged rows with an execution path name (sorted, distinct)."""
    if "backend" not in frame:
        return []
    plain = summary[(summary["tags"] == "") & summary["path"].notna()]["model"]
    return sorted({str(b) for b in frame[frame["model"].isin(plain)]["backend"].dropna()})


#: Labels and order of the built-in runners, for run folders written before models.json recorded them
#: (each entry's ``runner_label`` / ``runner_order``, written by the driver for every runner, plugins' too).
BUILTIN_RUNNER_FACTS = {"native": ("in-process", 0), "subprocess": ("subprocess", 10), "docker": ("docker", 20),
                        "ray": ("ray (distributed)", 30)}
DISTRIBUTED = "distributed"


def runner_facts(models: dict[str, dict]) -> dict[str, tuple[str, int]]:
    """``{runner: (label, order)}`` of the runners named in models.json, built-ins always included."""
    facts = dict(BUILTIN_RUNNER_FACTS)
    for info in models.values():
        name = info.get("runner")
        if name and info.get("runner_label") is not None:
            facts[name] = (str(info["runner_label"]), int(info.get("runner_order", 100)))
    return facts


def overhead_pairs(runners: list[str]) -> list[tuple[str, str]]:
    """The differences the overhead table shows, for runners in table order: each runner minus the one
    before it, then each later runner minus the first (subprocess - in-process, docker - subprocess,
    docker - in-process for the built-ins)."""
    pairs = [(runners[i + 1], runners[i]) for i in range(len(runners) - 1)]
    return pairs + [(r, runners[0]) for r in runners[2:]]


def runner_overhead(frame: pd.DataFrame, models: dict[str, dict]) -> pd.DataFrame:
    """Per segmenter run under more than one runner (same other choices: path, precision, backend):
    the mean seconds per case under each runner, on the cases every one of them finished, and the
    mean per-case differences (:func:`overhead_pairs`). Entries timed ``distributed`` (cases sharing a
    node's CPUs) are left out: their times are not comparable. The frame's ``attrs["runners"]`` lists
    the runners of its columns, in order."""
    ok = frame[(frame["status"] == "ok") & frame["seconds"].notna()]
    facts = runner_facts(models)
    groups: dict[tuple[str, tuple[str, ...]], dict[str, str]] = {}
    for model in dict.fromkeys(ok["model"].dropna()):
        sub = ok[ok["model"] == model]
        runners = sub["runner"].dropna()
        runner = runners.mode().iloc[0] if not runners.empty else "native"
        modes = sub["timing_mode"].dropna()
        if not modes.empty and modes.mode().iloc[0] == DISTRIBUTED:
            continue
        info = models.get(model, {})
        segmenter = info.get("segmenter") or (sub["segmenter"].dropna().iloc[0]
                                              if "segmenter" in sub and sub["segmenter"].notna().any() else model)
        base = tuple(t for t in (info.get("tags") or []) if t != runner)
        groups.setdefault((segmenter, base), {}).setdefault(runner, model)
    groups = {key: by_runner for key, by_runner in groups.items() if len(by_runner) >= 2}
    present = sorted({r for by_runner in groups.values() for r in by_runner},
                     key=lambda r: (facts.get(r, (r, 100))[1], r))
    pairs = overhead_pairs(present)
    rows = []
    for (segmenter, base), by_runner in groups.items():
        times = {runner: ok[ok["model"] == model].set_index("case")["seconds"] for runner, model in by_runner.items()}
        shared = sorted(set.intersection(*(set(t.index) for t in times.values())))
        some = next(iter(by_runner.values()))
        title = models.get(some, {}).get("title") or segmenter
        row = {"segmenter": segmenter, "method": f"{title} [{', '.join(base)}]" if base else title,
               "cases": len(shared), "entries": dict(by_runner)}
        for runner in present:
            row[runner] = float(times[runner].loc[shared].mean()) if runner in times and shared else float("nan")
        for a, b in pairs:
            if a in times and b in times and shared:
                row[f"{a}-{b}"] = float((times[a].loc[shared] - times[b].loc[shared]).mean())
            else:
                row[f"{a}-{b}"] = float("nan")
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs["runners"] = present
    table.attrs["labels"] = {r: facts.get(r, (r, 100))[0] for r in present}
    return table


def _overhead_text(overhead: pd.DataFrame) -> str:
    intro = ("The same segmenter under each runner, on the cases all its runners finished: in-process times the "
             "segmentation alone (the model loaded once); end-to-end runners (subprocess, docker) time one whole "
             "run per case (process or container start, imports, model load, reading the case, writing the "
             "output), as the challenge times a submission. The differences are means of the per-case "
             "differences.")
    runners, labels = overhead.attrs["runners"], overhead.attrs["labels"]
    pairs = overhead_pairs(runners)
    headers = ["Method", "Cases"] + [labels[r] for r in runners] + [f"{labels[a]} - {labels[b]}" for a, b in pairs]
    body = []
    for _, r in overhead.iterrows():
        body.append([r["method"], str(r["cases"])] + [_fmt(r[runner], ".2f", "s") for runner in runners]
                    + [_fmt(r[f"{a}-{b}"], "+.2f", "s") for a, b in pairs])
    return intro + "\n\n" + tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


def _published_carriers(summary: pd.DataFrame) -> set[str]:
    """The rows that carry a segmenter's published figures: one per segmenter (its untagged row, else
    its first), so that variants of one model do not repeat them."""
    carriers: dict[str, str] = {}
    for _, r in summary.iterrows():
        seg = r["segmenter"]
        if seg not in carriers or (not r["tags"] and carriers[seg] != seg):
            carriers[seg] = r["model"]
    return set(carriers.values())


def _reported_of(models: dict[str, dict], model: str) -> dict | None:
    rep = (models.get(model) or {}).get("reported")
    return rep or None


def _reported_rows(r: pd.Series, rep: dict) -> list[list[str]]:
    """The published row (and the reproduced one, where there is one) under a measured row."""
    params = rep.get("params_m")
    rows = [[
        f"{r['title']} {REPORTED_TAG}",
        _fmt(r["resolution"], ".0f") if r["resolution"] else "-",
        _fmt(params, ".2f", "M"),
        _fmt(rep.get("gflops"), ".2f", "G"),
        _fmt(rep.get("dsc"), ".2f"),
        _fmt(rep.get("nsd"), ".2f"),
        _fmt(rep.get("runtime_2d_s"), ".1f", "s"),
        _fmt(rep.get("runtime_3d_s"), ".1f", "s"),
        _fmt(rep.get("memory_2d_mb"), ".0f", "MB"),
        _fmt(rep.get("memory_3d_mb"), ".0f", "MB"),
        "published",
    ]]
    if rep.get("dsc_reproduced") is not None or rep.get("nsd_reproduced") is not None:
        rows.append([f"{r['title']} {REPRODUCED_TAG}", "", "", "", _fmt(rep.get("dsc_reproduced"), ".2f"),
                     _fmt(rep.get("nsd_reproduced"), ".2f"), "", "", "", "", "published"])
    return rows


def _modality_table(frame: pd.DataFrame, summary: pd.DataFrame, analysis: Analysis, metric: str,
                    models: dict[str, dict] | None = None) -> str:
    """Modalities x entries of one metric (%, with intervals), plus the published columns of that metric."""
    per_modality = modality_means(frame)
    titles = dict(zip(summary["model"], summary["title"]))
    methods = dict(zip(summary["model"], summary["method"]))
    measured = list(summary["model"])
    modalities = sorted(per_modality["modality"].dropna().unique())
    column = 0 if metric == "dsc" else 1  # published figures are (DSC, NSD) pairs
    # published per-modality columns, for the modalities this run measured
    published: list[tuple[str, dict]] = []
    carriers = _published_carriers(summary)
    for model in measured:
        if model not in carriers:
            continue
        rep = _reported_of(models or {}, model) or {}
        for key, tag in (("per_modality", REPORTED_TAG), ("per_modality_reproduced", REPRODUCED_TAG)):
            table = rep.get(key) or {}
            if any(m in table for m in modalities):
                published.append((f"{titles[model]} {tag}", table))
    body = []
    for modality in modalities:
        row = [modality]
        counts = set()
        for model in measured:
            cell = per_modality[(per_modality["model"] == model) & (per_modality["modality"] == modality)]
            if cell.empty:
                row.append("-")
            else:
                counts.add(int(cell.iloc[0]["cases"]))
                row.append(_fmt_estimate(analysis.modality(model, metric, modality), cell.iloc[0][metric]))
        for _, table in published:
            pair = table.get(modality)
            row.append(f"{pair[column]:.2f}" if pair else "-")
        row.insert(1, "/".join(str(c) for c in sorted(counts)) or "-")
        body.append(row)
    average = ["Average", ""]
    for _, r in summary.iterrows():
        average.append(_fmt_estimate(analysis.overall(r["model"], metric), r[metric], overall=True))
    average += ["-"] * len(published)  # published averages cover other modalities: see the main table
    body.append(average)
    headers = ["Modality", "Cases"] + [methods[m] for m in measured] + [title for title, _ in published]
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


def _sources(summary: pd.DataFrame, models: dict[str, dict]) -> str:
    lines = []
    carriers = _published_carriers(summary)
    for model, title in zip(summary["model"], summary["title"]):
        rep = _reported_of(models, model) if model in carriers else None
        if not rep:
            continue
        hardware = f"; timings on {rep['hardware']}" if rep.get("hardware") else ""
        lines.append(f"- {title}: {rep.get('source') or 'unknown source'}{hardware}.")
    return "\n".join(lines)


def summary_json(out_dir: str | Path, options: BoardOptions | None = None) -> dict:
    """Machine-readable twin of the markdown: per model aggregates with intervals, per modality means,
    paired comparisons and the ranking."""
    frame, models = load_results(out_dir)
    return _summary(frame, models, analyse(frame, models, options or BoardOptions()))


def _interval(est: stats.Estimate | None) -> list[float] | None:
    return [est.lo, est.hi] if est is not None and est.has_interval else None


def _summary(frame: pd.DataFrame, models: dict[str, dict], analysis: Analysis) -> dict:
    if frame.empty:
        return {"models": []}
    summary = analysis.summary
    per_modality = modality_means(frame)
    out = []
    for _, r in summary.iterrows():
        mods = per_modality[per_modality["model"] == r["model"]]
        entry = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
        entry = {k: (v.item() if hasattr(v, "item") else v) for k, v in entry.items()}
        for metric in ("dsc", "nsd"):
            entry[f"{metric}_ci"] = _interval(analysis.overall(r["model"], metric))
        entry["per_modality"] = {
            m["modality"]: {"dsc": float(m["dsc"]), "nsd": float(m["nsd"]), "cases": int(m["cases"]),
                            **{f"{metric}_ci": _interval(analysis.modality(r["model"], metric, m["modality"]))
                               for metric in ("dsc", "nsd")}}
            for _, m in mods.iterrows()
        }
        out.append(entry)
    overhead = runner_overhead(frame, models)
    rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in overhead.to_dict("records")]
    options = analysis.options
    return {
        "models": out,
        "runner_overhead": rows,
        "bootstrap": {"resamples": options.bootstrap, "seed": options.seed, "confidence": stats.CONFIDENCE,
                      "min_cases": stats.MIN_CASES, "statistic": "unweighted mean of the per-modality means"},
        "paired": [{"a": a, "b": b, **{metric: res[metric].as_dict() for metric in res}}
                   for a, b, res in analysis.paired],
        "ranking": analysis.ranking.as_dict() if analysis.ranking is not None else None,
        "robustness": prompts.robustness_json(prompts.robustness_table(frame)),
        "interactive": prompts.interactive_json(prompts.interactive_table(frame)),
    }


FIGURES = {
    "modality-ci": "Per-modality DSC and NSD with bootstrap 95% CIs",
    "runtime-dsc": "Runtime vs DSC, Pareto front",
    "rank-stability": "Rank stability over bootstrap resamples",
    "robustness": "Box robustness: DSC per jitter level",
    "interactive-steps": "Interactive protocol: mean DSC per step",
}


def write_figures(frame: pd.DataFrame, models: dict[str, dict], analysis: Analysis, folder: Path,
                  stem: str = "leaderboard") -> dict[str, str]:
    """Write the leaderboard's PNG figures into ``folder`` as ``<stem>-<figure>.png``; return
    ``{file name: caption}`` of those written (a figure without data is left out)."""
    from leaderboard import plots

    written: dict[str, str] = {}
    summary = analysis.summary
    points = []
    ok = frame[frame["status"] == "ok"]
    for _, r in summary.iterrows():
        sub = ok[ok["model"] == r["model"]]
        runners = sub["runner"].dropna()
        if sub["seconds"].notna().any() and not math.isnan(r["dsc"]):
            points.append({"model": r["model"], "runner": runners.mode().iloc[0] if not runners.empty else "native",
                           "seconds": float(sub["seconds"].mean()), "dsc": float(r["dsc"])})
    colors = plots.model_colors(analysis.order)  # one colour per entry in every figure
    jobs = [
        ("modality-ci", plots.plot_modality_ci, stats.ci_table(analysis.cis)),
        ("runtime-dsc", plots.plot_runtime_vs_dsc, pd.DataFrame(points, columns=["model", "runner", "seconds", "dsc"])),
    ]
    if analysis.ranking is not None:
        ranking = analysis.ranking
        order = ranking.rank.sort_values(kind="stable").index
        jobs.append(("rank-stability", lambda data, path, colors: plots.plot_rank_stability(data, path, ranking.rank,
                                                                                           colors),
                     ranking.stability.loc[order]))
    for key, data, xlabel, title in (
            ("robustness", prompts.robustness_curves(prompts.robustness_table(frame)), "box jitter level (px)",
             "DSC (mean of modalities) per box jitter level"),
            ("interactive-steps", prompts.interactive_step_curves(frame), "step (1: box, then one click each)",
             "interactive protocol: mean DSC per step")):
        if not data.empty:
            jobs.append((key, lambda d, path, colors, x=xlabel, t=title: plots.plot_curves(d, path, x, "DSC (%)", t,
                                                                                           colors), data))
    for key, plot, data in jobs:
        name = f"{stem}-{key}.png"
        try:
            plot(data, folder / name, colors=colors)
        except ValueError:  # nothing to draw (e.g. no scored case)
            continue
        written[name] = FIGURES[key]
    return written


def write_leaderboard(out_dir: str | Path, output: str | Path | None = None, reported: bool = True,
                      options: BoardOptions | None = None, figures: bool = True) -> Path:
    """Write ``leaderboard.md`` (and ``summary.json``, and the figures beside the markdown) for a run
    folder; return the markdown path.

    ``reported=False`` leaves out the published reference rows and columns; ``figures=False`` the PNGs.
    """
    out_dir = Path(out_dir)
    target = Path(output) if output else out_dir / "leaderboard.md"
    frame, models = load_results(out_dir)
    analysis = analyse(frame, models, options or BoardOptions())
    drawn = write_figures(frame, models, analysis, target.parent, target.stem) if figures and not frame.empty else {}
    write_text_atomic(target, _markdown(frame, models, reported=reported, analysis=analysis, figures=drawn))
    write_json_atomic(out_dir / "summary.json", _summary(frame, models, analysis))
    return target
