"""`moe-probe scan`: trace an HF MoE model on text files into a standard run store.

Steps are batches. Step s holds windows ``[s·B, (s+1)·B)`` of ``--text`` (modality ``text``) and,
with ``--text-b``, the same slice of that file (modality ``text_b``) in the SAME forward, the
way a multimodal batch shares each layer's expert capacity. The run has ``min`` of the two files'
batch counts (capped by ``--max-batches``).

A ``--text`` ending in ``.jsonl`` holds typed segments, ``{"type": "code", "text": "..."}`` per
line (any number of kinds): each token's modality is its segment's type, as given by a token-type
mask, in one stream of windows. The advisor's "understanding" counts are those of the first
kind (or of ``--text``).

What the store gets (ARCHITECTURE.md schema; modality coordinate = ``text`` [, ``text_b``], or
the typed segments' kinds):
- ``routing`` every step, counted by the model tracer's ``RoutingCounter`` (HF routers are
  dropless, so ``kept``/``capacity_rate`` are nominal at ``--capacity-factor``);
- ``loss`` every step: ``lm`` = LM loss of the ``--text`` windows, ``total`` = of the whole batch,
  ``aux`` = Switch balance loss α·E·Σ f_e·P_e with α = 1, ``z`` = router z-loss, both averaged
  over MoE layers and unweighted; ``mmu``/``gen`` NaN;
- ``grad`` (only with ``--text-b``) at most ``GRAD_ROWS`` evenly spaced steps: ``grad.py``;
- ``probe`` at the last step, for models with shared experts: ``probes.py``;
- extra group ``grad_expert`` (declared in the schema; only with ``--text-b``): per-expert
  cosine / norm_und / norm_gen (step, layer, expert) of the routed experts' fused parameters,
  at the ``grad`` rows' steps;
- extra group ``token_routing`` at the last step: per token of the probe windows (the first
  ``PROBE_WINDOWS`` of each set) its id, kind and top-k ids and gates per layer; its label is
  its set or segment type (label set ``source``: OLMoE's domains are data sources too).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from moe_probe.hf.capture import RouterCapture, layer_routing, lm_loss
from moe_probe.hf.discover import find_moe_layers
from moe_probe.hf.loading import decoder, load_model, read_typed_windows, read_windows
from moe_probe.hf.routers import model_attrs as hf_model_attrs
from moe_probe.run import Run
from moe_probe.trace.tokens import ATTR as TOKEN_ATTR, padded_picks, text_probe_tokens

GRAD_ROWS = 8
"""Gradient-conflict rows per scan (two backward passes each)."""
PROBE_WINDOWS = 16
"""Windows per text set used by the isolated eval and the probes."""


def _validate(args) -> None:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {args.seq_len}")
    if not args.capacity_factor > 0:
        raise ValueError(f"--capacity-factor must be > 0, got {args.capacity_factor}")
    if args.max_batches is not None and args.max_batches < 1:
        raise ValueError(f"--max-batches must be >= 1, got {args.max_batches}")
    if not 0.0 < args.und_fraction < 1.0:
        raise ValueError(f"--und-fraction must be in (0, 1), got {args.und_fraction}")
    run = Run(args.out)
    run.check_writable()
    if run.exists():
        raise ValueError(f"{args.out} already holds a run; choose another --out")


def _balance_losses(records) -> tuple[float, float]:
    aux, z = [], []
    for r in records:
        logits = r.logits_TE.float()
        E = logits.shape[-1]
        f = torch.bincount(r.topk_ids_TK.reshape(-1), minlength=E).double() / r.topk_ids_TK.numel()
        p = torch.softmax(logits, -1).double().mean(0)
        aux.append(float(E * (f * p).sum()))
        z.append(float(torch.logsumexp(logits, -1).square().mean()))
    return float(np.mean(aux)), float(np.mean(z))


def run_scan(args, *, use_table: bool | None = None, seed: int = 0) -> dict:
    """The scan; returns a small summary (also for tests). ValueError for bad input.
    ``use_table`` None = the family table unless ``--structural`` or ``MOE_PROBE_HF_STRUCTURAL=1``."""
    import os

    from tqdm.auto import tqdm

    from moe_probe.hf.grad import GradConflict
    from moe_probe.hf.probes import isolated_metric_names, isolated_row, probe_rows, probe_task_names
    from moe_probe.store.schema import default_coords
    from moe_probe.store.writer import StoreWriter
    from moe_probe.trace.routing import RoutingCounter

    _validate(args)
    if use_table is None:
        use_table = not (getattr(args, "structural", False)
                         or os.environ.get("MOE_PROBE_HF_STRUCTURAL", "") in ("1", "true", "yes"))
    model, tokenizer, source = load_model(args.model, seed=seed)
    how, layers = find_moe_layers(model, use_table=use_table)
    V = int(model.config.vocab_size)
    kind_a = None  # a typed --text (.jsonl): each token's kind, the user's token-type mask
    if str(args.text).endswith(".jsonl"):
        if args.text_b:
            raise ValueError("--text-b goes with a plain --text file; a .jsonl --text labels its "
                             "tokens itself")
        win_a, kind_a, modalities = read_typed_windows(args.text, tokenizer, V, args.seq_len)
    else:
        win_a = read_windows(args.text, tokenizer, V, args.seq_len)
        modalities = ["text"]
    sets = [win_a]
    if args.text_b:
        win_b = read_windows(args.text_b, tokenizer, V, args.seq_len)
        S = min(win_a.shape[1], win_b.shape[1])  # a file shorter than --seq-len shortens both
        sets = [win_a[:, :S], win_b[:, :S]]
        modalities = ["text", "text_b"]
    B = args.batch_size
    n_steps = min(math.ceil(w.shape[0] / B) for w in sets)
    if args.max_batches is not None:
        n_steps = min(n_steps, args.max_batches)
    two = len(sets) == 2  # two data sets: gradient conflict between them, probes tell them apart
    has_shared = any(x.n_shared > 0 for x in layers)
    names = [x.name for x in layers]
    E = max(x.n_experts for x in layers)
    if args.advise_groups and not 0 < round(args.und_fraction * E) < E:
        raise ValueError(f"--und-fraction {args.und_fraction} leaves an empty group of {E} experts")

    coords = default_coords(layers=names, n_experts=E, eval_metrics=[],
                            isolated_metrics=isolated_metric_names(two) if has_shared else None,
                            tasks=probe_task_names(two),
                            groups=("routing", "loss", "grad", "probe", "grad_expert"))
    coords["routing"]["modality"] = modalities
    probe_sets = [w[:PROBE_WINDOWS] for w in sets]
    probe_kind = _kinds(probe_sets, None if kind_a is None else kind_a[:PROBE_WINDOWS])
    tokens = text_probe_tokens(torch.cat(probe_sets), probe_kind, probe_kind,
                               {"source": modalities},
                               decoder(tokenizer, V, [p for p in (args.text, args.text_b) if p]))
    top_k = max(x.top_k for x in layers)
    coords["token_routing"] = tokens.coords(names, top_k)
    if not two:
        coords.pop("grad")
        coords.pop("grad_expert")
    attrs = {**_attrs(args, model, layers, how, source, modalities, seed),
             TOKEN_ATTR: tokens.attrs()}
    counter = RoutingCounter(names, [layer_routing(x) for x in layers], args.capacity_factor,
                             modalities=modalities)
    grad = GradConflict(model, layers) if two else None
    every = max(1, math.ceil(n_steps / GRAD_ROWS))
    load_text = np.zeros((len(layers), E), dtype=np.int64)

    run = Run(args.out)
    run.create(store_attrs=attrs, store_coords=coords)
    cap = RouterCapture(model, layers)
    with StoreWriter.resume(run.store_path)[0] as writer:
        for step in tqdm(range(n_steps), desc="scan", unit="batch", disable=args.quiet):
            parts = [w[step * B:(step + 1) * B] for w in sets]
            ids = torch.cat(parts)
            mod_T = _kinds(parts, None if kind_a is None else kind_a[step * B:(step + 1) * B])
            got = cap.capture(ids, mod_T, want_logits=True)
            for li, rec in enumerate(got.records):
                counter.add(li, rec)
            row = counter.finish()
            load_text += row["load"][:, 0, :]
            writer.append("routing", step, **row)
            aux, z = _balance_losses(got.records)
            n_a = parts[0].shape[0]
            loss = {"lm": float(lm_loss(got.logits_BSV[:n_a], parts[0])), "mmu": np.nan, "gen": np.nan,
                    "aux": aux, "z": z, "total": float(lm_loss(got.logits_BSV, ids))}
            writer.append("loss", step, value=np.array([loss[t] for t in coords["loss"]["term"]]))
            if grad is not None and step % every == 0:
                g_row, e_row = grad.measure(parts[0], parts[1])
                writer.append("grad", step, **g_row)
                writer.append("grad_expert", step, **e_row)
        writer.append("token_routing", n_steps - 1,
                      **tokens.row(*_probe_picks(cap, torch.cat(probe_sets), probe_kind, B, top_k)))
        if has_shared:
            iso = isolated_row(cap, probe_sets, B)
            writer.append("probe", n_steps - 1, isolated=iso, **probe_rows(cap, probe_sets, B))
    summary = {"steps": n_steps, "layers": names, "experts": E, "discovery": how,
               "modalities": modalities, "load_text": load_text}
    if args.advise_groups:
        from moe_probe.hf.advise import write_advice

        summary["advice"] = write_advice(args.advise_groups, load_text, names, args.und_fraction,
                                         attrs["model"], n_steps)
    return summary


def _kinds(parts: list[torch.Tensor], kind_BS: torch.Tensor | None) -> torch.Tensor:
    """Kind of each token of ``cat(parts)`` flattened: the typed segments' own, else the set's."""
    if kind_BS is not None:
        return kind_BS.reshape(-1)
    return torch.cat([torch.full((p.numel(),), m, dtype=torch.long) for m, p in enumerate(parts)])


def _probe_picks(cap, ids_NS: torch.Tensor, kind_T: torch.Tensor, batch: int, top_k: int):
    """Per layer the (N·S, K) picks and gates of the probe windows, ``batch`` windows a forward."""
    ids, gates = [], []
    S = ids_NS.shape[1]
    for i in range(0, ids_NS.shape[0], batch):
        got = cap.capture(ids_NS[i:i + batch], kind_T[i * S:(i + batch) * S])
        i_l, g_l = padded_picks(got.records, top_k)
        ids.append(i_l)
        gates.append(g_l)
    return [torch.cat(c) for c in zip(*ids)], [torch.cat(c) for c in zip(*gates)]


def _attrs(args, model, layers, how, source, modalities, seed) -> dict:
    model_attrs = {**hf_model_attrs(model, layers, how), "source": source,
                   "nominal_capacity": args.capacity_factor}
    run_cfg = {k: getattr(args, k, None) for k in ("model", "text", "text_b", "capacity_factor",
                                                   "batch_size", "seq_len", "max_batches")}
    return {"run": {"name": Path(args.out).name, "recipe": "hf-scan", "seed": seed,
                    "config": json.dumps(run_cfg)},
            "model": model_attrs, "modalities": list(modalities)}
