"""Reusable pieces of the pages: figure builders (heatmap, bucketed lines, message) and layout bits.

Figure builders are plain functions of numpy arrays so the benchmark and tests can time/check the
data path without a browser; pages only glue them to callbacks.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from dash import dcc, html

from dashboards.bucketing import TARGET_BUCKETS, minmax_line
from dashboards.cache import Cache

MODALITY_COLORS = {"text": "#1f77b4", "vit": "#2ca02c", "vae": "#ff7f0e"}
RUN_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
SUBPLOT_BUCKETS = 300
"""Buckets per series in a one-third-width subplot (~400 px of plot area: 300 buckets of ≤ 2
points already exceed a point per pixel column; 500 cost the browser ~30% more to draw)."""
HALF_BUCKETS = 750
"""Buckets per series in a half-width graph (two graphs in a row): ~1 per pixel column. The
browser pays per point/cell drawn (SVG path points, heatmap cells), so fewer buckets paint
faster; line extremes stay exact at any bucket count."""
TEMPLATE = go.layout.Template(pio.templates["plotly_white"])
"""plotly_white with fixed margins. Automatic margins (axis `automargin`, legends and colour bars
pushing `margin.autoexpand`) make plotly.js lay every graph out twice: ~45% of the Routing page's
draw time in the browser. Figures set margins that fit their legend and colour bar instead."""
TEMPLATE.layout.xaxis.automargin = False
TEMPLATE.layout.yaxis.automargin = False
TEMPLATE.layout.margin.autoexpand = False
# Tick labels are drawn as they are, not measured to hide those that cross the graph's edge:
# plotly.js measures every label once per label of its axis (a forced layout each), ~60-120 ms of
# main thread before a first visit's first screen (A/B of 10 and 8 fresh-profile opens).
TEMPLATE.layout.xaxis.ticklabeloverflow = "allow"
TEMPLATE.layout.yaxis.ticklabeloverflow = "allow"
LEGEND_BELOW = dict(legend=dict(orientation="h", y=-0.25, yanchor="top"),
                    margin=dict(l=55, r=20, t=45, b=100))
"""Horizontal legend under the x-axis title, and the bottom margin it needs."""
SUBPLOTS_LEGEND_BELOW = dict(LEGEND_BELOW, margin=dict(l=45, r=20, t=75, b=100))
"""The same for a row of subplots (their titles need the taller top margin)."""
_BASE = dict(template=TEMPLATE, margin=dict(l=55, r=20, t=45, b=45), height=330)


_messages = Cache("messages", entries=256)


def message_figure(text: str, title: str = "") -> go.Figure:
    """An empty plot carrying a message: errors and 'nothing yet' stay on the page, not in logs.

    Cached (callers never modify it): validating the template costs ~25 ms a figure, and a page
    layout holds several placeholders."""
    def build():
        fig = go.Figure()
        fig.update_layout(**_BASE, title=title, xaxis_visible=False, yaxis_visible=False,
                          annotations=[dict(text=text, showarrow=False, xref="paper",
                                            yref="paper", x=0.5, y=0.5,
                                            font=dict(size=14, color="#a33"))])
        return fig
    return _messages.get((text, title), None, build)


def label_axis(labels) -> tuple[list | np.ndarray, dict]:
    """Values and axis settings for the labels of a heatmap axis. Consecutive integers (layers,
    experts) go on a linear axis with whole-number ticks: plotly.js measures every category
    label when it draws (64 experts: ~20 ms of a page's first paint) and a linear axis labels
    ~10. Other labels stay categories, in the given order."""
    try:
        v = np.array([int(str(x)) for x in labels])
    except ValueError:
        v = None
    if v is None or not len(v) or not np.array_equal(v, np.arange(v[0], v[0] + len(v))):
        return [str(x) for x in labels], dict(type="category")
    return v, dict(type="linear", tick0=0, dtick=1 if len(v) <= 12 else None)


def heatmap(z_YX, x, y, *, title: str, xlabel: str = "step", ylabel: str = "",
            colorscale: str = "Viridis", zmid=None, zmin=None, zmax=None,
            bucket_note: str = "", uirevision=None) -> go.Figure:
    """Heatmap with rows y (see `label_axis`) and columns x; `bucket_note` (e.g. from
    `bucket_note`) is added to the title in small print."""
    # float32 halves what travels to the browser (plotly ships numpy arrays as typed binary)
    z_YX = np.asarray(z_YX, dtype=np.float32)
    y, y_axis = label_axis(y)
    fig = go.Figure(go.Heatmap(z=z_YX, x=np.asarray(x), y=y, colorscale=colorscale, zmid=zmid,
                               zmin=zmin, zmax=zmax, hoverongaps=False,
                               colorbar=dict(thickness=12,
                                             ticklabeloverflow="allow")))
    fig.update_layout(**{**_BASE, "margin": dict(_BASE["margin"], r=85)},  # r: the colour bar
                      title=with_note(title, bucket_note), xaxis_title=xlabel, yaxis_title=ylabel,
                      uirevision=uirevision)
    fig.update_yaxes(**y_axis)
    return fig


def with_note(title: str, note: str) -> str:
    return f"{title}  <span style='font-size:11px'>({note})</span>" if note else title


def bucket_note(b, what: str, *, per: str = "bucket", steps: bool = False) -> str:
    """What a column or a line point of `b` (dashboards.bucketing.Buckets) stands for: '' for
    single rows; else `what` of its rows and, with `steps` (lines: extremes drawn at their step),
    how exact those steps are when read from rollup windows."""
    if b is None or b.size == 1:
        return ""
    note = f"{what} of {b.size} rows per {per}"
    return note + (f"; steps to within {b.factor}" if steps and b.factor > 1 else "")


def bucket_heatmap(b, z_BY, y, *, what: str = "mean", **kw) -> go.Figure:
    """Heatmap of a (bucket, Y) block of `b` (dashboards.bucketing.Buckets), a column per
    bucket at its first step; `what` a column is of its rows (for the title's note)."""
    return heatmap(np.asarray(z_BY).T, b.step, y, bucket_note=bucket_note(b, what, per="column"),
                   **kw)


def line_figure(title: str, *, xlabel: str = "step", ylabel: str = "", uirevision=None,
                height: int | None = None, note: str = "") -> go.Figure:
    fig = go.Figure()
    fig.update_layout(**{**_BASE, **LEGEND_BELOW}, title=with_note(title, note), xaxis_title=xlabel,
                      yaxis_title=ylabel, uirevision=uirevision)
    if height:
        fig.update_layout(height=height)
    return fig


def add_line(fig: go.Figure, steps, values, name: str, *, target: int = TARGET_BUCKETS,
             **kw) -> None:
    """A min/max-bucketed series: extremes of every bucket are drawn exactly. Narrow subplots
    pass a smaller `target`: SVG lines cost the browser per point, and a third of the width
    cannot show more buckets anyway."""
    _trace(fig, *minmax_line(steps, values, target), name, **kw)


def add_bucket_line(fig: go.Figure, b, at, name: str, **kw) -> None:
    """Column `at` of `b` (dashboards.bucketing.Buckets, read with the graph's bucket target)
    as a line through each bucket's min and max."""
    _trace(fig, *b.line(at), name, **kw)


def _trace(fig, x, y, name, *, color=None, dash="solid", row=None, col=None, mode="lines",
           showlegend=True, legendgroup=None) -> None:
    x, y = np.asarray(x, dtype=np.int64 if np.asarray(x).dtype.kind in "iu" else np.float64), \
        np.asarray(y, dtype=np.float32)
    trace = go.Scatter(x=x, y=y, name=name, mode=mode, showlegend=showlegend,
                       legendgroup=legendgroup or name,
                       line=dict(color=color, dash=dash, width=1.6))
    if row is not None:
        fig.add_trace(trace, row=row, col=col)
    else:
        fig.add_trace(trace)


def graph(id_: str, fig: go.Figure | None = None, **style) -> dcc.Graph:
    return dcc.Graph(id=id_, figure=fig or message_figure("loading…"),
                     config={"displaylogo": False}, style=style or None)


def section(title: str, *children) -> html.Div:
    return html.Div([html.H3(title, className="section-title"), *children], className="section")


def row(*children) -> html.Div:
    return html.Div(list(children), className="row")


def labelled(label: str, control) -> html.Div:
    return html.Div([html.Label(label), control], className="control")
