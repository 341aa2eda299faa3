"""Cost of token-level routing (`token_routing`): snapshot time side by side, and store bytes.

Time: the eval-time snapshot (``TraceSession.on_eval`` with the snapshot on, probes off) on the
demo recipe's model and probe batch, three sessions on ONE model writing real stores:

- ``snapshot``: today's snapshot (saturation, co-activation), no token rows;
- ``tokens``:   the same plus the token row with gates (``trace.token_gates=true``);
- ``ids``:      the same plus the token row, ids only (the demo recipe's setting).

Repeats interleave, the order rotating, so load drifts hit all alike; medians of per-call
process CPU and wall time, and the ratios against ``snapshot``. Target: ≤ 1.10.

Size (``--sizes RUN_DIR…``): bytes of each run's store, of its ``token_routing`` group, and what
the group adds to the rest. Target on the demo store: ≤ 20 %.

    OMP_NUM_THREADS=1 python benchmarks/bench_tokens.py [--recipe symbiotic] [--reps 30]
        [--sizes runs/demo-symbiotic]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench_tracing import interleaved, report
from moe_probe.data import MultimodalData
from moe_probe.model import MultimodalMoE
from moe_probe.run import store_path
from moe_probe.store.writer import StoreWriter
from moe_probe.trace.config import TraceConfig
from moe_probe.trace.layout import store_layout
from moe_probe.trace.session import TraceSession
from moe_probe.trace.tokens import data_probe_tokens
from moe_probe.train.recipes import recipe

VARIANTS = {"snapshot": (False, True), "tokens": (True, True), "ids": (True, False)}
"""name -> (token rows, gates)."""


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def sizes(run_dirs) -> None:
    for run in run_dirs:
        store = store_path(run)
        total, group = _bytes(store), _bytes(store / "token_routing")
        print(f"{run}: store {total} B, token_routing {group} B: adds "
              f"{100 * group / max(total - group, 1):.1f}% to the {total - group} B without it "
              f"(target <= 20%)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="symbiotic", help="demo recipe whose model/probe set to use")
    ap.add_argument("--reps", type=int, default=30, help="interleaved repeats per variant")
    ap.add_argument("--sizes", nargs="*", default=[], help="run directories to size")
    args = ap.parse_args()
    sizes(args.sizes)

    cfg = recipe(args.recipe)
    data = MultimodalData(cfg.data, 0)
    torch.manual_seed(0)
    model = MultimodalMoE(replace(cfg.model, groups=None) if cfg.model.arch == "symbiotic"
                          else cfg.model, data.tokenizer.vocab_size)
    tokens = data_probe_tokens(data)
    print(f"model: {cfg.model.arch}, {cfg.model.n_layers} layers x {cfg.model.n_experts} experts, "
          f"top-{cfg.model.top_k}; probe set {tokens.n} tokens; torch threads "
          f"{torch.get_num_threads()}")
    tmp = tempfile.TemporaryDirectory()
    attrs, coords = store_layout(model, eval_metrics=["x"], probe_tokens=tokens)
    sessions, step = {}, {}
    for name, (on, gates) in VARIANTS.items():
        writer = StoreWriter.create(f"{tmp.name}/{name}", attrs={"run": {"name": name}, **attrs},
                                    coords=coords)
        sessions[name] = TraceSession(model, TraceConfig(probe_every=0, token_gates=gates), writer,
                                      data.probe_batch, probe_tokens=tokens if on else None)
        step[name] = 0

    def run(name: str) -> tuple[float, float]:
        c0, t0 = time.process_time(), time.perf_counter()
        sessions[name].on_eval(step[name], {"x": 0.0}, model)
        step[name] += 1
        return time.process_time() - c0, time.perf_counter() - t0

    names = list(VARIANTS)
    cpu, wall = interleaved(run, names, args.reps)
    for s in sessions.values():
        s.close()
    tmp.cleanup()
    report(cpu, wall, names, "snapshot", {n: 1.10 for n in names[1:]}, "ms per snapshot")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
