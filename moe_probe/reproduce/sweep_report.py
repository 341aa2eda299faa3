"""Heat maps of ``reproduce --sweep`` (plotly): per heat map of the sweep, one row per metric
and three columns — moe mean, symbiotic mean (each with its ± half CI written in the cell) and
the paired symbiotic − moe difference (``*`` = Holm p < 0.05). One self-contained HTML; a PNG
per heat map through plotly's static export where it runs here (kaleido + a local browser)."""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from moe_probe.reproduce.sweep import ARCHS
from moe_probe.reproduce.sweep_results import diff_text, pm


def panel_figure(panel: dict, metrics: list[dict]) -> go.Figure:
    (yf, ys), (xf, xs) = panel["y"], panel["x"]
    cols = [*ARCHS, "symbiotic − moe (paired)"]
    fig = make_subplots(rows=len(metrics), cols=3, horizontal_spacing=0.08,
                        vertical_spacing=0.06,
                        subplot_titles=[f"{m['label']} · {c}" for m in metrics for c in cols])
    x, y = [str(v) for v in xs], [str(v) for v in ys]
    for r, m in enumerate(metrics, start=1):
        # one colour scale for the two architectures of a metric: their cells compare by eye
        means = [cell["metrics"][m["key"]][a]["mean"] for cell in panel["cells"] for a in ARCHS]
        means = [v for v in means if v is not None] or [0.0]
        for c, col in enumerate(cols, start=1):
            z, text = [], []
            for yv in ys:
                row = [cell for cell in panel["cells"] if cell["y"] == yv]
                cellm = [cell["metrics"][m["key"]] for cell in row]
                if c <= len(ARCHS):
                    z.append([cm[col]["mean"] for cm in cellm])
                    text.append([pm(cm[col], "<br>") for cm in cellm])
                else:
                    z.append([cm["diff"]["diff"] for cm in cellm])
                    text.append([diff_text(cm["diff"], "<br>") for cm in cellm])
            diff = c > len(ARCHS)
            fig.add_trace(go.Heatmap(
                z=z, x=x, y=y, text=text, texttemplate="%{text}", showscale=False,
                colorscale="RdBu" if diff else "Viridis", zmid=0 if diff else None,
                zmin=None if diff else min(means), zmax=None if diff else max(means),
                hovertemplate=f"{yf}=%{{y}} {xf}=%{{x}}<br>%{{text}}<extra>{col}</extra>"),
                row=r, col=c)
            fig.update_xaxes(title_text=xf, type="category", row=r, col=c)
            fig.update_yaxes(title_text=yf, type="category", row=r, col=c)
    fig.update_layout(title=panel["title"], height=260 * len(metrics), width=1100,
                      template="plotly_white", margin=dict(t=90))
    return fig


def write_html(result: dict, path: Path) -> list[str] | str:
    """Write the HTML; returns the PNG names written, or why none was."""
    figs = [panel_figure(p, result["metrics"]) for p in result["panels"]]
    parts = [pio.to_html(f, full_html=False, include_plotlyjs=(i == 0))
             for i, f in enumerate(figs)]
    path.write_text("<html><head><meta charset='utf-8'><title>moe-probe sweep</title></head>"
                    "<body>" + "\n".join(parts) + "</body></html>", encoding="utf-8")
    return _png(figs, result["panels"], path.parent)


def _png(figs, panels, out: Path) -> list[str] | str:
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return "plotly's static export needs the optional package kaleido, not installed"
    names = [f"sweep_{p['name']}.png" for p in panels]
    try:  # one export session for all (a second write_image call failed in kaleido 1.5)
        pio.write_images(figs, [out / n for n in names], width=[f.layout.width for f in figs],
                         height=[f.layout.height for f in figs])
    except Exception as e:  # noqa: BLE001 - a missing/failed browser: HTML only, said so
        return f"plotly's static export failed here: {str(e).splitlines()[0][:160]}"
    return names
