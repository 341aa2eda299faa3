"""CLI entry of the HF adapter: ``moe-probe scan`` (dispatched by ``moe_probe/cli.py``)."""

from __future__ import annotations

import os
import sys


def scan(args) -> int:
    # The scan never downloads: everything comes from the given directory or config JSON.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from moe_probe.hf.scan import run_scan

    s = run_scan(args)
    if not args.quiet:
        print(f"scan: {s['steps']} batches, MoE layers {', '.join(s['layers'])} "
              f"({s['experts']} experts, {s['discovery']}), modalities {', '.join(s['modalities'])} "
              f"-> {args.out}", file=sys.stderr)
        if "advice" in s:
            print(f"scan: expert partition proposal -> {args.advise_groups}", file=sys.stderr)
    return 0
