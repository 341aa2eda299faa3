"""Cost of tracing a training step, measured side by side in one process.

Three variants of the same optimizer step (forward, backward, AdamW step) on the same model
and batches, each through a real :class:`TraceSession` writing a real store:

- ``plain``:   tracing disabled (the session still writes the loss row, as every run does);
- ``routing``: routing tracer on every step (hooks + on-device counts + one host copy + row);
- ``grad``:    gradient-conflict tracer on this step (two backward passes + per-cell reductions).

All three drive ONE model and optimizer (separate model copies differed by several percent
from memory layout alone); repeats are interleaved, the order rotating each repeat, so drifts in
machine load hit all three alike; medians of per-step times are reported with the ratios against ``plain``, for two clocks:
process CPU time (all threads of this process, the store's writer thread included — robust when
other processes share the cores) and wall time.
Targets: routing ≤ 1.02, grad ≤ 1.7.

    OMP_NUM_THREADS=1 python benchmarks/bench_tracing.py [--recipe symbiotic] [--reps 15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace

import torch

from moe_probe.model.params import n_params as count_params
from moe_probe.data import MultimodalData
from moe_probe.store.writer import StoreWriter
from moe_probe.trace.config import TraceConfig
from moe_probe.trace.layout import store_layout
from moe_probe.trace.session import TraceSession
from moe_probe.train.recipes import recipe

VARIANTS = {
    "plain": TraceConfig(enabled=False),
    "routing": TraceConfig(routing_every=1, grad_every=0, snapshot=False, probe_every=0),
    "grad": TraceConfig(routing_every=0, grad_every=1, snapshot=False, probe_every=0),
}


def traced_step(model, session, opt, step: int, micro_batches) -> None:
    """One optimizer step of moe_probe's model through a :class:`TraceSession`."""
    session.begin_step(step)
    for b in micro_batches:
        out = model(b)
        session.backward({k: v / len(micro_batches) for k, v in out.task_losses.items()}, step)
    session.end_step(step, {k: float(v.detach()) for k, v in out.losses.items()})
    opt.step()
    opt.zero_grad(set_to_none=True)


def interleaved(run_steps, names: list[str], reps: int) -> tuple[dict, dict]:
    """({name: [cpu s/step per repeat]}, {name: [wall s/step ...]}) of ``run_steps(name)`` after
    one warm-up each, the order rotating each repeat so drifts in machine load hit all alike."""
    for name in names:  # warm-up: allocator, first-call overheads, lazy imports
        run_steps(name)
    cpu = {name: [] for name in names}
    wall = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            c, w = run_steps(name)
            cpu[name].append(c)
            wall[name].append(w)
    return cpu, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="symbiotic", help="demo recipe whose model/batch size to use")
    ap.add_argument("--reps", type=int, default=40, help="interleaved repeats per variant")
    ap.add_argument("--steps", type=int, default=1, help="timed optimizer steps per repeat")
    ap.add_argument("--micro-batches", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    cfg = recipe(args.recipe)
    data = MultimodalData(cfg.data, 0)
    from moe_probe.model import MultimodalMoE

    torch.manual_seed(0)
    base = MultimodalMoE(cfg.model if cfg.model.arch != "symbiotic" else
                         replace(cfg.model, groups=None), data.tokenizer.vocab_size).to(args.device)
    base.set_shield(0.1)
    micro = cfg.train.batch_size // args.micro_batches
    g = torch.Generator().manual_seed(0)
    batches = [data.batch("train", micro, g).to(args.device) for _ in range(args.steps * args.micro_batches)]
    n_params = count_params(base)
    print(f"model: {cfg.model.arch}, d_model {cfg.model.d_model}, {cfg.model.n_layers} layers, "
          f"{cfg.model.n_experts} experts, {n_params / 1e6:.2f} M params; batch {cfg.train.batch_size} "
          f"x seq {cfg.data.seq_len} in {args.micro_batches} micro-batch(es); "
          f"torch threads {torch.get_num_threads()}, device {args.device}")

    tmp = tempfile.TemporaryDirectory()
    model = base
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    attrs, coords = store_layout(model, eval_metrics=["x"])
    sessions = {}
    for name, tcfg in VARIANTS.items():
        writer = StoreWriter.create(f"{tmp.name}/{name}", attrs={"run": {"name": name}, **attrs},
                                    coords=coords)
        sessions[name] = TraceSession(model, tcfg, writer)
    step_no = {name: 0 for name in sessions}

    def run_steps(name: str) -> tuple[float, float]:
        session = sessions[name]
        c0, t0 = time.process_time(), time.perf_counter()
        for s in range(args.steps):
            traced_step(model, session, opt, step_no[name],
                        batches[s * args.micro_batches:(s + 1) * args.micro_batches])
            step_no[name] += 1
        if args.device != "cpu":
            torch.cuda.synchronize()
        return (time.process_time() - c0) / args.steps, (time.perf_counter() - t0) / args.steps

    names = list(sessions)
    cpu, wall = interleaved(run_steps, names, args.reps)
    for session in sessions.values():
        session.close()
    tmp.cleanup()

    report(cpu, wall, names, "plain", {"routing": 1.02, "grad": 1.7}, "ms/step",
           f" x {args.steps} steps")


def report(cpu: dict, wall: dict, names: list[str], base: str, targets: dict[str, float],
           unit: str, per: str = "") -> None:
    """Medians (p25, p75) of each variant per clock, and the ratios against ``base``: of the
    medians, and the median of paired ratios (variants run back to back)."""
    for clock, times in (("cpu", cpu), ("wall", wall)):
        med = {n: statistics.median(t) for n, t in times.items()}
        for name in names:
            q = sorted(times[name])
            print(f"{clock:>4} {name:>8}: median {med[name] * 1e3:7.1f} {unit}  (p25 "
                  f"{q[len(q) // 4] * 1e3:.1f}, p75 {q[3 * len(q) // 4] * 1e3:.1f}; "
                  f"{len(q)}{per})")
        for name, target in targets.items():
            paired = statistics.median(a / b for a, b in zip(times[name], times[base]))
            print(f"{clock:>4} ratio {name}/{base}: {med[name] / med[base]:.3f} (median of paired "
                  f"ratios {paired:.3f}; target <= {target})")


if __name__ == "__main__":
    main()
