"""Our MoE layer vs Hugging Face's MixtralSparseMoeBlock: forward + backward, side by side.

Same shapes, same weights (copied), dropless top-k for both, CPU, interleaved repeats; prints the
median time of each and the ratio HF / ours (> 1 = ours faster). HF's standalone block uses its
"eager" expert loop (``config._experts_implementation`` is None outside a PreTrainedModel); a full
HF model defaults to "grouped_mm", so that variant is timed too.

    OMP_NUM_THREADS=1 python benchmarks/bench_moe_layer.py [--tokens 4096 --dim 256 --ffn 512
        --experts 8 --top-k 2 --repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(args):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from moe_probe.model.moe import MoE

    torch.manual_seed(0)
    ours = MoE(d_model=args.dim, d_expert=args.ffn, top_k=args.top_k, n_shared=0,
               groups={"all": tuple(range(args.experts))},
               modality_group={"text": "all", "vit": "all", "vae": "all"})
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.05)
    hf = {}
    for impl in ("eager", "grouped_mm"):
        cfg = MixtralConfig(hidden_size=args.dim, intermediate_size=args.ffn, num_local_experts=args.experts,
                            num_experts_per_tok=args.top_k, router_jitter_noise=0.0)
        cfg._experts_implementation = impl
        blk = MixtralSparseMoeBlock(cfg)
        g = ours.groups["all"]
        with torch.no_grad():
            blk.gate.weight.copy_(g.router.weight)
            blk.experts.gate_up_proj.copy_(torch.cat([g.experts.w1_EFD, g.experts.w3_EFD], 1))
            blk.experts.down_proj.copy_(g.experts.w2_EDF)
        hf[impl] = blk
    return ours, hf


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    ours, hf = build(args)
    x = torch.randn(args.tokens, args.dim)
    w_out = torch.randn(args.tokens, args.dim)
    modality = torch.zeros(args.tokens, dtype=torch.long)

    def run_ours():
        xi = x.clone().requires_grad_(True)
        y, aux, z = ours(xi, modality)
        (y * w_out).sum().backward()
        return y

    def run_hf(blk):
        xi = x.clone().view(1, *x.shape).requires_grad_(True)
        y = blk(xi)
        (y[0] * w_out).sum().backward()
        return y[0]

    # Floor: only the expert GEMMs + SwiGLU (fwd+bwd) on inputs already sorted by expert, with
    # the same per-expert row counts — what any implementation must at least spend.
    with torch.no_grad():
        g = ours.groups["all"]
        ids = g.router(x).topk(args.top_k, dim=-1).indices
        counts = torch.bincount(ids.flatten(), minlength=args.experts).tolist()
    x_sorted = torch.randn(sum(counts), args.dim)

    def run_floor():
        from moe_probe.model.moe import swiglu

        xs = torch.split(x_sorted.clone().requires_grad_(True), counts)
        w1, w2, w3 = g.experts.w1_EFD.unbind(0), g.experts.w2_EDF.unbind(0), g.experts.w3_EFD.unbind(0)
        torch.cat([swiglu(xe, w1[e], w2[e], w3[e]) for e, xe in enumerate(xs)]).sum().backward()

    fns = {"gemm_floor": run_floor, "ours": run_ours, "hf_eager": lambda: run_hf(hf["eager"]),
           "hf_grouped_mm": lambda: run_hf(hf["grouped_mm"])}
    with torch.no_grad():
        y_ours = ours(x, modality)[0]
        for name in ("eager", "grouped_mm"):
            diff = (hf[name](x.view(1, *x.shape))[0] - y_ours).abs().max().item()
            assert diff < 1e-4, f"HF {name} output differs from ours by {diff}"
    times = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(2):  # warm-up
        for f in fns.values():
            f()
    for _ in range(args.repeats):
        for name, f in fns.items():  # interleaved so load changes hit all equally
            for m in [ours, *hf.values()]:
                m.zero_grad(set_to_none=True)
            c0, t0 = time.process_time(), time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"T={args.tokens} D={args.dim} F={args.ffn} E={args.experts} k={args.top_k} dropless, "
          f"fwd+bwd, threads={torch.get_num_threads()}, median of {args.repeats}")
    for k, v in med.items():
        print(f"  {k:>14}: wall {v * 1e3:8.1f} ms (min {min(times[k]) * 1e3:.1f})   "
              f"cpu {cmed[k] * 1e3:8.1f} ms (min {min(cpu[k]) * 1e3:.1f})")
    # Process CPU time is the steadier figure on a shared machine (single-threaded runs).
    for ref in ("hf_eager", "hf_grouped_mm"):
        print(f"ratio {ref} / ours: wall {med[ref] / med['ours']:.2f}x, cpu {cmed[ref] / cmed['ours']:.2f}x")


if __name__ == "__main__":
    main()
