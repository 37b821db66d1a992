"""pareto.png's figure, read through its matplotlib artists: every candidate drawn, none hidden, error bars
equal to the stated errors, an honest quality axis, a legend that matches the markers."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

from bim_export.deploy.pareto import STYLE, PlotPoint, pareto_figure, plot_pareto

matplotlib.use("Agg")


def _points() -> list[PlotPoint]:
    """A jetson-like table: fp32 and fp16 predicted alike (they would coincide), int8 a little slower."""
    pts = []
    for depth, lat, q in ((3, 1.36, 0.700), (6, 2.52, 0.711), (9, 3.68, 0.744), (12, 4.84, 0.722)):
        pts += [PlotPoint(depth, "fp32", lat, q, error=0.59),
                PlotPoint(depth, "fp16", lat, q, chosen=depth == 9, error=0.59),
                PlotPoint(depth, "int8", lat * 1.06, q, error=0.2,
                          rejected="parity failed" if depth == 12 else None)]
    pts.append(PlotPoint(12, "fp32", 1.2, 0.722, error=1.3))  # an error of ±130 %: its bar stops at the edge
    pts.append(PlotPoint(1, "int8", None, 0.5, rejected="pruned"))
    return pts


@pytest.fixture
def figure():
    import matplotlib.pyplot as plt

    fig = pareto_figure(_points(), 8.0, "jetson: latency (p90) vs quality", "heldout_images (90 images)", "p90")
    yield fig
    plt.close(fig)


def _markers(fig) -> dict[str, list]:
    """The candidate markers by label (gid), each as its collection."""
    out: dict[str, list] = {}
    for coll in fig.axes[0].collections:
        if coll.get_gid():
            out.setdefault(coll.get_gid(), []).append(coll)
    return out


def _display_centres(fig) -> dict[str, np.ndarray]:
    fig.canvas.draw()
    return {gid: np.concatenate([c.get_offset_transform().transform(c.get_offsets()) for c in colls])
            for gid, colls in _markers(fig).items()}


def test_every_candidate_with_a_latency_is_drawn_and_the_others_are_named(figure):
    pts = _points()
    markers = _markers(figure)
    drawn = [p for p in pts if p.latency_ms is not None]
    assert sum(len(v) for v in markers.values()) == len(drawn)
    assert set(markers) == {p.label for p in drawn}
    caption = "\n".join(t.get_text() for t in figure.texts)
    assert "Not plotted (no latency): d1 int8 (pruned)" in caption.replace("\n", " ")


def test_coinciding_candidates_do_not_hide_each_other(figure):
    centres = _display_centres(figure)
    size = np.sqrt(_markers(figure)["d3 fp32"][0].get_sizes()[0]) * figure.dpi / 72  # marker width, pixels
    for depth in (3, 6, 9, 12):  # fp32 and fp16 have the same latency and quality
        a, b = centres[f"d{depth} fp32"][0], centres[f"d{depth} fp16"][0]
        assert np.linalg.norm(a - b) >= 0.99 * size
        assert a[1] == pytest.approx(b[1])  # side by side: neither is moved off its quality


def test_error_bars_are_the_stated_errors(figure):
    ax = figure.axes[0]
    bars = {c.get_label(): c for c in ax.containers}
    assert set(bars) == {f"error {k}" for k in STYLE}
    left = ax.get_xlim()[0]
    for prec in STYLE:
        pts = sorted((p for p in _points() if p.precision == prec and p.latency_ms is not None),
                     key=lambda p: p.depth)
        segments = bars[f"error {prec}"].lines[2][0].get_segments()
        assert len(segments) == len(pts)
        for p, seg in zip(pts, segments):
            (x0, y0), (x1, y1) = seg
            assert y0 == y1 == pytest.approx(p.quality * 100)
            assert x1 == pytest.approx(p.latency_ms * (1 + p.error))
            if p.error < 1:
                assert x0 == pytest.approx(p.latency_ms * (1 - p.error))
            else:  # no lower end on a log axis: the bar runs to the axis' edge
                assert x0 == pytest.approx(left)


def test_quality_axis_starts_at_zero_and_names_its_metric_and_set(figure):
    ax = figure.axes[0]
    assert ax.get_ylim() == (0, 100)
    assert "kNN top-1" in ax.get_ylabel()
    caption = " ".join(t.get_text() for t in figure.texts).replace("\n", " ")
    assert "heldout_images (90 images)" in caption and "starts at 0 %" in caption


def test_a_finetuned_checkpoints_axis_and_caption_name_the_task_top1():
    import matplotlib.pyplot as plt

    fig = pareto_figure(_points(), 4.0, quality_source="pets (30 images; given validation folder)",
                        quality_metric="task_top1")
    try:
        assert fig.axes[0].get_ylabel() == "held-out task top-1 (fine-tuned) of the exit (%)"
        caption = " ".join(t.get_text() for t in fig.texts).replace("\n", " ")
        assert "Quality: the exit's held-out task top-1 (fine-tuned) on pets (30 images;" in caption
        assert "kNN" not in caption
    finally:
        plt.close(fig)


def test_legend_matches_the_markers(figure):
    from matplotlib.markers import MarkerStyle

    handles = figure.axes[0].get_legend().legend_handles
    by_label = {h.get_label(): h for h in handles}
    for prec, (color, marker) in STYLE.items():
        assert by_label[prec].get_marker() == marker
        assert matplotlib.colors.same_color(by_label[prec].get_color(), color)
        drawn = _markers(figure)[f"d3 {prec}"][0]
        style = MarkerStyle(marker)
        assert np.allclose(drawn.get_paths()[0].vertices, style.get_path().transformed(style.get_transform()).vertices)
    rejected = _markers(figure)["d12 int8"][0]
    met = _markers(figure)["d6 int8"][0]
    assert matplotlib.colors.same_color(rejected.get_facecolor()[0], "white")  # hollow, as the legend says
    assert matplotlib.colors.same_color(by_label["rejected (hollow)"].get_markerfacecolor(), "white")
    assert matplotlib.colors.same_color(met.get_facecolor()[0], STYLE["int8"][0])  # filled
    assert {"chosen", "latency budget", "stated latency error"} <= set(by_label)


def test_without_quality_the_axis_is_the_depth_from_zero(tmp_path):
    import matplotlib.pyplot as plt

    pts = [PlotPoint(d, "fp32", float(d), None) for d in (2, 4)]
    fig = pareto_figure(pts, float("nan"))
    try:
        assert fig.axes[0].get_ylim()[0] == 0 and "depth" in fig.axes[0].get_ylabel()
        assert not fig.axes[0].containers  # no stated errors, no bars
    finally:
        plt.close(fig)
    plot_pareto(pts, float("nan"), tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
