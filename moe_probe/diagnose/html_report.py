"""Self-contained HTML report: opens offline, plotly.js embedded exactly once.

Each figure travels as plain JSON in a ``<script type="application/json">`` tag and one small
loop draws them all — tests (and curious readers) can parse a figure's data straight back out.
"""

from __future__ import annotations

import html
import json
import re
from datetime import datetime, timezone

import plotly.offline

from moe_probe import __version__
from moe_probe.diagnose.figures_curves import capacity_figure, loss_figure, probe_figure
from moe_probe.diagnose.figures_maps import (cosine_figure, load_figure, ratio_figure,
                                             snapshot_figure)
from moe_probe.diagnose.figures_common import plain_spec, to_json_value
from moe_probe.diagnose.findings import Report
from moe_probe.diagnose.rundata import RunData

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em}
.finding{border-left:5px solid #999;padding:.3em .8em;margin:.6em 0;background:#fafafa}
.critical{border-color:#c0392b}.warning{border-color:#e67e22}.info{border-color:#2980b9}
.muted{color:#777}.fig{margin:1em 0}
"""

_DRAW = """
document.querySelectorAll('script[type="application/json"][data-fig]').forEach(function(s){
  var spec = JSON.parse(s.textContent);
  var div = document.getElementById(s.dataset.fig);
  Plotly.newPlot(div, spec.data, spec.layout, {responsive: true, displaylogo: false});
});
"""


def _fig_block(fig, fig_id: str) -> str:
    if fig is None:
        return ""
    fj = plain_spec(fig.to_plotly_json())
    spec = json.dumps({"data": fj["data"], "layout": fj["layout"]},
                      default=to_json_value, allow_nan=False,
                      separators=(",", ":"))
    # "</" inside a script element would end it early; "<\/" is the same JSON string.
    spec = spec.replace("</", "<\\/")
    return (f'<div class="fig" id="{fig_id}"></div>\n'
            f'<script type="application/json" data-fig="{fig_id}">{spec}</script>\n')


def _summary(report: Report) -> str:
    mods = []
    for r in report.runs:
        mods += [m for m in r.final_capacity_rate if m not in mods]
    head = "".join(f"<th>final capacity rate {html.escape(m)}</th>" for m in mods)
    rows = []
    for r in report.runs:
        caps = "".join("<td>{}</td>".format("–" if (v := r.final_capacity_rate.get(m)) is None
                                           else f"{v:.3f}") for m in mods)
        rows.append(f"<tr><td>{html.escape(r.name)}</td><td>{html.escape(r.recipe or '–')}</td>"
                    f"<td>{html.escape(r.arch or '–')}</td><td>{r.last_step}</td>{caps}"
                    f"<td>{len(r.findings)}</td></tr>")
    return (f"<table><tr><th>run</th><th>recipe</th><th>arch</th><th>last step</th>{head}"
            f"<th>findings</th></tr>{''.join(rows)}</table>")


def _text(s: str) -> str:
    """Escaped text with the Markdown `code` spans the explanations and remedies use."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(s))


def _findings(report: Report) -> str:
    out = []
    for r in report.runs:
        out.append(f"<h3>{html.escape(r.name)} <span class='muted'>{html.escape(r.run_dir)}"
                   f"</span></h3>")
        if not r.findings:
            out.append("<p>No findings.</p>")
        for f in r.findings:
            where = ", ".join(x for x in (
                f.evidence.get("component", ""),
                f.modality or "", "layers " + ",".join(f.layers) if f.layers else "",
                f"from step {f.onset_step}" if f.onset_step is not None else "") if x)
            out.append(
                f"<div class='finding {f.severity}'><b>{html.escape(f.kind)}</b> "
                f"({f.severity}; {html.escape(where)})<p>{_text(f.explanation)}</p>"
                f"<p><i>Remedy:</i> {_text(f.remedy)}</p>"
                f"<details><summary>evidence</summary><pre>"
                f"{html.escape(json.dumps(f.evidence, indent=1))}</pre></details></div>")
        skipped = [(k, v) for k, v in r.checks.items() if v.startswith("not measured")]
        if skipped:
            out.append("<p class='muted'>" + "; ".join(
                html.escape(f"{k}: {v}") for k, v in skipped) + "</p>")
    return "\n".join(out)


def render_html(report: Report, runs: list[RunData], control: RunData | None = None) -> str:
    parts, n = [], 0

    def add(title: str, fig) -> None:
        nonlocal n
        if fig is not None:
            parts.append(f"<h3>{html.escape(title)}</h3>" if title else "")
            parts.append(_fig_block(fig, f"fig{n}"))
            n += 1

    parts.append("<h2>Comparison</h2>")
    add("Capacity rate (paper Fig. 5a)", capacity_figure(runs))
    add("Losses (paper Fig. 5b)", loss_figure(runs))
    add("Shared-expert probe (paper Fig. 6)", probe_figure(runs, control))
    for r in runs:
        parts.append(f"<h2>{html.escape(r.name)}</h2>")
        add("", load_figure(r))
        add("", cosine_figure(r))
        add("", ratio_figure(r))
        add("", snapshot_figure(r))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ctrl = f"<p>Control run: {html.escape(report.control)}</p>" if report.control else ""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<title>moe-probe diagnose</title>"
        f"<style>{_CSS}</style>\n"
        f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script>\n"
        "</head><body>\n"
        f"<h1>moe-probe diagnose</h1><p class='muted'>moe_probe {__version__}, {stamp}</p>"
        f"{ctrl}{_summary(report)}<h2>Findings</h2>{_findings(report)}\n"
        + "\n".join(parts)
        + f"\n<script>{_DRAW}</script>\n</body></html>\n")
