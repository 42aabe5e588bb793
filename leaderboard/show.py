"""``harness show``: one case of a run folder as a PNG: the image with its boxes, the ground truth and
each model's segmentation, side by side.

2D cases are one row of panels (wrapped after :data:`MAX_COLUMNS`); 3D cases three rows, the slices at
25%, 50% and 75% of the first box's z-range. Label ``i`` (box ``i - 1``) has the same colour in every
panel (a qualitative colormap; label 0 is transparent).
"""
from __future__ import annotations

import difflib
import os
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

import harness
from harness.cases import Case, load_case, load_ground_truth, load_segs
from harness.results import RESULTS_FILE, latest_records, read_records
from leaderboard.plots import new_figure, save_png

__all__ = ["ShowError", "show_case", "label_colors", "slice_indices"]

DEMO_DIR = Path(harness.__file__).resolve().parent / "demo"  # as `harness run`'s default --data
MAX_COLUMNS = 4  # 2D panels per row
PANEL_IN = (2.2, 3.6)  # panel width in inches: the largest that keeps the figure ~16 in wide, within these
DPI = 110
FILL_ALPHA = 0.35


class ShowError(Exception):
    """A case, model or folder that ``harness show`` cannot find; the message says what and where."""


def label_colors(n_labels: int) -> np.ndarray:
    """RGBA rows for labels 0..n_labels: row 0 transparent, then a qualitative palette (tab10 up to 10
    labels, else tab20 + tab20b + tab20c, cycled beyond 60)."""
    from matplotlib import colormaps

    if n_labels <= 10:
        palette = [colormaps["tab10"](i) for i in range(10)]
    else:
        palette = [colormaps[name](i) for name in ("tab20", "tab20b", "tab20c") for i in range(20)]
    colors = np.zeros((n_labels + 1, 4))
    for label in range(1, n_labels + 1):
        colors[label] = palette[(label - 1) % len(palette)]
    return colors


def slice_indices(z0: float, z1: float, depth: int) -> list[int]:
    """The slices at 25%, 50% and 75% of the z-range [z0, z1], clipped to the volume, without repeats."""
    picks = [int(round(z0 + f * (z1 - z0))) for f in (0.5, 0.25, 0.75)]
    picks = [min(max(z, 0), depth - 1) for z in picks]
    middle, others = picks[0], sorted(set(picks[1:]) - {picks[0]})
    return sorted([middle, *others])


def _overlay(labels: np.ndarray, colors: np.ndarray, thickness: int) -> np.ndarray:
    """RGBA image of a label map: each label filled translucently, its outline opaque."""
    labels = labels.astype(np.int64, copy=False)
    index = np.where(labels < len(colors), labels, (labels - 1) % (len(colors) - 1) + 1)
    index = np.where(labels > 0, index, 0)
    rgba = colors[index].copy()
    edge = np.zeros(labels.shape, dtype=bool)
    for k in range(1, thickness + 1):
        for axis in (0, 1):
            for shift in (k, -k):
                edge |= labels != np.roll(labels, shift, axis=axis)
    edge &= labels > 0
    rgba[..., 3] = np.where(labels > 0, np.where(edge, 1.0, FILL_ALPHA), 0.0)
    return rgba


def _resolve_case(data_dir: Path, case: str) -> tuple[Path, Path | None]:
    """(the case's imgs file, its gts file or None) for CASE given with or without ``.npz``."""
    name = Path(case).name
    if not name.endswith(".npz"):
        name += ".npz"
    if not data_dir.is_dir():
        raise ShowError(f"--data {data_dir}: no such folder")
    imgs_dir = data_dir / "imgs" if (data_dir / "imgs").is_dir() else data_dir
    path = imgs_dir / name
    if not path.is_file():
        known = sorted(p.name for p in imgs_dir.glob("*.npz"))
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.8)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ShowError(f"unknown case '{Path(name).stem}': no {name} in {imgs_dir}{hint}")
    gts = data_dir / "gts" / name if imgs_dir != data_dir else None
    return path, gts if gts is not None and gts.is_file() else None


def _first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else "unknown error"


def _score_text(record: dict | None) -> str:
    parts = [f"{key.upper()} {100 * record[key]:.1f}" for key in ("dsc", "nsd")
             if record and isinstance(record.get(key), (int, float))]
    return " · ".join(parts)


def show_case(out_dir: str | os.PathLike, case: str, data_dir: str | os.PathLike | None = None,
              models: Sequence[str] | None = None, output: str | os.PathLike | None = None) -> Path:
    """Render CASE of the run folder OUT_DIR to a PNG (default ``OUT_DIR/show-<case stem>.png``).

    ``data_dir`` holds ``imgs/`` and optionally ``gts/`` (default: the bundled demo set); ``models`` are
    entry names of ``OUT_DIR/results.jsonl`` (default: every entry with a seg for the case, in file order).
    An entry without a seg for the case gets a panel that says why ("error: ..." or "not run").
    Raises :class:`ShowError` for an unknown run folder, case or model, and
    :class:`~harness.cases.CaseError` for an unreadable case, gts or seg file.
    """
    out_dir = Path(out_dir)
    data_dir = Path(data_dir) if data_dir is not None else DEMO_DIR
    results = out_dir / RESULTS_FILE
    if not results.is_file():
        raise ShowError(f"{results} not found (is {out_dir} a `harness run` output folder?)")
    case_path, gts_path = _resolve_case(data_dir, case)
    records = latest_records(read_records(results))
    entries = list(dict.fromkeys(r.get("model") for r in records if r.get("model")))
    for_case = {r["model"]: r for r in records if r.get("case") == case_path.name and r.get("model")}
    if models is None:
        models = [m for m in entries if m in for_case and for_case[m].get("segs")]
        if not models:  # nothing segmented this case: show why, if anything ran it
            models = [m for m in entries if m in for_case]
    else:
        unknown = [m for m in models if m not in entries]
        if unknown:
            raise ShowError(f"unknown model{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in "
                            f"{results}; "
                            f"known: {', '.join(entries) or 'none'}")

    loaded = load_case(case_path)
    gts = load_ground_truth(gts_path, loaded).gts if gts_path is not None else None
    columns: list[tuple[str, str, np.ndarray | None, str | None]] = []  # (title, subtitle, labels, note)
    if gts is not None:
        columns.append(("ground truth", "", gts, None))
    for model in models:
        record = for_case.get(model)
        if record is None:
            columns.append((model, "", None, "not run"))
        elif not record.get("segs"):
            note = f"error: {_first_line(record.get('error'))}" if record.get("status") == "error" else "no seg"
            columns.append((model, "", None, note))
        else:
            segs = load_segs(out_dir / record["segs"], loaded.spatial_shape)
            columns.append((model, _score_text(record), segs, None))

    fig = _render(loaded, columns, gts is not None)
    target = Path(output) if output is not None else out_dir / f"show-{case_path.stem}.png"
    return save_png(fig, target, dpi=DPI, tight=True)


def _render(case: Case, columns, has_gts: bool):
    n_labels = max([case.n_boxes] + [int(lab.max()) for _, _, lab, _ in columns if lab is not None and lab.size])
    colors = label_colors(n_labels)
    if case.dim == 2:
        h, w = case.imgs.shape[:2]
        aspect = 1.0
        slices = [None]
    else:
        d, h, w = case.imgs.shape
        sy, sx = (case.spacing[1], case.spacing[2]) if case.spacing else (1.0, 1.0)
        aspect = sy / sx
        box = case.boxes[0]
        slices = slice_indices(float(box[2]), float(box[5]), d)
    panels = 1 + len(columns)
    if case.dim == 2:
        ncols = min(panels, MAX_COLUMNS)
        nrows = -(-panels // ncols)
    else:
        ncols, nrows = panels, len(slices)
    panel_w = min(max(16.0 / ncols, PANEL_IN[0]), PANEL_IN[1])
    panel_h = panel_w * min(max(h * aspect / w, 0.4), 2.0)
    legend = n_labels <= 10
    fig = new_figure(panel_w * ncols, panel_h * nrows + 0.5 * (nrows if case.dim == 2 else 1) + 0.4)
    grid = fig.subplots(nrows, ncols, squeeze=False)
    thickness = max(1, int(round(max(h, w * aspect) / (panel_w * DPI))))

    for row, z in enumerate(slices):
        image = case.imgs if z is None else case.imgs[z]
        for k in range(panels):
            ax = grid[row, k] if case.dim == 3 else grid[k // ncols, k % ncols]
            ax.set_xticks([]), ax.set_yticks([])
            show_titles = case.dim == 2 or row == 0
            if z is None:
                ax.imshow(image, interpolation="antialiased")
            else:
                ax.imshow(image, cmap="gray", vmin=0, vmax=255, aspect=aspect, interpolation="antialiased")
            if k == 0:
                _draw_boxes(ax, case, z, colors)
                if show_titles:
                    ax.set_title(f"image, {case.n_boxes} box{'es' if case.n_boxes != 1 else ''}", fontsize=9.5)
                if z is not None:
                    ax.set_ylabel(f"slice z={z}", fontsize=10)
                continue
            title, subtitle, labels, note = columns[k - 1]
            if show_titles:
                ax.set_title(title + (f"\n{subtitle}" if subtitle else "\n "), fontsize=9.5)
            if labels is not None:
                ax.imshow(_overlay(labels if z is None else labels[z], colors, thickness),
                          aspect=aspect, interpolation="nearest")
            else:
                ax.images[0].set_alpha(0.3)
                ax.text(0.5, 0.5, textwrap.fill(note, 28), transform=ax.transAxes, ha="center", va="center",
                        fontsize=8.5, color="darkred" if note.startswith("error") else "0.25",
                        bbox=dict(facecolor="white", alpha=0.85, edgecolor="0.7"))
    if case.dim == 2:
        for k in range(panels, nrows * ncols):
            grid[k // ncols, k % ncols].set_visible(False)

    shape = "x".join(str(s) for s in case.spatial_shape)
    missing = "" if has_gts else ", no ground truth"
    fig.suptitle(f"{case.name}  ({case.dim}D {case.modality}, {shape}{missing})", fontsize=11)
    if legend:  # just under the lowest panels (the layout may leave room below them: cropped when saved)
        from matplotlib.patches import Patch

        fig.canvas.draw()
        fig.set_layout_engine("none")
        bottom = min(ax.get_position().y0 for ax in fig.axes if ax.get_visible())
        handles = [Patch(facecolor=colors[i], edgecolor=colors[i], label=f"label {i}") for i in range(1, n_labels + 1)]
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, bottom - 0.005), ncols=min(n_labels, 10),
                   fontsize=8.5, frameon=False, handlelength=1.2)
    return fig


def _draw_boxes(ax, case: Case, z: int | None, colors: np.ndarray) -> None:
    """Box i in label i+1's colour; in 3D only the boxes whose z-range holds slice z."""
    from matplotlib.patches import Rectangle

    for i, box in enumerate(case.boxes):
        if z is None:
            x0, y0, x1, y1 = (float(v) for v in box)
        else:
            x0, y0, z0, x1, y1, z1 = (float(v) for v in box)
            if not z0 <= z <= z1:
                continue
        color = colors[(i % (len(colors) - 1)) + 1] if len(colors) > 1 else "yellow"
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, edgecolor=color,
                               linewidth=1.4))
