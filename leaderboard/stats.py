"""What the leaderboard's numbers mean: bootstrap confidence intervals, paired tests, challenge-style ranking.

Every function takes the leaderboard's frame of latest records (:func:`leaderboard.tables.load_results`)
and works on its successful cases with a defined DSC, as the leaderboard's means do.

**Bootstrap intervals** (:func:`bootstrap_cis`). The statistic is the leaderboard's own: the unweighted
mean of the per-modality means. A resample draws, within each modality, as many cases as it has, with
replacement, and recomputes the statistic; the 95% interval is the 2.5th to 97.5th percentile of the
resampled statistics (percentile bootstrap). A modality with fewer than :data:`MIN_CASES` cases gets no
interval of its own (it is still resampled inside the overall figure), and the overall figure gets none
when no modality has that many. Each model draws from its own
seeded stream (the seed and the model's name), so adding a model to a run does not move another's
interval.

**Paired comparisons** (:func:`paired_comparisons`, :func:`compare_pair`). Two entries are compared on
the cases both finished with a defined score. The effect is the mean paired difference A - B, aggregated
as the leaderboard aggregates (the unweighted mean over modalities of the per-modality mean
differences), with a bootstrap interval that resamples the case pairs within each modality. The test is
Wilcoxon's signed-rank test on the per-case differences (``scipy.stats.wilcoxon``, two-sided; zero
differences dropped, as Wilcoxon's original method does), Holm-corrected over all pairs of the table for
each metric. The verdict is "better" or "worse" (the sign of the effect) where the corrected p-value is
below 5%, else "not separable at 5%". A non-inferiority margin asks whether the lower bound of A - B's
interval lies above ``-margin`` points.

**Challenge-style ranking** (:func:`rank_models`). Not the official CVPR 2024 rule, which is not
published as code: a rank-then-aggregate scheme of the kind challenges use. On every case that any model
attempted, each metric ranks the models (DSC and NSD: higher is better; runtime, HD95, MASD: lower is
better), ties sharing the mean of their ranks; a failed or missing case takes the worst value (DSC and
NSD 0, a time or distance of infinity). A model's score is the weighted mean of its ranks over cases
and metrics (``weights``, default DSC, NSD and runtime alike); the lowest score ranks first. Beside it,
aggregate-then-rank ranks the models on each metric's aggregate (the leaderboard statistic over the
same imputed cases; a failed case's time is the slowest time any model took on it) and averages those
ranks with the same weights. Rank stability resamples the cases within each modality and ranks again:
how often each model keeps its rank, and how often it ranks first.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
CONFIDENCE = 0.95
#: A modality with fewer successful cases than this gets no interval of its own.
MIN_CASES = 3
ALPHA = 0.05
METRICS = ("dsc", "nsd")
#: Metrics the ranking knows, with True where higher is better; "time" is the record's ``seconds``.
RANK_METRICS = {"dsc": True, "nsd": True, "time": False, "hd95": False, "masd": False}
DEFAULT_RANK_WEIGHTS = {"dsc": 1.0, "nsd": 1.0, "time": 1.0}
NOT_SEPARABLE = "not separable at 5%"


def _rng(seed: int, *names: str) -> np.random.Generator:
    """A generator seeded by ``seed`` and names (stable across runs and Python versions)."""
    keys = [int(seed) & 0xFFFFFFFF] + [zlib.crc32(n.encode()) for n in names]
    return np.random.default_rng(np.random.SeedSequence(keys))


def _percentile_interval(samples: np.ndarray) -> tuple[float, float]:
    tail = (1 - CONFIDENCE) / 2 * 100
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


def scored_cases(frame: pd.DataFrame) -> pd.DataFrame:
    """The records the leaderboard's means use: successful, with a defined DSC."""
    if frame.empty:
        return frame
    return frame[(frame["status"] == "ok") & frame["dsc"].notna()]


def _stratified_means(values: dict[str, np.ndarray], resamples: int, rng: np.random.Generator
                      ) -> dict[str, np.ndarray]:
    """Per modality (sorted): ``resamples`` means of cases drawn with replacement within the modality."""
    out = {}
    for modality in sorted(values):
        v = np.asarray(values[modality], dtype=np.float64)
        idx = rng.integers(0, len(v), size=(resamples, len(v)))
        out[modality] = v[idx].mean(axis=1)
    return out


@dataclass
class Estimate:
    """A statistic with its bootstrap interval (``lo``/``hi`` None where there is none) and case count."""

    value: float
    lo: float | None
    hi: float | None
    cases: int

    @property
    def has_interval(self) -> bool:
        return self.lo is not None

    def as_dict(self) -> dict:
        return {"value": self.value, "lo": self.lo, "hi": self.hi, "cases": self.cases}


def _estimates(values: dict[str, np.ndarray], resamples: int, rng: np.random.Generator
               ) -> tuple[Estimate, dict[str, Estimate]]:
    """The overall estimate (mean of modality means) and one per modality, with bootstrap intervals."""
    values = {m: np.asarray(v, dtype=np.float64) for m, v in values.items() if len(v)}
    if not values:
        return Estimate(math.nan, None, None, 0), {}
    boot = _stratified_means(values, resamples, rng)
    per_modality = {}
    for m in sorted(values):
        n = len(values[m])
        lo, hi = _percentile_interval(boot[m]) if n >= MIN_CASES else (None, None)
        per_modality[m] = Estimate(float(values[m].mean()), lo, hi, n)
    overall = np.mean([boot[m] for m in sorted(values)], axis=0)
    value = float(np.mean([values[m].mean() for m in sorted(values)]))
    # with no modality large enough for an interval of its own, the overall one would be as hollow
    lo, hi = (_percentile_interval(overall) if max(len(v) for v in values.values()) >= MIN_CASES
              else (None, None))
    return Estimate(value, lo, hi, sum(len(v) for v in values.values())), per_modality


def bootstrap_cis(frame: pd.DataFrame, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                  metrics: tuple[str, ...] = METRICS) -> dict[str, dict[str, dict]]:
    """``{model: {metric: {"overall": Estimate, "per_modality": {modality: Estimate}}}}`` (fractions)."""
    ok = scored_cases(frame)
    out: dict[str, dict[str, dict]] = {}
    for model in dict.fromkeys(ok["model"]):
        sub = ok[ok["model"] == model]
        out[model] = {}
        for metric in metrics:
            if metric not in sub:
                continue
            part = sub[sub[metric].notna()]
            values = {m: g[metric].to_numpy(float) for m, g in part.groupby("modality")}
            overall, per_modality = _estimates(values, resamples, _rng(seed, model, metric))
            out[model][metric] = {"overall": overall, "per_modality": per_modality}
    return out


def ci_table(cis: dict[str, dict[str, dict]]) -> pd.DataFrame:
    """The intervals as rows ``model, modality ("Average" overall), metric, mean, lo, hi, cases`` (NaN: none)."""
    rows = []
    for model, by_metric in cis.items():
        for metric, est in by_metric.items():
            for modality, e in list(est["per_modality"].items()) + [("Average", est["overall"])]:
                rows.append({"model": model, "modality": modality, "metric": metric, "mean": e.value,
                             "lo": math.nan if e.lo is None else e.lo, "hi": math.nan if e.hi is None else e.hi,
                             "cases": e.cases})
    return pd.DataFrame(rows, columns=["model", "modality", "metric", "mean", "lo", "hi", "cases"])


# --------------------------------------------------------------------------- paired comparisons
def wilcoxon_p(differences: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (zeros dropped; 1.0 when none is left)."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d) & (d != 0)]
    if d.size == 0:
        return 1.0
    from scipy.stats import wilcoxon

    return float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of ``pvalues`` (NaN stays NaN and does not count among the tests)."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    running = 0.0
    for step, i in enumerate(valid[np.argsort(p[valid], kind="stable")]):
        running = max(running, min(1.0, (m - step) * p[i]))
        out[i] = running
    return out.tolist()


def verdict(effect: float, p_adjusted: float, alpha: float = ALPHA) -> str:
    if not (p_adjusted < alpha) or effect == 0 or math.isnan(effect):
        return NOT_SEPARABLE
    return "better" if effect > 0 else "worse"


@dataclass
class PairedMetric:
    """A - B on one metric over the cases both finished (fractions)."""

    metric: str
    effect: Estimate
    p: float
    wins: int
    losses: int
    ties: int
    per_modality: dict[str, dict] = field(default_factory=dict)
    p_holm: float | None = None

    @property
    def verdict(self) -> str:
        return verdict(self.effect.value, self.p if self.p_holm is None else self.p_holm)

    def non_inferior(self, margin_points: float) -> bool | None:
        """Whether the interval's lower bound of A - B is above ``-margin_points`` (points of %)."""
        if self.effect.lo is None:
            return None
        return self.effect.lo * 100 > -margin_points

    def as_dict(self) -> dict:
        return {"metric": self.metric, **{f"effect_{k}": v for k, v in self.effect.as_dict().items()},
                "p": self.p, "p_holm": self.p_holm, "verdict": self.verdict, "wins": self.wins,
                "losses": self.losses, "ties": self.ties, "per_modality": self.per_modality}


def _paired_frame(frame: pd.DataFrame, a: str, b: str, metric: str) -> pd.DataFrame:
    ok = scored_cases(frame)
    ok = ok[ok[metric].notna()]
    left = ok[ok["model"] == a][["case", "modality", metric]]
    right = ok[ok["model"] == b][["case", metric]]
    joined = left.merge(right, on="case", suffixes=("_a", "_b"), how="inner").set_index("case")
    joined["diff"] = joined[f"{metric}_a"] - joined[f"{metric}_b"]
    return joined.sort_index()


def compare_pair(frame: pd.DataFrame, a: str, b: str, metric: str = "dsc", resamples: int = DEFAULT_RESAMPLES,
                 seed: int = DEFAULT_SEED) -> PairedMetric:
    """A - B on ``metric`` over the cases both finished: effect with bootstrap CI, Wilcoxon p (uncorrected),
    wins/losses/ties and the same per modality."""
    joined = _paired_frame(frame, a, b, metric)
    values = {m: g["diff"].to_numpy(float) for m, g in joined.groupby("modality")}
    # one stream per unordered pair: B - A's interval is exactly the negation of A - B's
    overall, per_modality = _estimates(values, resamples, _rng(seed, *sorted((a, b)), metric))
    diff = joined["diff"].to_numpy(float)
    detail = {}
    for m, e in per_modality.items():
        g = joined[joined["modality"] == m]
        detail[m] = {**e.as_dict(), "mean_a": float(g[f"{metric}_a"].mean()), "mean_b": float(g[f"{metric}_b"].mean()),
                     "p": wilcoxon_p(g["diff"].to_numpy(float)), "wins": int((g["diff"] > 0).sum()),
                     "losses": int((g["diff"] < 0).sum()), "ties": int((g["diff"] == 0).sum())}
    return PairedMetric(metric=metric, effect=overall, p=wilcoxon_p(diff) if len(diff) else math.nan,
                        wins=int((diff > 0).sum()), losses=int((diff < 0).sum()), ties=int((diff == 0).sum()),
                        per_modality=detail)


def paired_comparisons(frame: pd.DataFrame, models: list[str], resamples: int = DEFAULT_RESAMPLES,
                       seed: int = DEFAULT_SEED, metrics: tuple[str, ...] = METRICS
                       ) -> list[tuple[str, str, dict[str, PairedMetric]]]:
    """Every pair (A before B in ``models``' order) on each metric, Holm-corrected over the pairs per metric."""
    pairs = [(a, b) for i, a in enumerate(models) for b in models[i + 1:]]
    out = [(a, b, {m: compare_pair(frame, a, b, m, resamples, seed) for m in metrics}) for a, b in pairs]
    for metric in metrics:
        adjusted = holm([res[metric].p for _, _, res in out])
        for (_, _, res), p in zip(out, adjusted):
            res[metric].p_holm = None if math.isnan(p) else p
    return out


# --------------------------------------------------------------------------- ranking
def parse_weights(text: str) -> dict[str, float]:
    """``"dsc=1,nsd=1,time=1"`` -> weights; unknown metrics and negative weights are refused."""
    weights = {}
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in RANK_METRICS:
            raise ValueError(f"'{item}': expected METRIC=WEIGHT with METRIC one of {', '.join(RANK_METRICS)}")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"'{item}': the weight is not a number") from None
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"'{item}': a weight must be a finite number >= 0")
        weights[name] = weight
    if not any(weights.values()):
        raise ValueError("at least one metric needs a weight above 0")
    return weights


def _column(metric: str) -> str:
    return "seconds" if metric == "time" else metric


def case_table(frame: pd.DataFrame, models: list[str], metric: str) -> pd.DataFrame:
    """Cases x models of one metric, a failed or missing case imputed with the worst value (NaN-free).

    Rows: every case any model attempted that some model has a value for. DSC/NSD: 0 for a failed,
    missing or undefined case; time and distances: +inf.
    """
    column = _column(metric)
    higher = RANK_METRICS[metric]
    attempted = sorted(frame[frame["model"].isin(models)]["case"].dropna().unique())
    ok = frame[(frame["status"] == "ok") & frame["model"].isin(models)]
    if column not in ok:
        return pd.DataFrame(index=pd.Index([], name="case"), columns=models, dtype=float)
    table = ok.pivot_table(index="case", columns="model", values=column, aggfunc="last")
    table = table.reindex(index=attempted, columns=models)
    table = table[table.notna().any(axis=1)]
    return table.fillna(0.0 if higher else math.inf).astype(float)


def _case_ranks(table: pd.DataFrame, higher: bool) -> np.ndarray:
    """Per case (row), the models' ranks (1 best), ties averaged."""
    from scipy.stats import rankdata

    values = table.to_numpy(float)
    return rankdata(-values if higher else values, axis=1, method="average") if values.size else values


@dataclass
class Ranking:
    models: list[str]
    weights: dict[str, float]
    mean_ranks: pd.DataFrame  # models x metrics: mean rank over cases
    score: pd.Series  # weighted mean rank
    rank: pd.Series  # final rank (1 best, ties share the better rank)
    aggregate: pd.DataFrame  # models x metrics: the aggregate figure of each metric
    aggregate_rank: pd.Series
    stability: pd.DataFrame  # models x ranks 1..K: bootstrap frequency
    keeps_rank: pd.Series  # P(same rank as observed)
    first: pd.Series  # P(rank 1)
    cases: int
    resamples: int

    def as_dict(self) -> dict:
        return {
            "rule": "challenge-style rank-then-aggregate (not the official CVPR 2024 code)",
            "weights": self.weights, "cases": self.cases, "resamples": self.resamples,
            "models": [{"model": m, "rank": int(self.rank[m]), "score": float(self.score[m]),
                        "mean_ranks": {k: float(v) for k, v in self.mean_ranks.loc[m].items()},
                        "aggregate": {k: (None if not math.isfinite(v) else float(v))
                                      for k, v in self.aggregate.loc[m].items()},
                        "aggregate_rank": int(self.aggregate_rank[m]),
                        "p_keeps_rank": float(self.keeps_rank[m]), "p_first": float(self.first[m]),
                        "rank_frequency": {str(k): float(v) for k, v in self.stability.loc[m].items()}}
                       for m in self.rank.sort_values(kind="stable").index],
        }


def _modalities(frame: pd.DataFrame, cases: list[str]) -> pd.Series:
    """The modality of each case: from its records, else from its file name."""
    from harness.cases import modality_from_name

    known = frame.dropna(subset=["modality"]).drop_duplicates("case").set_index("case")["modality"]
    return pd.Series([known.get(c) or modality_from_name(c) or "?" for c in cases], index=cases)


def _min_rank(scores: np.ndarray) -> np.ndarray:
    """Ranks of scores (lower score ranks first), ties sharing the better rank; along the last axis."""
    from scipy.stats import rankdata

    return rankdata(scores, axis=-1, method="min")


def rank_models(frame: pd.DataFrame, models: list[str], weights: dict[str, float] | None = None,
                resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> Ranking:
    """Challenge-style ranking of ``models`` (see the module docstring)."""
    weights = dict(DEFAULT_RANK_WEIGHTS if weights is None else weights)
    weights = {k: w for k, w in weights.items() if w > 0}
    tables = {m: case_table(frame, models, m) for m in weights}
    tables = {m: t for m, t in tables.items() if len(t)}
    if not tables:
        raise ValueError("no case has a value for the ranked metrics (" + ", ".join(weights) + ")")
    weights = {m: weights[m] for m in tables}
    total = sum(weights.values())
    cases = sorted(set().union(*(t.index for t in tables.values())))
    modality = _modalities(frame, cases)
    # per metric: a (cases x models) rank matrix over all cases, NaN rows where the metric has no value
    ranks = {}
    for metric, table in tables.items():
        r = np.full((len(cases), len(models)), np.nan)
        rows = [cases.index(c) for c in table.index]
        r[rows] = _case_ranks(table, RANK_METRICS[metric])
        ranks[metric] = r

    def scores(index: np.ndarray) -> np.ndarray:
        """Weighted mean ranks for case draws ``index`` (draws x n) -> (draws x models)."""
        acc = 0.0
        for metric, r in ranks.items():
            acc = acc + weights[metric] * np.nanmean(r[index], axis=-2)
        return acc / total

    everything = np.arange(len(cases))[None, :]
    with np.errstate(all="ignore"):
        observed = scores(everything)[0]
    rank = _min_rank(observed)
    mean_ranks = pd.DataFrame({m: np.nanmean(ranks[m], axis=0) for m in ranks}, index=models)

    # aggregate-then-rank: each metric's leaderboard statistic over the imputed cases
    aggregate = {}
    for metric, table in tables.items():
        t = table.copy()
        if not RANK_METRICS[metric]:  # a failed case's time/distance: the worst any model reached on it
            finite = t.where(np.isfinite(t))
            worst = finite.max(axis=1)
            t = finite.apply(lambda col: col.fillna(worst))
        by_modality = t.groupby(modality.reindex(t.index).to_numpy()).mean()
        aggregate[metric] = by_modality.mean(axis=0) if metric != "time" else t.mean(axis=0)
    aggregate = pd.DataFrame(aggregate).reindex(models)
    from scipy.stats import rankdata

    agg_ranks = sum(weights[m] * rankdata(-aggregate[m].fillna(-np.inf) if RANK_METRICS[m]
                                          else aggregate[m].fillna(np.inf), method="average")
                    for m in tables) / total
    aggregate_rank = _min_rank(np.asarray(agg_ranks, dtype=float))

    # rank stability: resample cases within each modality, rank again
    rng = _rng(seed, "rank", *models)
    groups = [np.flatnonzero(modality.to_numpy() == m) for m in sorted(set(modality))]
    freq = np.zeros((len(models), len(models)))
    keeps = np.zeros(len(models))
    chunk = 500
    for start in range(0, resamples, chunk):
        n = min(chunk, resamples - start)
        draws = np.concatenate([g[rng.integers(0, len(g), size=(n, len(g)))] for g in groups], axis=1)
        with np.errstate(all="ignore"):
            s = scores(draws)
        s = np.where(np.isnan(s), np.inf, s)
        r = _min_rank(s)
        for k in range(len(models)):
            freq[:, k] += (r == k + 1).sum(axis=0)
        keeps += (r == rank[None, :]).sum(axis=0)
    freq /= max(resamples, 1)
    stability = pd.DataFrame(freq, index=models, columns=range(1, len(models) + 1))
    return Ranking(models=models, weights=weights, mean_ranks=mean_ranks,
                   score=pd.Series(observed, index=models), rank=pd.Series(rank, index=models).astype(int),
                   aggregate=aggregate, aggregate_rank=pd.Series(aggregate_rank, index=models).astype(int),
                   stability=stability, keeps_rank=pd.Series(keeps / max(resamples, 1), index=models),
                   first=stability[1], cases=len(cases), resamples=resamples)
