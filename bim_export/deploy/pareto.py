"""pareto.png: latency against quality of every candidate, with each latency's stated error.

How it reads:

- one marker shape per precision (fp32 circle, fp16 square, int8 triangle) and one colour per
  precision, or, in a run of several checkpoints, one colour per checkpoint; filled when
  the candidate met every budget, hollow when it was rejected; the chosen one edged in black on a
  gold star;
- the markers of one depth share its quality, and predicted fp32 and fp16 latencies often coincide:
  each precision is drawn a few points to the side of the last (a fixed order, a few per cent of
  latency on a log axis, far inside the stated errors), so none hides another, and its error bars a
  point or two higher or lower, so coinciding bars stay apart without moving a marker off its quality;
- horizontal error bars: each candidate's stated error on the plotted statistic;
- the quality axis starts at 0 %, so a one-point difference looks like one point, and the caption
  names the metric and the images that scored it.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# precision: (colour, marker); drawn top to bottom in this order
STYLE = {"fp32": ("tab:blue", "o"), "fp16": ("tab:green", "s"), "int8": ("tab:orange", "^")}
OTHER = ("tab:gray", "D")
CHECKPOINT_COLOURS = ("tab:blue", "tab:red", "tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink")
DODGE_X_PT = 8.0  # horizontal distance between the markers of one depth, in points
DODGE_Y_PT = 2.0  # vertical distance between their error bars, in points
MARKER_S = 42  # marker area, points^2


@dataclass
class PlotPoint:
    """One candidate on the Pareto plot.

    Attributes:
        depth: the exit depth.
        precision: fp32, fp16 or int8.
        latency_ms: the latency used for the budget check (None if never estimated).
        quality: the exit's quality (held-out task top-1 or kNN top-1, in [0, 1]), or None.
        rejected: the reason it was rejected, or None if it met every budget.
        chosen: whether this is the selected candidate.
        source: ``measured`` / ``predicted`` / ...
        error: the stated relative error of ``latency_ms`` (0.1 = ±10 %), or None if none is stated.
        checkpoint: its checkpoint where the run has several ("" otherwise).
        resolution: its input size in px where the run has several or another than the checkpoint's.
    """

    depth: int
    precision: str
    latency_ms: float | None
    quality: float | None
    rejected: str | None = None
    chosen: bool = False
    source: str = ""
    error: float | None = None
    checkpoint: str = ""
    resolution: int | None = None

    @property
    def label(self) -> str:
        return " ".join(filter(None, [self.checkpoint, self.tag, self.precision]))

    @property
    def tag(self) -> str:
        """``d6``, or ``d6@48`` for a candidate at a named resolution."""
        return f"d{self.depth}" + (f"@{self.resolution}" if self.resolution else "")


def plot_pareto(points: list[PlotPoint], budget_ms: float, path: Path, title: str = "",
                quality_source: str | None = None, stat: str = "", quality_metric: str = "knn_top1") -> None:
    """Writes :func:`pareto_figure` to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = pareto_figure(points, budget_ms, title, quality_source, stat, quality_metric)
    fig.savefig(path)
    plt.close(fig)


def pareto_figure(points: list[PlotPoint], budget_ms: float, title: str = "", quality_source: str | None = None,
                  stat: str = "", quality_metric: str = "knn_top1") -> Any:
    """The figure of every candidate: latency (log x) against quality (y from 0).

    Each candidate with a latency is one marker whose ``gid`` is its label (``d6 fp16``); each
    precision's error bars are one ``errorbar`` container labelled ``error <precision>``, a bar per
    candidate with a stated error. Candidates without a latency are named in the caption.

    Args:
        points: every candidate.
        budget_ms: the latency budget (NaN: none).
        title: the figure's title.
        quality_source: the images and protocol that scored the quality (for the caption).
        stat: the latency statistic plotted (p50, p90, ...), for the axis label.
        quality_metric: what the quality is (``task_top1``, ``knn_top1``; see selector.QUALITY_LABELS).

    Returns:
        A matplotlib Figure (Agg backend; the caller closes it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter
    from matplotlib.transforms import ScaledTranslation

    from .selector import quality_label

    metric = quality_label(quality_metric)

    pts = [p for p in points if p.latency_ms is not None]
    have_quality = bool(pts) and all(p.quality is not None for p in pts)
    fig, ax = plt.subplots(figsize=(7.5, 6.0), dpi=120)
    order = [k for k in STYLE if any(p.precision == k for p in pts)]
    order += sorted({p.precision for p in pts} - set(order))
    # the first precision left-most and its bars top-most; the middle one where its figures are
    dodge = {k: i - (len(order) - 1) / 2 for i, k in enumerate(order)}
    shift = {k: ax.transData + ScaledTranslation(dodge[k] * DODGE_X_PT / 72, 0, fig.dpi_scale_trans) for k in order}
    bar_shift = {k: ax.transData + ScaledTranslation(dodge[k] * DODGE_X_PT / 72, -dodge[k] * DODGE_Y_PT / 72,
                                                     fig.dpi_scale_trans) for k in order}
    left = _left_edge(pts)

    def y(p: PlotPoint) -> float:
        return p.quality * 100 if have_quality else p.depth

    checkpoints = list(dict.fromkeys(p.checkpoint for p in pts))
    by_checkpoint = len(checkpoints) > 1

    def colour(p_checkpoint: str, prec: str) -> str:
        if by_checkpoint:
            return CHECKPOINT_COLOURS[checkpoints.index(p_checkpoint) % len(CHECKPOINT_COLOURS)]
        return STYLE.get(prec, OTHER)[0]

    groups = sorted({(p.checkpoint, p.resolution or 0, p.precision) for p in pts},
                    key=lambda g: (checkpoints.index(g[0]), -g[1], order.index(g[2])))
    for ckpt_name, res, prec in groups:
        color, marker = colour(ckpt_name, prec), STYLE.get(prec, OTHER)[1]
        line = sorted((p for p in pts if (p.checkpoint, p.resolution or 0, p.precision) == (ckpt_name, res, prec)),
                      key=lambda p: p.depth)
        ax.plot([p.latency_ms for p in line], [y(p) for p in line], color=color, alpha=0.3, linewidth=1,
                zorder=1, transform=shift[prec])
        barred = [p for p in line if p.error is not None]
        if barred:
            low = [p.latency_ms - max(p.latency_ms * (1 - p.error), left) for p in barred]
            high = [p.latency_ms * p.error for p in barred]
            ax.errorbar([p.latency_ms for p in barred], [y(p) for p in barred], xerr=[low, high], fmt="none",
                        ecolor=color, elinewidth=1, capsize=2.5, alpha=0.75, zorder=3.5, transform=bar_shift[prec],
                        label=" ".join(filter(None, ["error", ckpt_name, f"@{res}" if res else "", prec])))
        for p in line:
            if p.chosen:  # under the marker, so the marker's shape and fill still show
                ax.scatter(p.latency_ms, y(p), s=300, marker="*", facecolors="gold", edgecolors="black",
                           linewidths=0.8, zorder=3, transform=shift[prec])
            ax.scatter(p.latency_ms, y(p), s=MARKER_S, marker=marker, linewidths=1.4, transform=shift[prec],
                       facecolors="white" if p.rejected else color, edgecolors="black" if p.chosen else color,
                       zorder=5 if p.rejected else 4, gid=p.label)
    for tag in sorted({(p.checkpoint, p.tag) for p in pts}):  # one label per depth, over the middle of its markers
        group = [p for p in pts if (p.checkpoint, p.tag) == tag]
        x = math.exp(sum(math.log(p.latency_ms) for p in group) / len(group))
        ax.annotate(tag[1], (x, max(y(p) for p in group)), textcoords="offset points", xytext=(0, 8),
                    ha="center", fontsize=7.5, color="0.25")
    if budget_ms == budget_ms:  # not NaN: the profile has a latency budget
        ax.axvline(budget_ms, color="tab:red", linestyle="--", linewidth=1.2)
        ax.annotate(f"budget {budget_ms:g} ms", (budget_ms, 0.02), xycoords=("data", "axes fraction"),
                    textcoords="offset points", xytext=(4, 0), color="tab:red", fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "235" else ""))
    if pts:  # set here: autoscaling does not follow the shifted artists
        right = [p.latency_ms * (1 + (p.error or 0)) for p in pts] + ([budget_ms] if budget_ms == budget_ms else [])
        ax.set_xlim(left, 1.5 * max(right))  # room for the budget label
    if have_quality:
        ax.set_ylim(0, 100)
        ax.set_yticks(range(0, 101, 10))
    else:
        ax.set_ylim(0, max((p.depth for p in pts), default=1) + 1)
    ax.set_xlabel(f"latency{' ' + stat if stat else ''} (ms, log scale)")
    ax.set_ylabel(f"{metric} of the exit (%)" if have_quality else "exit depth (no quality figures: deeper is better)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(handles=_legend(plt, order, pts, checkpoints if by_checkpoint else []), loc="lower left", fontsize=7.5,
              title="d6: exit depth 6" + (", d6@48: at 48 px" if any(p.resolution for p in pts) else ""),
              title_fontsize=7.5)
    ax.grid(True, which="both", alpha=0.3)
    fig.text(0.01, 0.01, _caption(points, have_quality, quality_source, metric), fontsize=7, va="bottom", ha="left")
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    return fig


def _left_edge(pts: list[PlotPoint]) -> float:
    """The x axis' left end: room for every error bar below 100 %; a larger one stops here."""
    ends = [p.latency_ms * (1 - p.error) for p in pts if p.error is not None and p.error < 1]
    lows = [p.latency_ms for p in pts] + ends
    return 0.8 * min(lows) if lows else 1.0


def _legend(plt, order: list[str], pts: list[PlotPoint], checkpoints: list[str]) -> list:
    handles = []
    for i, name in enumerate(checkpoints):  # a run of several checkpoints: colour names the checkpoint
        handles.append(plt.Line2D([], [], linestyle="-", color=CHECKPOINT_COLOURS[i % len(CHECKPOINT_COLOURS)],
                                  label=f"checkpoint {name}"))
    for prec in order:
        color, marker = STYLE.get(prec, OTHER)
        handles.append(plt.Line2D([], [], marker=marker, linestyle="-", color="gray" if checkpoints else color,
                                  alpha=0.9, label=prec))
    handles += [
        plt.Line2D([], [], marker="o", linestyle="", markerfacecolor="gray", markeredgecolor="gray",
                   label="met every budget (filled)"),
        plt.Line2D([], [], marker="o", linestyle="", markerfacecolor="white", markeredgecolor="gray",
                   markeredgewidth=1.4, label="rejected (hollow)"),
        plt.Line2D([], [], marker="*", linestyle="", markersize=13, markerfacecolor="gold", markeredgecolor="black",
                   label="chosen"),
    ]
    if any(p.error is not None for p in pts):
        handles.append(plt.Line2D([], [], marker="|", markersize=8, color="gray", label="stated latency error"))
    handles.append(plt.Line2D([], [], linestyle="--", color="tab:red", label="latency budget"))
    return handles


def _caption(points: list[PlotPoint], have_quality: bool, quality_source: str | None,
             metric: str = "kNN top-1") -> str:
    parts = []
    if have_quality:
        parts.append(f"Quality: the exit's {metric} on {quality_source or 'an evaluation set metrics.json does not name'}"
                     "; the axis starts at 0 %.")
    parts.append(f"The precisions of one depth are drawn {DODGE_X_PT:g} pt apart sideways (in the legend's order, "
                 f"left to right) and their error bars {DODGE_Y_PT:g} pt apart, so none hides another. Error bars: "
                 "each candidate's stated latency error; a bar at the left edge is ±100 % or more.")
    missing = [p.label + (f" ({p.rejected})" if p.rejected else "") for p in points if p.latency_ms is None]
    if missing:
        parts.append(f"Not plotted (no latency): {'; '.join(missing)}.")
    return "\n".join(textwrap.fill(t, 150) for t in parts)
