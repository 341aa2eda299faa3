"""`moe-probe diagnose RUN_DIR… [--html FILE] [--json FILE] [--control RUN] [--fail-on KIND]
[--full-resolution]` (every row read instead of the rollup levels' screening: same findings).

Exit 0, or 1 when ``--fail-on`` matches a finding. Bad input (missing directory, not a store,
another schema version) raises ValueError, which the CLI prints as one line with exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from moe_probe.diagnose.config import DiagnoseConfig
from moe_probe.diagnose.markdown import render_markdown
from moe_probe.diagnose.rundata import load_run
from moe_probe.diagnose.runner import diagnose as run_detectors
from moe_probe.overrides import apply_overrides
from moe_probe.store.location import local_path
from moe_probe.store.reader import tune_reads


def diagnose(args) -> int:
    tune_reads()
    cfg = apply_overrides(DiagnoseConfig(), getattr(args, "overrides", None) or [])
    for out, flag in ((args.json_out, "--json"), (args.html, "--html")):
        # fail before the (slow) reading, not after it
        if out and not local_path(out, flag).resolve().parent.is_dir():
            raise ValueError(f"cannot write {out}: no such directory {Path(out).parent}")
    levels = not getattr(args, "full_resolution", False)
    runs = [load_run(d, levels=levels) for d in args.run_dirs]
    control = load_run(args.control, levels=levels) if getattr(args, "control", None) else None
    report = run_detectors(runs, cfg, control)
    sys.stdout.write(render_markdown(report))
    if args.json_out:
        _write(args.json_out, report.to_json())
    if args.html:
        from moe_probe.diagnose.html_report import render_html

        _write(args.html, render_html(report, runs, control))
    matched = report.matching(args.fail_on)
    if matched:
        print(f"--fail-on {args.fail_on}: {len(matched)} finding(s)", file=sys.stderr)
        return 1
    return 0


def _write(path: str, text: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot write {path}: {e.strerror or e}") from None
