"""Cost of routing capture on an HF MoE model: hooked forward + counting vs plain forward.

Same model object, same batch, measured side by side: each repeat runs one captured forward
(RouterCapture.capture — router hooks for that forward only — + RoutingCounter.add for every MoE
layer + finish) and one plain ``model(input_ids=...)``, in alternating order so drift in machine
load hits both. Prints the medians and their ratio (target <= 1.15).

    OMP_NUM_THREADS=1 python benchmarks/bench_hf_capture.py [--family mixtral] [--hidden 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from moe_probe.hf.capture import RouterCapture  # noqa: E402
from moe_probe.hf.discover import find_moe_layers  # noqa: E402
from moe_probe.hf.capture import layer_routing  # noqa: E402
from moe_probe.trace.routing import RoutingCounter  # noqa: E402

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "hf"


def build(family: str, hidden: int, layers: int, experts: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    d = json.loads((FIX / f"{family}.json").read_text())
    mt = d.pop("model_type")
    d.update(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=2 * hidden)
    for k in ("num_local_experts", "num_experts", "n_routed_experts"):
        if k in d:
            d[k] = experts
    for k in ("moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size"):
        if k in d:
            d[k] = hidden
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(mt, **d)).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="mixtral")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = build(a.family, a.hidden, a.layers, a.experts)
    _, layers = find_moe_layers(model)
    counter = RoutingCounter([x.name for x in layers], [layer_routing(x) for x in layers])
    ids = torch.randint(3, model.config.vocab_size, (a.batch, a.seq),
                        generator=torch.Generator().manual_seed(0))
    mod_T = torch.zeros(ids.numel(), dtype=torch.long)
    cap = RouterCapture(model, layers)

    def traced() -> None:
        got = cap.capture(ids, mod_T)
        for li, rec in enumerate(got.records):
            counter.add(li, rec)
        counter.finish()

    def plain() -> None:
        with torch.no_grad():
            model(input_ids=ids)

    for f in (traced, plain, traced, plain):  # warm-up (allocator, code caches)
        f()
    t_traced, t_plain = [], []
    for r in range(a.repeats):
        pair = ((traced, t_traced), (plain, t_plain))
        for f, acc in (pair if r % 2 == 0 else pair[::-1]):
            t0 = time.perf_counter()
            f()
            acc.append(time.perf_counter() - t0)
    mt, mp = statistics.median(t_traced), statistics.median(t_plain)
    print(f"model {a.family} hidden={a.hidden} layers={a.layers} experts={a.experts} "
          f"batch={a.batch}x{a.seq} threads={torch.get_num_threads()} repeats={a.repeats}")
    print(f"traced+count median {mt * 1e3:.1f} ms | plain median {mp * 1e3:.1f} ms | "
          f"ratio {mt / mp:.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
