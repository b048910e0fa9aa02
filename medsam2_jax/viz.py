"""Pictures of segmentations: slice overlays, a grid of slices, and a per-slice metric plot (PNG).

Everything draws on a ``matplotlib.figure.Figure`` rendered by the Agg canvas, never through ``pyplot``, so
importing this module changes no global matplotlib state (no backend switch, no open figure windows) and it
works on machines without a display.

Conventions: an image slice is ``(H, W)`` or ``(H, W, C)`` (channel 0 is shown in grey, which for the
preprocessed three-channel frames is the slice itself); masks are ``(H, W)`` and non-zero means inside.
Prompt coordinates are ``(x, y) = (column, row)`` pixel indices, as :mod:`medsam2_jax.data.prompts` and the
tracker use them; a box is ``(x0, y0, x1, y1)`` with inclusive pixel indices, drawn around those pixels.
Colours: ground truth green, prediction red (filled and outlined), box yellow, positive clicks green stars,
negative clicks red crosses.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

GT_COLOR = "#00d000"
PRED_COLOR = "#ff3030"
BOX_COLOR = "#ffd400"
NEG_COLOR = "#ff3030"

__all__ = ["display_range", "draw_overlay", "save_overlay", "save_slice_grid", "save_per_slice_plot"]


def _grey(image: Any, name: str = "image") -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3:
        img = img[..., 0]
    if img.ndim != 2:
        raise ValueError(f"{name} must be an (H, W) or (H, W, C) slice, got shape {np.shape(image)}")
    return img.astype(np.float32)


def _mask(mask: Any, shape: tuple[int, int], name: str) -> np.ndarray | None:
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.shape != shape:
        raise ValueError(f"{name} must have the image's shape {shape}, got {m.shape}")
    return m != 0


def display_range(image: Any, low: float = 1.0, high: float = 99.0) -> tuple[float, float]:
    """A grey-level window ``(vmin, vmax)``: the ``low`` / ``high`` percentiles of the finite values."""
    v = np.asarray(image, dtype=np.float32)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [low, high])
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def draw_overlay(
    ax,
    image: Any,
    *,
    gt: Any = None,
    pred: Any = None,
    points: Any = None,
    point_labels: Any = None,
    box: Any = None,
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    legend: bool = False,
    pred_fill: bool = True,
    pred_label: str = "prediction",
) -> None:
    """Draw one slice on a matplotlib ``Axes``: grey image, ground-truth contour, prediction fill and contour
    (outline only with ``pred_fill=False``), prompt box and clicks (labels 1 positive, 0 negative; -1 padding
    and 2/3 box corners are skipped)."""
    img = _grey(image)
    g = _mask(gt, img.shape, "gt")
    p = _mask(pred, img.shape, "pred")
    if vmin is None or vmax is None:
        lo, hi = display_range(img)
        vmin = lo if vmin is None else vmin
        vmax = hi if vmax is None else vmax
    ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    if p is not None and p.any():
        if pred_fill:
            rgba = np.zeros(img.shape + (4,), np.float32)
            rgba[p] = (1.0, 0.19, 0.19, 0.35)
            ax.imshow(rgba, interpolation="nearest")
        ax.contour(p.astype(np.float32), levels=[0.5], colors=[PRED_COLOR], linewidths=1.0)
    if g is not None and g.any():
        ax.contour(g.astype(np.float32), levels=[0.5], colors=[GT_COLOR], linewidths=1.2)
    if box is not None:
        b = np.asarray(box, dtype=np.float32).reshape(-1)
        if b.shape != (4,):
            raise ValueError(f"box must be (x0, y0, x1, y1), got shape {np.shape(box)}")
        ax.add_patch(Rectangle((b[0] - 0.5, b[1] - 0.5), b[2] - b[0] + 1, b[3] - b[1] + 1, fill=False,
                               edgecolor=BOX_COLOR, linewidth=1.5))
    if points is not None:
        pts = np.asarray(points, dtype=np.float32).reshape(-1, 2)
        lab = np.ones(len(pts), np.int32) if point_labels is None else np.asarray(point_labels).reshape(-1)
        if lab.shape[0] != pts.shape[0]:
            raise ValueError(
                f"point_labels must have one label per point: {pts.shape[0]} points, {lab.shape[0]} labels"
            )
        pos, neg = pts[lab == 1], pts[lab == 0]
        if len(pos):
            ax.scatter(pos[:, 0], pos[:, 1], marker="*", s=120, c=GT_COLOR, edgecolors="white", linewidths=0.8)
        if len(neg):
            ax.scatter(neg[:, 0], neg[:, 1], marker="X", s=80, c=NEG_COLOR, edgecolors="white", linewidths=0.8)
    ax.set_xlim(-0.5, img.shape[1] - 0.5)
    ax.set_ylim(img.shape[0] - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    if legend:
        handles = [] if g is None else [Line2D([], [], color=GT_COLOR, lw=1.2, label="ground truth")]
        handles.append(Patch(facecolor=PRED_COLOR, alpha=0.5, edgecolor=PRED_COLOR, label=pred_label) if pred_fill
                       else Line2D([], [], color=PRED_COLOR, lw=1.0, label=pred_label))
        if box is not None:
            handles.append(Patch(fill=False, edgecolor=BOX_COLOR, label="box prompt"))
        if points is not None:
            handles.append(Line2D([], [], marker="*", ls="", color=GT_COLOR, label="click"))
        ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.7)


def _save(fig: Figure, path: str | os.PathLike, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi)
    return path


def save_overlay(path: str | os.PathLike, image: Any, *, dpi: int = 100, size_in: float = 4.0, **kw: Any) -> Path:
    """One slice as a PNG (see :func:`draw_overlay` for the keywords); returns the path."""
    fig = Figure(figsize=(size_in, size_in), layout="constrained")
    draw_overlay(fig.add_subplot(1, 1, 1), image, legend=True, **kw)
    return _save(fig, path, dpi)


def save_slice_grid(
    path: str | os.PathLike,
    images: Any,
    indices: Sequence[int],
    *,
    gt: Any = None,
    pred: Any = None,
    prompts: Mapping[int, Mapping[str, Any]] | None = None,
    titles: Sequence[str] | None = None,
    ncols: int = 4,
    suptitle: str | None = None,
    dpi: int = 100,
    tile_in: float = 2.6,
) -> Path:
    """Slices ``indices`` of a stack ``images`` (T, H, W[, C]) in a grid, with ``gt`` / ``pred`` (T, H, W) and
    ``prompts`` ``{slice: {"box": ..., "points": ..., "point_labels": ...}}`` drawn on their slices.
    One grey window (from the whole stack) is used for every tile so that slices compare fairly."""
    stack = np.asarray(images)
    if stack.ndim not in (3, 4):
        raise ValueError(f"images must be a (T, H, W) or (T, H, W, C) stack, got shape {stack.shape}")
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError("indices is empty: give at least one slice to draw")
    bad = [i for i in idx if not 0 <= i < stack.shape[0]]
    if bad:
        raise ValueError(f"indices {bad} are outside the stack of {stack.shape[0]} slices")
    if titles is not None and len(titles) != len(idx):
        raise ValueError(f"titles must have one entry per index: {len(idx)} indices, {len(titles)} titles")
    for name, m in (("gt", gt), ("pred", pred)):
        if m is not None and np.shape(m) != stack.shape[:3]:
            raise ValueError(f"{name} must be (T, H, W) = {stack.shape[:3]}, got {np.shape(m)}")
    vmin, vmax = display_range(stack[..., 0] if stack.ndim == 4 else stack)
    ncols = max(1, min(int(ncols), len(idx)))
    nrows = math.ceil(len(idx) / ncols)
    fig = Figure(figsize=(tile_in * ncols, tile_in * nrows + (0.4 if suptitle else 0)), layout="constrained")
    prompts = prompts or {}
    for k, i in enumerate(idx):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        pr = prompts.get(i, {})
        draw_overlay(ax, stack[i], gt=None if gt is None else np.asarray(gt)[i],
                     pred=None if pred is None else np.asarray(pred)[i], box=pr.get("box"),
                     points=pr.get("points"), point_labels=pr.get("point_labels"),
                     title=titles[k] if titles is not None else f"slice {i}", vmin=vmin, vmax=vmax,
                     legend=k == 0)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return _save(fig, path, dpi)


def save_per_slice_plot(
    path: str | os.PathLike,
    slices: Sequence[int],
    series: Mapping[str, Sequence[float]],
    *,
    areas: Mapping[str, Sequence[float]] | None = None,
    mark: int | None = None,
    mark_label: str = "prompted slice",
    ylabel: str = "score",
    xlabel: str = "slice",
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Per-slice curves (e.g. Dice and IoU, in [0, 1]) against slice index, optional areas (voxels) on a
    second axis, and a vertical line at slice ``mark``. NaN values leave gaps (slices where a score is
    undefined or not meaningful)."""
    x = np.asarray(slices)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"slices must be a non-empty 1D sequence, got shape {x.shape}")
    if not series:
        raise ValueError("series is empty: give at least one curve, e.g. {'Dice': values}")
    for name, v in list(series.items()) + list((areas or {}).items()):
        if np.shape(v) != x.shape:
            raise ValueError(f"series {name!r} has shape {np.shape(v)}, expected one value per slice {x.shape}")
    fig = Figure(figsize=(7.0, 3.6), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for name, v in series.items():
        ax.plot(x, np.asarray(v, dtype=np.float64), marker="o", ms=3, lw=1.3, label=name)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if mark is not None:
        handles.append(ax.axvline(mark, color=BOX_COLOR, ls="--", lw=1.5))
        labels.append(mark_label)
    if areas:
        ax2 = ax.twinx()
        for (name, v), style in zip(areas.items(), ("-", ":", "-.", "--")):
            (h,) = ax2.plot(x, np.asarray(v, dtype=np.float64), color="grey", ls=style, lw=1.0, label=name)
            handles.append(h)
            labels.append(name)
        ax2.set_ylabel("area (voxels)")
        ax2.set_ylim(bottom=0)
    ax.legend(handles, labels, fontsize=8, loc="upper left", framealpha=0.8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path, dpi)
