"""Figures for the leaderboard, from plain pandas tables: PNG files written with matplotlib's Agg backend.

Each function takes a DataFrame whose columns are documented on it, writes ``path`` atomically (a temp
file beside it, then a rename) and returns it as a :class:`~pathlib.Path`. An input with nothing to draw
raises :class:`ValueError` naming the function and what is missing, so a caller can skip that figure.

matplotlib is imported inside the functions (the CLI must start fast), and figures are built with
:class:`matplotlib.figure.Figure` on an Agg canvas: pyplot's global state is never touched.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from harness.atomic import atomic_writer

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["plot_modality_ci", "plot_runtime_vs_dsc", "plot_rank_stability", "plot_curves", "pareto_front",
           "model_colors", "RUNTIME_FLOOR_S"]

DPI = 120
RUNTIME_FLOOR_S = 1e-3  # times below this (boxfill: ~0 s) are drawn at it on the runtime axis
AVERAGE = "Average"
RUNNER_MARKERS = {"native": "o", "subprocess": "s", "docker": "^"}
_SPARE_MARKERS = ("D", "v", "P", "X", "p", "h", "<", ">")


# ---------------------------------------------------------------------------------------------- helpers

def new_figure(width: float, height: float) -> "Figure":
    """A Figure (inches) on its own Agg canvas, with constrained layout; pyplot is not involved."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: "Figure", path: str | os.PathLike, dpi: int = DPI, tight: bool = False) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically (``tight``: cropped to what is drawn); return the path."""
    path = Path(path)
    extra = {"bbox_inches": "tight", "pad_inches": 0.08} if tight else {}
    with atomic_writer(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=dpi, facecolor="white", **extra)
    return path


def model_colors(models: Iterable[str]) -> dict[str, tuple]:
    """One colour per model, in the given order: tab10 up to 10 models, then tab20 (cycled beyond 20)."""
    from matplotlib import colormaps

    models = list(dict.fromkeys(models))
    cmap = colormaps["tab10" if len(models) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(models)}


def _colors(models: Iterable[str], given: dict | None) -> dict[str, tuple]:
    """``given`` (one colour per model, shared by every figure of a leaderboard), completed for any model it
    lacks; without it, :func:`model_colors` of ``models``."""
    models = list(models)
    if not given:
        return model_colors(models)
    extra = model_colors([m for m in given] + [m for m in models if m not in given])
    return {m: given.get(m, extra[m]) for m in models}


def _check_frame(frame, columns: Sequence[str], what: str) -> None:
    if frame is None or len(frame) == 0:
        raise ValueError(f"{what}: the table is empty, nothing to draw")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {', '.join(missing)} (columns present: "
                         f"{', '.join(map(str, frame.columns)) or 'none'})")


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------- per-modality with CIs

def plot_modality_ci(table: "pd.DataFrame", path: str | os.PathLike, colors: dict | None = None) -> Path:
    """Per-modality DSC and NSD of each model with bootstrap 95% CIs: two panels, one dot per model.

    ``table`` columns: ``model`` (entry name), ``modality`` (the row ``"Average"`` is the overall figure,
    drawn last), ``metric`` (``"dsc"`` or ``"nsd"``), ``mean``, ``lo``, ``hi`` (fractions 0..1; ``lo``/``hi``
    NaN where no interval could be computed: that dot has no error bar). Modalities and models keep
    their order of first appearance. Raises ValueError when there is no finite mean to draw.
    """
    what = "plot_modality_ci"
    _check_frame(table, ("model", "modality", "metric", "mean", "lo", "hi"), what)
    df = table.copy()
    df["model"] = df["model"].astype(str)
    df["modality"] = df["modality"].astype(str)
    df["metric"] = df["metric"].astype(str).str.lower()
    df = df[df["metric"].isin(("dsc", "nsd"))]
    for col in ("mean", "lo", "hi"):
        df[col] = df[col].astype(float)
    if not np.isfinite(df["mean"].to_numpy()).any():
        raise ValueError(f"{what}: no finite DSC or NSD mean in the table, nothing to draw")
    df = df.drop_duplicates(["model", "modality", "metric"], keep="last")

    models = list(dict.fromkeys(df["model"]))
    modalities = [m for m in dict.fromkeys(df["modality"]) if m != AVERAGE]
    if (df["modality"] == AVERAGE).any():
        modalities.append(AVERAGE)
    colors = _colors(models, colors)
    n_models, n_groups = len(models), len(modalities)
    slot = 0.8 / n_models
    markersize = max(3.5, 8.0 - 0.35 * n_models)

    fig = new_figure(12.5, 7.8)
    axes = fig.subplots(2, 1, sharex=True)
    handles = {}
    for ax, metric in zip(axes, ("dsc", "nsd")):
        part = df[df["metric"] == metric].set_index(["model", "modality"])
        values = []
        for j, model in enumerate(models):
            for i, modality in enumerate(modalities):
                if (model, modality) not in part.index:
                    continue
                row = part.loc[(model, modality)]
                if not _finite(row["mean"]):
                    continue
                x = i - 0.4 + slot * (j + 0.5)
                y = 100.0 * row["mean"]
                values.append(y)
                if _finite(row["lo"]) and _finite(row["hi"]):
                    lo, hi = 100.0 * row["lo"], 100.0 * row["hi"]
                    values.extend((lo, hi))
                    yerr = [[max(y - lo, 0.0)], [max(hi - y, 0.0)]]
                    ax.errorbar([x], [y], yerr=yerr, fmt="none", ecolor=colors[model], elinewidth=1.3,
                                capsize=min(4.0, 60.0 * slot), zorder=2)
                handles[model] = ax.plot([x], [y], "o", color=colors[model], markersize=markersize,
                                         markeredgecolor="white", markeredgewidth=0.6, zorder=3)[0]
        if values:
            low, high = min(values), max(values)
            pad = max(2.0, 0.06 * (high - low))
            ax.set_ylim(max(0.0, low - pad), min(102.0, high + pad))
        else:
            ax.text(0.5, 0.5, f"no {metric.upper()} figures", transform=ax.transAxes, ha="center",
                    va="center", color="0.4")
            ax.set_ylim(0, 100)
        if modalities[-1] == AVERAGE:
            ax.axvspan(n_groups - 1.5, n_groups - 0.5, color="0.93", zorder=0)
        for boundary in range(1, n_groups):
            ax.axvline(boundary - 0.5, color="0.88", linewidth=0.8, zorder=0)
        ax.set_xlim(-0.5, n_groups - 0.5)
        ax.set_ylabel(f"{metric.upper()} (%)")
        ax.set_title(metric.upper(), loc="left", fontsize=11, fontweight="bold")
        ax.grid(axis="y", color="0.9", linewidth=0.8)
        ax.set_axisbelow(True)
    axes[-1].set_xticks(range(n_groups))
    axes[-1].set_xticklabels(modalities, rotation=30 if n_groups > 9 else 0,
                             ha="right" if n_groups > 9 else "center")
    fig.suptitle("per-modality DSC / NSD with bootstrap 95% CIs", fontsize=13)
    fig.legend([handles[m] for m in models if m in handles], [m for m in models if m in handles],
               loc="outside right upper", title="model", fontsize=9, frameon=False)
    return save_png(fig, path)


# ------------------------------------------------------------------------------- runtime vs accuracy

def pareto_front(seconds: Sequence[float], dsc: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower time and higher DSC).

    A point is dropped when another one is at least as fast and at least as accurate and strictly
    better on one of the two; identical points are all kept. Points with a NaN (or None) coordinate
    are never on the front. Returned in order of increasing time (then decreasing DSC): along the
    front, DSC rises with time.
    """
    pts = [(i, float(s), float(d)) for i, (s, d) in enumerate(zip(seconds, dsc)) if _finite(s) and _finite(d)]
    front = []
    for i, s, d in pts:
        dominated = any(s2 <= s and d2 >= d and (s2 < s or d2 > d) for _, s2, d2 in pts)
        if not dominated:
            front.append((s, -d, i))
    return [i for _, _, i in sorted(front)]


def _runner_markers(runners: Iterable[str]) -> dict[str, str]:
    markers, spare = {}, iter(_SPARE_MARKERS * 4)
    for runner in dict.fromkeys(runners):
        markers[runner] = RUNNER_MARKERS.get(runner) or next(spare)
    return markers


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _place_labels(fig, ax, xs, ys, labels, marker_radius_px: float) -> None:
    """Label each point: try offsets around it, near ones first, and keep the one that overlaps the
    least of the labels already placed, the other points' markers (with a margin, so a label does not
    sit next to a point it does not name) and the space outside the axes. A label set away from its
    point gets a thin leader line."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    pts = ax.transData.transform(np.column_stack([xs, ys]))
    pt = fig.dpi / 72.0  # display pixels per point
    r = marker_radius_px
    keep_out = [Bbox([[px - 2.5 * r, py - 2.5 * r], [px + 2.5 * r, py + 2.5 * r]]) for px, py in pts]
    placed: list = []
    frame = ax.get_window_extent(renderer)
    directions = [(1, 0.7, "left", "bottom"), (1, -0.7, "left", "top"), (-1, 0.7, "right", "bottom"),
                  (-1, -0.7, "right", "top"), (0, 1.2, "center", "bottom"), (0, -1.2, "center", "top"),
                  (1.2, 0, "left", "center"), (-1.2, 0, "right", "center")]
    candidates = [(d * dx, d * dy, ha, va, d) for d in (7, 16, 28) for dx, dy, ha, va in directions]
    for k in np.argsort(-np.asarray(ys), kind="stable"):
        best = None
        for dx, dy, ha, va, dist in candidates:
            text = ax.annotate(labels[k], (xs[k], ys[k]), xytext=(dx, dy), textcoords="offset points",
                               ha=ha, va=va, fontsize=9, zorder=4)
            box = text.get_window_extent(renderer).expanded(1.06, 1.15)
            cost = sum(_overlap(box, o) for o in placed)
            cost += sum(_overlap(box, o) for j, o in enumerate(keep_out) if j != k)
            cost += 3 * ((max(frame.x0 - box.x0, 0) + max(box.x1 - frame.x1, 0)) * box.height
                         + (max(frame.y0 - box.y0, 0) + max(box.y1 - frame.y1, 0)) * box.width)
            cost += 0.5 * dist * pt  # prefer near places
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, text, box, dist)
            else:
                text.remove()
        _, text, box, dist = best
        if dist > 7:  # draw it again, with a leader line
            text.remove()
            ax.annotate(labels[k], (xs[k], ys[k]), xytext=text.xyann, textcoords="offset points",
                               ha=text.get_ha(), va=text.get_va(), fontsize=9, zorder=4,
                               arrowprops=dict(arrowstyle="-", color="0.5", linewidth=0.7,
                                               shrinkA=1, shrinkB=r / pt + 1))
        placed.append(box)


def plot_runtime_vs_dsc(points: "pd.DataFrame", path: str | os.PathLike, colors: dict | None = None) -> Path:
    """Mean DSC against mean seconds per case, one labelled point per row, with the Pareto front.

    ``points`` columns: ``model`` (entry name, the label), ``runner`` (one marker per runner),
    ``seconds`` (mean seconds per case) and ``dsc`` (fraction). Times below
    :data:`RUNTIME_FLOOR_S` (e.g. ``boxfill``, ~0 s) are drawn at that floor, marked in their label and
    in a note. The time axis is logarithmic when the times span more than 10x. The Pareto front (no
    other point both faster and more accurate, see :func:`pareto_front`) is a step line. Rows with a NaN
    time or DSC are left out; ValueError when none is left.
    """
    what = "plot_runtime_vs_dsc"
    _check_frame(points, ("model", "runner", "seconds", "dsc"), what)
    df = points.copy()
    df["seconds"] = df["seconds"].astype(float)
    df["dsc"] = df["dsc"].astype(float)
    df = df[np.isfinite(df["seconds"]) & np.isfinite(df["dsc"])].reset_index(drop=True)
    if df.empty:
        raise ValueError(f"{what}: no row has both a finite 'seconds' and 'dsc', nothing to draw")
    models = [str(m) for m in df["model"]]
    runners = [str(r) for r in df["runner"]]
    raw = df["seconds"].to_numpy()
    clipped = raw < RUNTIME_FLOOR_S
    xs = np.maximum(raw, RUNTIME_FLOOR_S)
    ys = 100.0 * df["dsc"].to_numpy()
    front = pareto_front(raw, df["dsc"].to_numpy())
    colors = _colors(models, colors)
    markers = _runner_markers(runners)
    log_x = xs.max() / xs.min() > 10

    fig = new_figure(12, 7.2)
    ax = fig.subplots()
    if len(front) > 1:
        fx, fy = xs[front], ys[front]
        ax.plot(fx, fy, drawstyle="steps-post", color="0.45", linestyle="--", linewidth=1.3, zorder=1)
    for k in range(len(df)):
        on_front = k in front
        ax.scatter([xs[k]], [ys[k]], s=90, marker=markers[runners[k]], color=colors[models[k]],
                   edgecolors="black" if on_front else "white", linewidths=1.2 if on_front else 0.6, zorder=3)
    if log_x:
        ax.set_xscale("log")
        ax.set_xlim(xs.min() / 2.5, xs.max() * 2.5)
    else:
        ax.set_xlim(0.0, xs.max() * 1.4)
    y_pad = max(0.12 * (ys.max() - ys.min()), 1.5)
    ax.set_ylim(ys.min() - y_pad, ys.max() + y_pad)
    ax.set_xlabel("mean seconds per case" + (" (log scale)" if log_x else ""))
    ax.set_ylabel("mean DSC (%)")
    ax.grid(color="0.9", linewidth=0.8, which="major")
    ax.set_axisbelow(True)
    ax.set_title("runtime vs DSC; dashed: the Pareto front (no other entry is both faster and more accurate)",
                 fontsize=12)

    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker=markers[r], linestyle="none", color="0.35", markersize=8, label=r)
               for r in markers]
    handles.append(Line2D([], [], color="0.45", linestyle="--", label="Pareto front"))
    handles.append(Line2D([], [], marker="o", linestyle="none", color="white", markeredgecolor="black",
                          markersize=8, label="on the front"))
    fig.legend(handles=handles, loc="outside right upper", title="runner", fontsize=9, frameon=False)
    if clipped.any():
        floor_text = f"{RUNTIME_FLOOR_S * 1000:g} ms"
        ax.text(0.99, 0.01, f"* under {floor_text} per case: drawn at {floor_text}", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=8.5, color="0.3")
    labels = [m + (" *" if c else "") for m, c in zip(models, clipped)]

    fig.canvas.draw()  # fix the layout, then place labels in display space
    fig.set_layout_engine("none")
    _place_labels(fig, ax, xs, ys, labels, marker_radius_px=6.0 * fig.dpi / 72)
    return save_png(fig, path)


# ----------------------------------------------------------------------------------- rank stability

def _luminance(rgba) -> float:
    r, g, b = rgba[:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


def _percent(freq: float) -> str:
    if freq < 1 and round(freq * 100) >= 100:
        return ">99%"
    return f"{freq:.0%}"


def plot_rank_stability(freq: "pd.DataFrame", path: str | os.PathLike, observed: "pd.Series | None" = None,
                        colors: dict | None = None) -> Path:
    """Blob plot of how often each model took each rank over bootstrap resamples.

    ``freq``: index = model entry names, best first; columns = ranks 1..K (ints); values = the fraction
    of resamples in which the model took that rank (rows sum to 1; NaN counts as 0). Circle area is
    proportional to the frequency; frequencies >= 0.05 are written in the circle (or below it when it is
    too small). The rank a model holds in the table is shaded: ``observed`` (model -> rank, tied models
    sharing one) where given, else its row position.
    """
    what = "plot_rank_stability"
    if freq is None or freq.shape[0] == 0 or freq.shape[1] == 0:
        raise ValueError(f"{what}: the frequency table is empty, nothing to draw")
    try:
        ranks = [int(c) for c in freq.columns]
    except (TypeError, ValueError):
        raise ValueError(f"{what}: columns must be ranks (integers), got {list(freq.columns)}") from None
    values = freq.to_numpy(dtype=float)
    values = np.where(np.isfinite(values), values, 0.0)
    if not (values > 0).any():
        raise ValueError(f"{what}: every frequency is 0 or NaN, nothing to draw")
    models = [str(m) for m in freq.index]
    n, k = len(models), len(ranks)
    colors = _colors(models, colors)
    longest = max(len(m) for m in models)

    width = min(max(8.0, 1.6 + 0.075 * longest + 0.6 * k), 13.0)
    height = min(max(3.0, 1.3 + 0.5 * n), 9.0)
    fig = new_figure(width, height)
    ax = fig.subplots()
    for row, model in enumerate(models):  # the rank each model holds in the table
        held = int(observed[model]) if observed is not None and model in observed else row + 1
        if held in ranks:
            ax.add_patch(_cell(held, row))
    xs, ys, fs, cs = [], [], [], []
    for row, model in enumerate(models):
        for col, rank in enumerate(ranks):
            if values[row, col] > 0:
                xs.append(rank), ys.append(row), fs.append(values[row, col]), cs.append(colors[model])
    blobs = ax.scatter(xs, ys, s=np.ones(len(xs)), c=cs, edgecolors="black", linewidths=0.5, zorder=3)
    ax.set_xlim(min(ranks) - 0.6, max(ranks) + 0.6)
    ax.set_ylim(n - 0.2, -0.5)  # best at the top; room below the last row for its labels
    ax.set_xticks(ranks)
    ax.set_yticks(range(n))
    ax.set_yticklabels(models)
    ax.set_xlabel("rank")
    ax.tick_params(length=0)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.suptitle("rank stability over bootstrap resamples", fontsize=12)
    ax.set_title("circle area: share of resamples in which the model took that rank; shaded: its rank in the "
                 "table", fontsize=9, color="0.3")

    fig.canvas.draw()  # the axes' size in points decides the largest circle
    fig.set_layout_engine("none")
    box = ax.get_window_extent()
    to_pt = 72.0 / fig.dpi
    cell = min(box.width * to_pt / (max(ranks) - min(ranks) + 1.2), box.height * to_pt / (n + 0.3))
    dmax = 0.92 * cell
    blobs.set_sizes(np.asarray(fs) * dmax ** 2)
    for x, y, f, c in zip(xs, ys, fs, cs):
        if f < 0.05:
            continue
        diameter = math.sqrt(f) * dmax
        label = _percent(f)
        if diameter >= 7.0 * len(label) + 4:
            ax.annotate(label, (x, y), ha="center", va="center", fontsize=8.5, zorder=4,
                        color="white" if _luminance(c) < 0.6 else "black")
        else:
            ax.annotate(label, (x, y), xytext=(0, -(diameter / 2 + 1.5)), textcoords="offset points",
                        ha="center", va="top", fontsize=8, color="0.15", zorder=4)
    return save_png(fig, path, dpi=150 if width < 10 else DPI)


def _cell(x: float, y: float):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1.0, 1.0, facecolor="0.92", edgecolor="none", zorder=0)


# ------------------------------------------------------------------------------------- line curves

def plot_curves(curves: "pd.DataFrame", path: str | os.PathLike, xlabel: str, ylabel: str, title: str,
                colors: dict | None = None) -> Path:
    """One line with dots per model: ``curves`` columns ``model`` (the legend), ``x`` and ``y`` (drawn as
    given: percentages stay percentages). Used for the box-robustness curve (DSC per jitter level) and the
    interactive protocol's DSC per step. Points with a NaN ``x`` or ``y`` are left out; ValueError when
    nothing is left."""
    what = "plot_curves"
    _check_frame(curves, ("model", "x", "y"), what)
    df = curves.copy()
    df["x"] = df["x"].astype(float)
    df["y"] = df["y"].astype(float)
    df = df[np.isfinite(df["x"]) & np.isfinite(df["y"])]
    if df.empty:
        raise ValueError(f"{what}: no point has a finite 'x' and 'y', nothing to draw")
    models = list(dict.fromkeys(str(m) for m in df["model"]))
    colors = _colors(models, colors)
    fig = new_figure(9, 5.4)
    ax = fig.subplots()
    for model in models:
        sub = df[df["model"].astype(str) == model].sort_values("x")
        ax.plot(sub["x"], sub["y"], marker="o", color=colors[model], label=model, linewidth=1.6)
    xs = sorted(set(df["x"]))
    ax.set_xticks(xs)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(color="0.9", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.set_title(title, fontsize=12)
    fig.legend(loc="outside right upper", fontsize=9, frameon=False)
    return save_png(fig, path)
