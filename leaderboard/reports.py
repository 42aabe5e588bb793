"""The text of ``harness compare`` (one pair in detail) and ``harness rank`` (the challenge-style ranking)."""
from __future__ import annotations

from pathlib import Path

from tabulate import tabulate

from leaderboard import stats
from leaderboard.tables import BoardOptions, fmt_difference, fmt_p, load_results, model_summary, rank, ranking_text

METRIC_LABELS = {"dsc": "DSC", "nsd": "NSD"}


def _entries(out_dir: Path) -> tuple:
    frame, models = load_results(out_dir)
    if frame.empty:
        raise ValueError(f"{out_dir}: no results yet")
    return frame, models, list(model_summary(frame, models)["model"])


def compare_report(out_dir: str | Path, a: str, b: str, metrics: tuple[str, ...] = stats.METRICS,
                   margin: float | None = None, options: BoardOptions | None = None) -> str:
    """A - B per modality and overall on each metric, with intervals, Wilcoxon p-values, the verdict, and
    (with ``margin``, in points of %) whether A is non-inferior to B."""
    options = options or BoardOptions()
    frame, _, entries = _entries(Path(out_dir))
    for name in (a, b):
        if name not in entries:
            raise ValueError(f"no entry '{name}' in {out_dir}; its entries: {', '.join(entries)}")
    if a == b:
        raise ValueError("compare two different entries")
    lines = [f"# {a} vs {b}", "",
             f"On the cases both finished with a score. DSC and NSD in %, A - B in points of %, with a bootstrap 95% "
             f"CI ({options.bootstrap} resamples of the case pairs within each modality, seed {options.seed}); "
             "p: Wilcoxon's signed-rank test on the per-case differences, two-sided, uncorrected (the "
             "leaderboard's paired table corrects over all its pairs)."]
    for metric in metrics:
        res = stats.compare_pair(frame, a, b, metric, options.bootstrap, options.seed)
        label = METRIC_LABELS.get(metric, metric.upper())
        lines += ["", f"## {label}", ""]
        if res.effect.cases == 0:
            lines.append(f"No case has a {label} for both entries.")
            continue
        body = []
        for modality, d in res.per_modality.items():
            est = stats.Estimate(d["value"], d["lo"], d["hi"], d["cases"])
            body.append([modality, str(d["cases"]), f"{d['mean_a'] * 100:.2f}", f"{d['mean_b'] * 100:.2f}",
                         fmt_difference(est), f"{d['wins']} / {d['losses']} / {d['ties']}", fmt_p(d["p"])])
        mean_a = sum(d["mean_a"] for d in res.per_modality.values()) / len(res.per_modality)
        mean_b = sum(d["mean_b"] for d in res.per_modality.values()) / len(res.per_modality)
        body.append(["Overall", str(res.effect.cases), f"{mean_a * 100:.2f}", f"{mean_b * 100:.2f}",
                     fmt_difference(res.effect), f"{res.wins} / {res.losses} / {res.ties}", fmt_p(res.p)])
        headers = ["Modality", "Cases", f"A: {a}", f"B: {b}", "A - B [95% CI]", "A better / worse / tied", "p"]
        lines.append(tabulate(body, headers=headers, tablefmt="github", disable_numparse=True))
        lines += ["", f"Verdict: {_verdict_sentence(a, b, res)}"]
        if margin is not None:
            lines.append(f"Non-inferiority (margin {margin:g} points): {_non_inferiority(a, b, res, margin)}")
    lines.append("")
    return "\n".join(lines)


def _verdict_sentence(a: str, b: str, res: stats.PairedMetric) -> str:
    word = res.verdict
    p = fmt_p(res.p)
    if word == stats.NOT_SEPARABLE:
        return f"{a} and {b} are not separable at 5% (p = {p})."
    return f"{a} is {word} than {b} (p = {p})."


def _non_inferiority(a: str, b: str, res: stats.PairedMetric, margin: float) -> str:
    answer = res.non_inferior(margin)
    if answer is None:
        return f"cannot say: too few cases for an interval ({res.effect.cases})."
    lo = res.effect.lo * 100
    if answer:
        return (f"yes: the lower 95% bound of A - B is {lo:+.2f} > -{margin:g}, so {a} is as accurate as {b} "
                f"within {margin:g} points.")
    return (f"no: the lower 95% bound of A - B is {lo:+.2f} <= -{margin:g}, so a loss of more than {margin:g} "
            f"points cannot be ruled out.")


def rank_report(out_dir: str | Path, options: BoardOptions | None = None) -> str:
    """The challenge-style ranking of a run folder's entries, with its bootstrap stability."""
    frame, _, order = _entries(Path(out_dir))
    ranking, error = rank(frame, order, options or BoardOptions())  # no intervals or pairs: only the ranking
    return "# Challenge-style ranking\n\n" + ranking_text(ranking, error) + "\n"

