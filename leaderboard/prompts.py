"""Leaderboard sections for prompts beyond one exact box (issue 18).

* **Box robustness** (``harness run --box-jitter 0,5,10``): entries that differ only by a ``jitter=L``
  tag (``litemedsam[jitter=0]``, ``litemedsam[jitter=10]``, ``litemedsam[docker,jitter=10]``) are one
  model under L-pixel box perturbations. Per model and level: DSC and NSD in %, aggregated as the main
  table aggregates (the unweighted mean of the per-modality means), overall and per modality; a curve of
  DSC per level with figures.
* **Interactive protocol** (``harness run --protocol interactive``): records carrying
  ``protocol == "interactive"`` get a table of DSC_AUC, NSD_AUC, final DSC/NSD (in %) and seconds per
  case (all steps), aggregated the same way, overall and per modality, and, with figures, the mean
  DSC per step of each entry.

The functions take the frame of :func:`leaderboard.tables.load_results` and return plain tables; the
markdown and the ``summary.json`` sections are built from those tables only.
"""
from __future__ import annotations

import math
import re

import pandas as pd
from tabulate import tabulate

__all__ = ["split_jitter", "robustness_table", "robustness_markdown", "robustness_json", "robustness_curves",
           "interactive_table", "interactive_markdown", "interactive_json", "interactive_step_curves"]

_JITTER = re.compile(r"^jitter=(\d+)$")
OVERALL = "overall"


def split_jitter(entry: str) -> tuple[str, int] | None:
    """``("litemedsam", 10)`` for ``litemedsam[jitter=10]``, ``("litemedsam[docker]", 10)`` for
    ``litemedsam[docker,jitter=10]``; None for an entry without a jitter tag."""
    match = re.fullmatch(r"(.*)\[([^\[\]]*)\]", entry)
    if not match:
        return None
    base, tags = match.group(1), match.group(2).split(",")
    levels = [int(m.group(1)) for m in map(_JITTER.match, tags) if m]
    if len(levels) != 1:
        return None
    rest = [t for t in tags if not _JITTER.match(t)]
    return (f"{base}[{','.join(rest)}]" if rest else base), levels[0]


def _aggregate(sub: pd.DataFrame, metrics: tuple[str, ...]) -> tuple[dict, dict]:
    """The unweighted mean of the per-modality means of ``metrics`` over the scored successful records
    of ``sub``, and the per-modality means with their case counts."""
    ok = sub[(sub["status"] == "ok") & sub[metrics[0]].notna()]
    if ok.empty:
        return {m: math.nan for m in metrics} | {"cases": 0}, {}
    by = ok.groupby("modality", sort=True)
    means = by[list(metrics)].mean()
    per_modality = {str(mod): {**{m: float(row[m]) for m in metrics}, "cases": int(by.size()[mod])}
                    for mod, row in means.iterrows()}
    overall = {m: float(means[m].mean()) for m in metrics}
    overall["cases"] = int(len(ok))
    return overall, per_modality


# ------------------------------------------------------------------------------------ box robustness

def robustness_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, level, modality) with ``dsc``, ``nsd`` (fractions) and ``cases``; modality
    ``"overall"`` is the unweighted mean of the per-modality means. A model's levels are compared on the
    cases every one of its levels has a record of. Only models with a jitter-tagged entry appear; empty
    when there is none."""
    rows = []
    if frame.empty or "model" not in frame:
        return pd.DataFrame(columns=["model", "level", "modality", "dsc", "nsd", "cases"])
    entries = list(dict.fromkeys(frame["model"].dropna()))
    levels_of: dict[str, list[str]] = {}
    for entry in entries:
        split = split_jitter(str(entry))
        if split is not None:
            levels_of.setdefault(split[0], []).append(entry)
    # Levels are compared on the same cases: those every level of the model has a record of (a level run
    # on fewer cases, e.g. with --limit, would otherwise be compared with a larger set).
    common = {base: set.intersection(*(set(frame.loc[frame["model"] == e, "case"]) for e in group))
              for base, group in levels_of.items()}
    for entry in entries:
        split = split_jitter(str(entry))
        if split is None:
            continue
        base, level = split
        sub = frame[(frame["model"] == entry) & frame["case"].isin(common[base])]
        overall, per_modality = _aggregate(sub, ("dsc", "nsd"))
        rows.append({"model": base, "level": level, "modality": OVERALL, **overall})
        rows.extend({"model": base, "level": level, "modality": mod, **vals} for mod, vals in per_modality.items())
    table = pd.DataFrame(rows, columns=["model", "level", "modality", "dsc", "nsd", "cases"])
    if table.empty:
        return table
    order = {m: i for i, m in enumerate(dict.fromkeys(table["model"]))}
    table["_o"] = table["model"].map(order)
    table["_m"] = (table["modality"] != OVERALL).astype(int)
    return table.sort_values(["_o", "_m", "modality", "level"], kind="stable").drop(columns=["_o", "_m"]) \
        .reset_index(drop=True)


def _pct(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def robustness_markdown(table: pd.DataFrame) -> str:
    """The "Box robustness" section: one column per level, cells ``DSC / NSD`` in %; overall rows first,
    then one row per model and modality. Empty string for an empty table."""
    if table.empty:
        return ""
    levels = sorted(table["level"].unique())
    headers = ["Model", "Modality"] + [f"jitter {lv} px" for lv in levels]
    body = []
    for (model, modality), sub in table.groupby(["model", "modality"], sort=False):
        by_level = {int(r["level"]): r for _, r in sub.iterrows()}
        cells = []
        for lv in levels:
            r = by_level.get(int(lv))
            cells.append("-" if r is None else f"{_pct(r['dsc'])} / {_pct(r['nsd'])} ({int(r['cases'])})")
        body.append([model, "all (mean of modalities)" if modality == OVERALL else modality, *cells])
    lines = ["## Box robustness (DSC / NSD %, per jitter level)", "",
             "Each box side moved by a seeded random amount of up to L pixels (for a 256-pixel image; scaled by "
             "image size / 256), outward or inward, clipped to the image; 3D boxes also in z "
             "(`harness run --box-jitter`). Every model saw the same perturbed boxes; level 0 is the plain run. "
             "Cases in brackets.", "",
             tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)]
    return "\n".join(lines)


def robustness_json(table: pd.DataFrame) -> dict:
    """``{model: {level: {"dsc", "nsd", "cases", "per_modality": {modality: {...}}}}}`` (levels as strings)."""
    out: dict = {}
    for _, r in table.iterrows():
        slot = out.setdefault(r["model"], {}).setdefault(str(int(r["level"])), {"per_modality": {}})
        vals = {"dsc": _num(r["dsc"]), "nsd": _num(r["nsd"]), "cases": int(r["cases"])}
        if r["modality"] == OVERALL:
            slot.update(vals)
        else:
            slot["per_modality"][r["modality"]] = vals
    return out


def robustness_curves(table: pd.DataFrame) -> pd.DataFrame:
    """Overall DSC (%) per level and model, for :func:`leaderboard.plots.plot_curves`."""
    overall = table[table["modality"] == OVERALL]
    return pd.DataFrame({"model": overall["model"], "x": overall["level"].astype(float),
                         "y": 100.0 * overall["dsc"].astype(float)})


def _num(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


# ----------------------------------------------------------------------------------- interactive

INTERACTIVE_METRICS = ("dsc_auc", "nsd_auc", "dsc", "nsd", "seconds")


def _interactive_records(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty or "protocol" not in frame:
        return frame.iloc[0:0]
    sub = frame[frame["protocol"] == "interactive"].copy()
    for col in INTERACTIVE_METRICS:
        if col not in sub:
            sub[col] = math.nan
        sub[col] = pd.to_numeric(sub[col], errors="coerce")
    return sub


def interactive_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (interactive entry, modality) with ``dsc_auc``, ``nsd_auc``, ``dsc``, ``nsd`` (the final
    step's; fractions), ``seconds`` (all steps of a case) and ``cases``, plus the ``"overall"`` row (the
    unweighted mean of the per-modality means), errors counted per entry."""
    sub = _interactive_records(frame)
    rows = []
    for entry in dict.fromkeys(sub["model"].dropna()):
        records = sub[sub["model"] == entry]
        scored = records.assign(dsc=records["dsc"])  # final DSC, NaN when undefined
        overall, per_modality = _aggregate(scored, INTERACTIVE_METRICS)
        errors = int((records["status"] != "ok").sum())
        capped = int(records.get("cap_exceeded", pd.Series(dtype=bool)).fillna(False).astype(bool).sum())
        counts = pd.to_numeric(records.get("n_clicks", pd.Series(dtype=float)), errors="coerce").dropna().unique()
        n_clicks = int(counts[0]) if len(counts) == 1 else None
        rows.append({"model": entry, "modality": OVERALL, **overall, "errors": errors, "cap_exceeded": capped,
                     "n_clicks": n_clicks})
        rows.extend({"model": entry, "modality": mod, **vals, "errors": 0, "cap_exceeded": 0, "n_clicks": n_clicks}
                    for mod, vals in per_modality.items())
    return pd.DataFrame(rows, columns=["model", "modality", *INTERACTIVE_METRICS, "cases", "errors", "cap_exceeded",
                                       "n_clicks"])


def interactive_markdown(table: pd.DataFrame) -> str:
    """The "Interactive protocol" section; empty string when no entry ran it."""
    if table.empty:
        return ""
    counts = {int(n) for n in table["n_clicks"].dropna()}
    n_clicks = counts.pop() if len(counts) == 1 else None
    headers = ["Model", "Modality", "DSC_AUC", "NSD_AUC", "Final DSC %", "Final NSD %", "Seconds / case", "Cases"]
    body = []
    for _, r in table.iterrows():
        cases = f"{int(r['cases'])}"
        if r["modality"] == OVERALL and r["errors"]:
            cases += f" ({int(r['errors'])} errors)"
        if r["modality"] == OVERALL and r["cap_exceeded"]:
            cases += f" ({int(r['cap_exceeded'])} over the time cap)"
        body.append([r["model"], "all (mean of modalities)" if r["modality"] == OVERALL else r["modality"],
                     _fmt(r["dsc_auc"], ".3f"), _fmt(r["nsd_auc"], ".3f"), _pct(r["dsc"]), _pct(r["nsd"]),
                     _fmt(r["seconds"], ".2f"), cases])
    clicks = f"{n_clicks} " if n_clicks else ""
    lines = ["## Interactive protocol (box + clicks, CVPR 2025)", "",
             f"Each case ran once with its boxes, then once after each of {clicks}simulated corrective clicks (one "
             "per class per step; `harness run --protocol interactive`). DSC_AUC and NSD_AUC: the area under the DSC "
             "and NSD curves over the click steps (the trapezoid rule, as the official evaluator computes them: "
             "repository JunMa11/CVPR-MedSegFMCompetition, CVPR25_iter_eval.py); final DSC/NSD: the last step's. "
             "Seconds: all steps of a case. Means are the unweighted mean of the per-modality means.", "",
             tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)]
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}"


def interactive_json(table: pd.DataFrame) -> dict:
    """``{entry: {"dsc_auc", ..., "cases", "errors", "cap_exceeded", "per_modality": {...}}}``."""
    out: dict = {}
    for _, r in table.iterrows():
        vals = {m: _num(r[m]) for m in INTERACTIVE_METRICS} | {"cases": int(r["cases"])}
        if r["modality"] == OVERALL:
            out.setdefault(r["model"], {"per_modality": {}}).update(
                vals, errors=int(r["errors"]), cap_exceeded=int(r["cap_exceeded"]),
                n_clicks=None if pd.isna(r["n_clicks"]) else int(r["n_clicks"]))
        else:
            out.setdefault(r["model"], {"per_modality": {}})["per_modality"][r["modality"]] = vals
    return out


def interactive_step_curves(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean DSC (%) per step over each interactive entry's successful cases (``x``: step, 1 = the box)."""
    sub = _interactive_records(frame)
    rows = []
    if "dsc_per_step" not in sub:
        return pd.DataFrame(columns=["model", "x", "y"])
    for entry in dict.fromkeys(sub["model"].dropna()):
        steps = [s for s in sub[(sub["model"] == entry) & (sub["status"] == "ok")]["dsc_per_step"]
                 if isinstance(s, list) and s]
        if not steps:
            continue
        per_step = pd.DataFrame([[_num(v) for v in s] for s in steps], dtype=float)
        for k, value in enumerate(per_step.mean(axis=0, skipna=True), start=1):
            rows.append({"model": entry, "x": float(k), "y": 100.0 * float(value)})
    return pd.DataFrame(rows, columns=["model", "x", "y"])
