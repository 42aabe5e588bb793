"""Leaderboard tables from a run folder (``results.jsonl`` + ``models.json``).

Two tables, shaped like the seed tables of the MedficientSAM / reproduction READMEs:

1. per model: Method, Res, Params, FLOPs, DSC, NSD, 2D/3D runtime, 2D/3D memory, cases;
2. per modality x model: DSC / NSD.

Aggregation follows the published tables: DSC and NSD (in %) are the **unweighted mean of the
per-modality means**, so a modality with many cases counts as much as one with few. A case whose
DSC is undefined (NaN: a label absent from both ground truth and prediction, stored as null) is
left out of the means and counted in the ``NaN`` column. Runtime is the mean seconds per case;
memory is the largest per-case peak RSS, per dimension. Only successful cases enter any figure;
errors are counted beside them.
"""
from __future__ import annotations

import math
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


def load_results(out_dir: str | Path) -> tuple[pd.DataFrame, dict[str, dict]]:
    """The latest record per (model, case) as a DataFrame, and the models.json entries."""
    out_dir = Path(out_dir)
    records = latest_records(read_records(out_dir / RESULTS_FILE))
    columns = ["model", "case", "modality", "dim", "status", "dsc", "nsd", "seconds", "peak_rss_mb",
               "timing_mode", "runner", "threads"]
    frame = pd.DataFrame.from_records(records)
    for col in columns:
        if col not in frame:
            frame[col] = None
    for col in ("dsc", "nsd", "seconds", "peak_rss_mb"):
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


def modality_means(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model x modality: mean DSC and NSD (fractions) over successful cases with a defined DSC, and counts."""
    ok = frame[frame["status"] == "ok"]
    scored = ok[ok["dsc"].notna()]
    grouped = scored.groupby(["model", "modality"], sort=True)
    table = grouped[["dsc", "nsd"]].mean()
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
        row = {
            "model": model,
            "title": info.get("title", model),
            "resolution": info.get("resolution"),
            "params": info.get("params"),
            "flops": info.get("flops"),
            "dsc": mods["dsc"].mean() if not mods.empty else float("nan"),
            "nsd": mods["nsd"].mean() if not mods.empty else float("nan"),
            "modalities": len(mods),
            "cases": len(sub),
            "ok": len(ok),
            "errors": int((sub["status"] != "ok").sum()),
            "nan_dsc": int((ok["dsc"].isna() & _has_gt(ok)).sum()),
        }
        for dim in ("2D", "3D"):
            part = ok[ok["dim"] == dim]
            row[f"runtime_{dim}"] = part["seconds"].mean() if not part.empty else float("nan")
            row[f"memory_{dim}"] = part["peak_rss_mb"].max() if not part.empty else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def _has_gt(frame: pd.DataFrame) -> pd.Series:
    if "dsc_per_label" in frame:
        return frame["dsc_per_label"].notna()
    return pd.Series(False, index=frame.index)


def render_markdown(out_dir: str | Path) -> str:
    """The leaderboard of a run folder as markdown."""
    return _markdown(*load_results(out_dir))


def _markdown(frame: pd.DataFrame, models: dict[str, dict]) -> str:
    if frame.empty:
        return "# Leaderboard\n\nNo results yet.\n"
    summary = model_summary(frame, models)
    lines = ["# Leaderboard", ""]
    modes = sorted({f"{r} / {t}" for r, t in zip(frame["runner"].fillna("?"), frame["timing_mode"].fillna("?"))})
    threads = sorted({int(t) for t in frame["threads"].dropna()})
    lines.append(
        f"Runner / timing mode: {', '.join(modes)}; CPU threads: {', '.join(map(str, threads)) or '-'}. "
        "DSC and NSD in %, the unweighted mean of the per-modality means; runtime is the mean seconds per case, "
        "memory the largest per-case peak RSS."
    )
    lines.append("")
    headers = ["Method", "Res", "Params", "FLOPs", "DSC", "NSD", "2D runtime", "3D runtime", "2D memory",
               "3D memory", "Cases"]
    body = []
    for _, r in summary.iterrows():
        cases = f"{r['ok']}/{r['cases']}"
        if r["errors"]:
            cases += f" ({r['errors']} errors)"
        if r["nan_dsc"]:
            cases += f" ({r['nan_dsc']} NaN)"
        body.append([
            r["title"],
            _fmt(r["resolution"], ".0f") if r["resolution"] else "-",
            _fmt_count(r["params"]),
            _fmt_count(r["flops"]),
            _fmt(r["dsc"] * 100, ".2f"),
            _fmt(r["nsd"] * 100, ".2f"),
            _fmt(r["runtime_2D"], ".2f", "s"),
            _fmt(r["runtime_3D"], ".2f", "s"),
            _fmt(r["memory_2D"], ".0f", "MB"),
            _fmt(r["memory_3D"], ".0f", "MB"),
            cases,
        ])
    lines.append(tabulate(body, headers=headers, tablefmt="github", disable_numparse=True))
    lines += ["", "## Per modality (DSC / NSD, %)", ""]
    lines.append(_modality_table(frame, summary))
    published = _published_table(summary, models)
    if published:
        lines += ["", "## Published figures (for comparison; other data and hardware)", "", published]
    lines.append("")
    return "\n".join(lines)


def _modality_table(frame: pd.DataFrame, summary: pd.DataFrame) -> str:
    per_modality = modality_means(frame)
    titles = dict(zip(summary["model"], summary["title"]))
    models = list(summary["model"])
    modalities = sorted(per_modality["modality"].dropna().unique())
    body = []
    for modality in modalities:
        row = [modality]
        counts = set()
        for model in models:
            cell = per_modality[(per_modality["model"] == model) & (per_modality["modality"] == modality)]
            if cell.empty:
                row.append("-")
            else:
                c = cell.iloc[0]
                counts.add(int(c["cases"]))
                row.append(f"{c['dsc'] * 100:.2f} / {c['nsd'] * 100:.2f}")
        row.insert(1, "/".join(str(c) for c in sorted(counts)) or "-")
        body.append(row)
    average = ["Average", ""]
    for _, r in summary.iterrows():
        average.append(f"{_fmt(r['dsc'] * 100, '.2f')} / {_fmt(r['nsd'] * 100, '.2f')}")
    body.append(average)
    headers = ["Modality", "Cases"] + [titles[m] for m in models]
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


def _published_table(summary: pd.DataFrame, models: dict[str, dict]) -> str:
    body = []
    for model in summary["model"]:
        rep = (models.get(model) or {}).get("reported")
        if not rep:
            continue
        body.append([
            models[model].get("title", model),
            _fmt(rep.get("dsc"), ".2f"),
            _fmt(rep.get("nsd"), ".2f"),
            _fmt(rep.get("params_m"), ".2f", "M"),
            _fmt(rep.get("gflops"), ".2f", "G"),
            _fmt(rep.get("runtime_2d_s"), ".1f", "s"),
            _fmt(rep.get("runtime_3d_s"), ".1f", "s"),
            _fmt(rep.get("memory_2d_mb"), ".0f", "MB"),
            _fmt(rep.get("memory_3d_mb"), ".0f", "MB"),
            rep.get("hardware") or "-",
            rep.get("source") or "-",
        ])
    if not body:
        return ""
    headers = ["Method", "DSC", "NSD", "Params", "FLOPs", "2D runtime", "3D runtime", "2D memory", "3D memory",
               "Hardware", "Source"]
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


def summary_json(out_dir: str | Path) -> dict:
    """Machine-readable twin of the markdown: per model aggregates and per modality means."""
    return _summary(*load_results(out_dir))


def _summary(frame: pd.DataFrame, models: dict[str, dict]) -> dict:
    if frame.empty:
        return {"models": []}
    summary = model_summary(frame, models)
    per_modality = modality_means(frame)
    out = []
    for _, r in summary.iterrows():
        mods = per_modality[per_modality["model"] == r["model"]]
        entry = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
        entry = {k: (v.item() if hasattr(v, "item") else v) for k, v in entry.items()}
        entry["per_modality"] = {
            m["modality"]: {"dsc": float(m["dsc"]), "nsd": float(m["nsd"]), "cases": int(m["cases"])}
            for _, m in mods.iterrows()
        }
        out.append(entry)
    return {"models": out}


def write_leaderboard(out_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write ``leaderboard.md`` (and ``summary.json``) for a run folder; return the markdown path."""
    out_dir = Path(out_dir)
    target = Path(output) if output else out_dir / "leaderboard.md"
    frame, models = load_results(out_dir)
    write_text_atomic(target, _markdown(frame, models))
    write_json_atomic(out_dir / "summary.json", _summary(frame, models))
    return target
