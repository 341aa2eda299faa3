"""The Markdown summary `moe-probe diagnose` prints on stdout."""

from __future__ import annotations

from moe_probe.diagnose.findings import Report

_ICON = {"info": "ℹ", "warning": "⚠", "critical": "✖"}


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def render_markdown(report: Report) -> str:
    lines = ["# moe-probe diagnose", ""]
    if report.control:
        lines += [f"Control run: `{report.control}`", ""]
    mods = sorted({m for r in report.runs for m in r.final_capacity_rate},
                  key=lambda m: ("text", "vit", "vae").index(m) if m in ("text", "vit", "vae")
                  else 9)
    lines += ["| run | recipe | arch | last step | "
              + " | ".join(f"capacity rate {m}" for m in mods) + " | findings |",
              "|---|---|---|---|" + "---|" * len(mods) + "---|"]
    for r in report.runs:
        caps = " | ".join(_fmt(r.final_capacity_rate.get(m)) for m in mods)
        lines.append(f"| {r.name} | {r.recipe or '–'} | {r.arch or '–'} | {r.last_step} | "
                     f"{caps} | {len(r.findings)} |")
    for r in report.runs:
        lines += ["", f"## {r.name}  (`{r.run_dir}`)", ""]
        rows = ", ".join(f"{g} {n}" for g, n in r.steps.items())
        lines += [f"Committed rows: {rows or 'none'}.", ""]
        if not r.findings:
            lines.append("No findings.")
        for f in r.findings:
            where = []
            if f.evidence.get("component"):
                where.append(f.evidence["component"])
            if f.modality:
                where.append(f.modality)
            if f.layers:
                where.append("layers " + ",".join(f.layers))
            if f.onset_step is not None:
                where.append(f"from step {f.onset_step}")
            lines += [f"- {_ICON[f.severity]} **{f.kind}** ({f.severity}; {'; '.join(where)})",
                      f"  {f.explanation}", f"  *Remedy:* {f.remedy}"]
        skipped = [f"{k} ({v[len('not measured: '):]})" for k, v in r.checks.items()
                   if v.startswith("not measured")]
        if skipped:
            lines += ["", "Not measured: " + "; ".join(skipped) + "."]
    return "\n".join(lines) + "\n"
