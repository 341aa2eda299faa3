"""Gradient conflict between the understanding and generation losses, per layer × component.

A traced step runs two backward passes per micro-batch: ``torch.autograd.grad`` of the und
loss (graph retained), then the untraced step's own ``(und + gen).backward()`` into an emptied
``.grad``; gen = that fresh gradient − und, and the earlier micro-batches' ``.grad`` is added
back. Why not ``backward(und)`` then ``backward(gen)``: the sum of two separately computed
gradients differs from an untraced step's in the last bits, and Adam turns last-bit noise on
near-zero gradients (|g| ≪ eps) into visible update differences (~lr·0.3). This way ``.grad``
— hence the update — is bit-identical to an untraced step's, shielding included, and the
per-task gradients never pass through a subtraction of earlier micro-batches' ``.grad``.

The per-task gradients are combined piece by piece (:meth:`GradConflictTracer._fused`): each
micro-batch updates the step's totals (gen = fresh − und), and on the step's last micro-batch the
totals are formed and their [u·g, u·u, g·g] sums taken while the piece is still in cache, so each
gradient is read from memory once; otherwise ``finish`` sums the stored totals in one pass. The
sums go into cells in one host transfer.
"""

from __future__ import annotations

import numpy as np
import torch

from moe_probe.modalities import GRAD_COMPONENTS

ALL = "all"
IO = "io"
_PIECE = {"cpu": 1 << 17}
"""Elements per piece of the fused pass, per device type: on CPU the pieces a piece's work touches
(the two gradients, the totals, a difference: ~2.5 MiB of float32) stay in cache from the
difference to the three dot products. Separate passes (difference, two norms, a dot) read the
model's gradients five times: their arithmetic took ~30 ms of a traced step of the 14M-parameter
benchmark model (benchmarks/bench_hf_trainer.py, one CPU thread), the fused pass of a last
micro-batch ~14 ms. Elsewhere (an accelerator: kernel launches, not cache, bound) 16M elements,
which also bounds the scratch pieces."""
_PIECE_OTHER = 1 << 24


def grad_layers(model) -> list[str]:
    """Layer labels of the ``grad`` group: the model's layers in order, then ``all``."""
    return [name for name, _ in model.moe_layers()] + [ALL]


def plain_backward(task_losses: dict[str, torch.Tensor]) -> None:
    """An untraced step's backward: the sum of the task losses that carry a graph."""
    parts = [v for v in task_losses.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    if parts:
        sum(parts[1:], parts[0]).backward()


class GradConflictTracer:
    """Accumulates per-task gradients over a step's micro-batches and reduces them per cell."""

    def __init__(self, model, *, distributed: bool = False,
                 components: dict[str, tuple[str, str]] | None = None, layers: list[str] | None = None):
        """``components`` (parameter name -> (layer label or ``io``, component)) and ``layers``
        (the ``grad`` layer labels, ``all`` last) default to the moe_probe model's
        ``param_components()`` and :func:`grad_layers`; the Hugging Face adapter passes its own."""
        self.distributed = distributed
        """Under DDP: per-task gradients of the global batch (see ``_backward_ddp``)."""
        comps = model.param_components() if components is None else components
        self.layers = grad_layers(model) if layers is None else list(layers)
        self.components = list(GRAD_COMPONENTS)
        layer_ix = {n: i for i, n in enumerate(self.layers)}
        comp_ix = {c: i for i, c in enumerate(self.components)}
        all_row = layer_ix[ALL]
        C = len(self.components)
        self.params: list[torch.nn.Parameter] = []
        own_cell, all_cell = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if name not in comps:
                raise ValueError(f"parameter {name!r} is missing from model.param_components()")
            layer, comp = comps[name]
            if comp not in comp_ix:
                raise ValueError(f"parameter {name!r}: unknown component {comp!r}")
            if layer != IO and layer not in layer_ix:
                raise ValueError(f"parameter {name!r}: unknown layer {layer!r}")
            self.params.append(p)
            # io parameters (embeddings, heads, final norm) count only toward layer `all`;
            # they are routed into a throw-away cell past the grid.
            own_cell.append(layer_ix[layer] * C + comp_ix[comp] if layer != IO else len(self.layers) * C)
            all_cell.append(all_row * C + comp_ix[comp])
        dev = self.params[0].device if self.params else torch.device("cpu")
        self._own = torch.tensor(own_cell, dtype=torch.int64, device=dev)
        self._all = torch.tensor(all_cell, dtype=torch.int64, device=dev)
        n_cells = len(self.layers) * C
        present = np.zeros(n_cells + 1, dtype=bool)
        present[own_cell] = True
        present[all_cell] = True
        self._present = present[:n_cells].reshape(len(self.layers), C)
        # pieces of each parameter's flattened gradient, and which parameter each piece sums into
        self._piece = _PIECE.get(dev.type, _PIECE_OTHER)
        self._pieces = [[(lo, min(lo + self._piece, p.numel()))
                         for lo in range(0, p.numel(), self._piece)] for p in self.params]
        self._scratches: dict[tuple, tuple[torch.Tensor, ...]] = {}
        owner = [i for i, ps in enumerate(self._pieces) for _ in ps]
        self._owner = torch.tensor(owner, dtype=torch.int64, device=dev)
        # [u·g, u·u, g·g] per piece: float32 pieces' dots written in place (no allocation), the
        # other dtypes' in float64 (bf16 promoted to float32 first, float64 kept)
        self._dots32 = torch.zeros(len(owner), 3, dtype=torch.float32, device=dev)
        self._dots64 = torch.zeros(len(owner), 3, dtype=torch.float64, device=dev)
        self._und: list[torch.Tensor] | None = None
        self._gen: list[torch.Tensor] | None = None
        self._gen_buf: list[torch.Tensor] | None = None
        self.start()

    def start(self) -> None:
        """Forget the previous step's per-task gradients."""
        self._und = self._gen = None
        self._sums: torch.Tensor | None = None  # (P, 3) of the running totals, when current
        self._final = False  # the step's last micro-batch is in (its totals may not be kept)
        self._total: list[torch.Tensor | None] | None = None

    def _or_zeros(self, grads) -> list[torch.Tensor]:
        """Each parameter's gradient, zeros where it has none (a task that does not reach it)."""
        return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.params)]

    def _accumulate(self, name: str, grads: list[torch.Tensor]) -> None:
        acc = getattr(self, name)
        if acc is None:
            setattr(self, name, grads)
        else:
            torch._foreach_add_(acc, grads)

    def _fused(self, fresh: list[torch.Tensor] | None = None, u: list[torch.Tensor] | None = None,
               *, last: bool = False) -> None:
        """One pass over the gradients, piece by piece, in one of three modes:

        - a micro-batch that is not the step's last (``fresh``, ``u``: its total and und
          gradients): the step's totals updated in place, und += u and gen += fresh − u (on the
          first, und = u and gen = fresh − u, into buffers kept across steps: a fresh
          model-size allocation each step cost ~5% of a traced step, page faults);
        - the last micro-batch (``last``): the totals formed in scratch pieces, not stored, and
          [u·g, u·u, g·g] summed while the piece is in cache — the sums are all the step needs
          of them;
        - no micro-batch (``finish``, when the last one was not flagged, under DDP, or with one
          task only): the stored totals summed (a task with no gradient sums to 0).

        The totals' values are those of separate whole-tensor passes (the same elementwise
        operations); the dot products are float32 per piece (float64 for float64 parameters),
        summed in float64."""
        update = fresh is not None
        first = update and self._und is None and self._gen is None
        if first and not last:
            if self._gen_buf is None:  # contiguous, whatever the parameter's layout
                self._gen_buf = [torch.empty(p.shape, dtype=p.dtype, device=p.device)
                                 for p in self.params]
            self._und, self._gen = [x.contiguous() for x in u], self._gen_buf
        elif not first:
            zeros = not update  # summing alone: a missing task is left out, not materialised
            self._und, self._gen = (
                [x.contiguous() for x in t] if t is not None else None if zeros else
                [torch.zeros(p.shape, dtype=p.dtype, device=p.device) for p in self.params]
                for t in (self._und, self._gen))
        summing = last or not update
        if summing:
            self._dots32.zero_()
            self._dots64.zero_()
        k = 0
        for i, pieces in enumerate(self._pieces):
            U = None if self._und is None else self._und[i].view(-1)
            G = None if self._gen is None else self._gen[i].view(-1)
            if update:
                f, x = fresh[i].reshape(-1), u[i].reshape(-1)
                tmp_a, tmp_g, tmp_d = self._scratch(x.dtype, x.device)
            for lo, hi in pieces:
                n = hi - lo
                if not update:
                    a = None if U is None else U[lo:hi]
                    g = None if G is None else G[lo:hi]
                elif first:
                    a = x[lo:hi]
                    g = torch.sub(f[lo:hi], a, out=tmp_g[:n] if last else G[lo:hi])
                else:
                    d = torch.sub(f[lo:hi], x[lo:hi], out=tmp_d[:n])
                    a = torch.add(U[lo:hi], x[lo:hi], out=tmp_a[:n] if last else U[lo:hi])
                    g = torch.add(G[lo:hi], d, out=tmp_g[:n] if last else G[lo:hi])
                if summing:
                    self._dot3(k, a, g)
                k += 1
        if summing:
            self._sums = torch.zeros(len(self.params), 3, dtype=torch.float64,
                                     device=self._owner.device).index_add_(
                0, self._owner, self._dots32.double() + self._dots64)
        if last:
            self._und = self._gen = None

    def _dot3(self, k: int, a: torch.Tensor | None, g: torch.Tensor | None) -> None:
        """[a·g, a·a, g·g] of piece ``k`` (a missing side: its dots are 0)."""
        if a is not None and g is not None and a.dtype == torch.float32:
            torch.dot(a, g, out=self._dots32[k, 0])
            torch.dot(a, a, out=self._dots32[k, 1])
            torch.dot(g, g, out=self._dots32[k, 2])
            return
        like = a if a is not None else g
        acc = torch.promote_types(like.dtype, torch.float32)
        a = None if a is None else a.to(acc)
        g = None if g is None else g.to(acc)
        if a is not None and g is not None:
            self._dots64[k, 0] = torch.dot(a, g)
        if a is not None:
            self._dots64[k, 1] = torch.dot(a, a)
        if g is not None:
            self._dots64[k, 2] = torch.dot(g, g)

    def _scratch(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Three pieces of scratch per dtype and device (kept: the pass runs every traced step)."""
        key = (dtype, device)
        if key not in self._scratches:
            self._scratches[key] = torch.empty(3, self._piece, dtype=dtype, device=device).unbind(0)
        return self._scratches[key]

    def backward(self, task_losses: dict[str, torch.Tensor], *, last: bool = False) -> None:
        """Two passes for one micro-batch; ``.grad`` ends up exactly as an untraced backward's.
        ``last``: no further micro-batch comes before ``finish`` (the per-task totals need not be
        kept, only their sums: a faster pass)."""
        if self._final:
            raise ValueError("backward after the step's last micro-batch (last=True): finish the "
                             "step first")
        if self.distributed:
            self._backward_ddp(task_losses)
        else:
            self._backward(task_losses, last)
        self._final = last

    def _backward(self, task_losses: dict[str, torch.Tensor], last: bool) -> None:
        und, gen = task_losses.get("und"), task_losses.get("gen")
        und_live = isinstance(und, torch.Tensor) and und.requires_grad
        gen_live = isinstance(gen, torch.Tensor) and gen.requires_grad
        if not (und_live or gen_live):
            return
        g_und = (torch.autograd.grad(und, self.params, retain_graph=True, allow_unused=True)
                 if und_live and gen_live else None)
        # The second pass is the untraced step's own backward, into an emptied .grad: its result
        # is bit-identical to an untraced step's, and the gen gradient is what it adds to und's
        # (exactly zero where gen does not reach, so the cosine there stays NaN).
        held = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        plain_backward(task_losses)
        got = [p.grad for p in self.params]
        fresh = self._or_zeros(got)
        if g_und is not None:
            self._fused(fresh, self._or_zeros(g_und), last=last)
        else:  # one live task: the whole gradient is its own (copied: .grad is modified later)
            self._accumulate("_und" if und_live else "_gen", [f.clone() for f in fresh])
        # Same single add as autograd's accumulation into an existing .grad.
        both = [i for i, (h, f) in enumerate(zip(held, got)) if h is not None and f is not None]
        if both:
            torch._foreach_add_([held[i] for i in both], [got[i] for i in both])
        for p, h, f in zip(self.params, held, got):
            p.grad = h if h is not None else f

    def _backward_ddp(self, task_losses: dict[str, torch.Tensor]) -> None:
        """Under DDP the second pass is DDP's own backward (reduced on the rank's last micro-batch,
        into the accumulated ``.grad``), so ``.grad`` is left alone here: only the und gradient is
        kept, local — ``autograd.grad`` bypasses DDP's hooks — and averaged in ``finish``, where
        gen = DDP's averaged total − averaged und. The total is copied after each backward (the
        last copy is DDP's average), so a loop may clip or zero ``.grad`` before ``finish``."""
        und = task_losses.get("und")
        if isinstance(und, torch.Tensor) and und.requires_grad:
            g = torch.autograd.grad(und, self.params, retain_graph=True, allow_unused=True)
            self._accumulate("_und", self._or_zeros(g))
        plain_backward(task_losses)
        self._total = [None if p.grad is None else p.grad.detach().clone() for p in self.params]

    def _reduce_ddp(self) -> None:
        """Global per-task gradients: one collective (every rank joins, with zeros if it had no
        und loss); the last backward's ``.grad`` copy is DDP's average of the total."""
        import torch.distributed as dist

        und = self._und or [torch.zeros_like(p) for p in self.params]
        flat = torch.cat([u.reshape(-1) for u in und])
        # Divide, then sum: DDP's own averaging order, so und and the total agree bit for bit
        # where gen does not reach (gen exactly 0 there, cosine NaN as single-process).
        flat.div_(dist.get_world_size())
        dist.all_reduce(flat)
        self._und = [v.view_as(p) for v, p in zip(flat.split([p.numel() for p in self.params]),
                                                    self.params)]
        total = self._or_zeros(self._total or [None] * len(self.params))
        self._gen = [t - u for t, u in zip(total, self._und)]

    def finish(self) -> dict[str, np.ndarray]:
        """The ``grad`` row: cosine, norm_und, norm_gen (layer, component); then reset."""
        if self.distributed and self.params:
            self._reduce_ddp()
        L, C = len(self.layers), len(self.components)
        dev = self._own.device
        cells = torch.zeros(L * C + 1, 3, dtype=torch.float64, device=dev)
        if self._sums is None and (self._und is not None or self._gen is not None):
            self._fused()  # under DDP, or one task live: the pass without an update
        if self._sums is not None:
            cells.index_add_(0, self._own, self._sums)
            cells.index_add_(0, self._all, self._sums)
        s = cells[: L * C].cpu().numpy().reshape(L, C, 3)
        self.start()
        dot, nu2, ng2 = s[..., 0], s[..., 1], s[..., 2]
        norm_und, norm_gen = np.sqrt(nu2), np.sqrt(ng2)
        with np.errstate(invalid="ignore", divide="ignore"):
            cosine = np.where((nu2 > 0) & (ng2 > 0), dot / (norm_und * norm_gen), np.nan)
        cosine = np.clip(cosine, -1.0, 1.0)
        absent = ~self._present
        cosine[absent] = np.nan
        norm_und[absent] = np.nan
        norm_gen[absent] = np.nan
        return {"cosine": cosine, "norm_und": norm_und, "norm_gen": norm_gen}
