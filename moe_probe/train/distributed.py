"""Multi-process training under ``torchrun`` (DistributedDataParallel), one rank = one process.

    torchrun --nproc_per_node N -m moe_probe train --recipe symbiotic --out RUN

What each rank does (N = world size, m = train.micro_batches, B = train.batch_size):
- data: every rank draws the SAME N·m micro-batches of B/(N·m) samples from the same seeded
  generator and runs only its own contiguous m of them (rank r: rows [r·B/N, (r+1)·B/N) of the
  global batch). So the global batch is B on any N, the checkpointed data position is
  rank-independent, and a single process with ``micro_batches = N·m`` sees exactly the same
  micro-batches in the same order (the reference the tests compare with).
- gradients: DDP averages over ranks; each rank scales its losses by 1/m, so the update equals
  the single-process one (mean over all N·m micro-batches). DDP syncs on a rank's last
  micro-batch only (``no_sync`` before).
- traces: routing counts and the loss row are reduced over ranks before any metric is computed;
  the gradient tracer averages its per-task gradients (see ``GradConflictTracer``).
- rank 0 alone writes the store, checkpoints and run files, and evaluates (eval, snapshot,
  probes use the unwrapped model: no collective there, so no rank can skip one).
- stage 1 (the cached base of a stage-2 run) is trained distributed too, under rank 0's lock.

- resume: only with the same number of ranks (the checkpoint records it; another number is a
  one-line error). Ranks read rank 0's checkpoint and base cache: one node or a shared disk.

Gloo on CPU; with CUDA present the group is ``cpu:gloo,cuda:nccl`` (this trainer keeps its
tensors on the CPU, so gloo carries them). Collectives have a finite timeout
(``MOE_PROBE_DIST_TIMEOUT`` seconds, default 900): a hung peer becomes an error, not a hang.
It must exceed rank 0's longest evaluation, during which the other ranks wait. A dead peer is
seen at once (closed connection); either way the rank says so in one line and exits 1, and
torchrun stops the others and reports which rank failed first.
"""

from __future__ import annotations

import contextlib
import gc
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist

TIMEOUT_ENV = "MOE_PROBE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 900.0


def env_world_size() -> int:
    """World size torchrun announced (1 when not launched by torchrun)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(raw)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {raw!r}") from None
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world}")
    return world


@dataclass(frozen=True)
class Dist:
    """This process's place in the run; ``Dist()`` is the single-process run (all no-ops)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (a decision only rank 0 may take, e.g. under a lock)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place mean over ranks (gloo has no AVG op). Divided first, then summed, as DDP
        averages gradients: with 2 ranks, l0/2 + l1/2 is bit for bit a single process's mean of
        two micro-batch losses."""
        if self.enabled:
            t.div_(self.world)
            dist.all_reduce(t)
        return t

    # ------------------------------------------------------------------ model
    def wrap(self, model: torch.nn.Module):
        """What to call for training forwards: ``model`` itself, or DDP around it."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        p = next(model.parameters())
        # find_unused_parameters: a micro-batch without vae tokens never reaches the gen group's
        # router/experts (and stage 1 never reaches the vae I/O). broadcast_buffers off: the
        # balance loads (load_E) are per-rank accumulators, summed explicitly before use
        # (sum_balance_loads); rank 0's copy must not overwrite them at every forward.
        with warnings.catch_warnings():  # its successor still syncs buffers at init: not wanted
            warnings.simplefilter("ignore", FutureWarning)
            ddp = DDP(_LossesOnly(model), device_ids=[p.device.index] if p.is_cuda else None,
                      find_unused_parameters=True, broadcast_buffers=False)
        return _DDPNet(ddp)

    def grad_sync(self, net, last: bool):
        """Context for one micro-batch's forward + backward: DDP reduces on the last only."""
        if self.enabled and not last:
            return net.ddp.no_sync()
        return contextlib.nullcontext()

    def sum_balance_loads(self, model: torch.nn.Module) -> None:
        """Sum the loss-free-balancing loads over ranks so every rank takes the same bias step
        (the single-process one: loads of every micro-batch of the step). One collective."""
        if not self.enabled:
            return
        bufs = [b for n, b in model.named_buffers() if n.endswith("load_E")]
        if bufs:
            flat = torch.cat([b.reshape(-1) for b in bufs])
            dist.all_reduce(flat)
            for b, v in zip(bufs, flat.split([b.numel() for b in bufs])):
                b.copy_(v.view_as(b))


SINGLE = Dist()


class _LossesOnly(torch.nn.Module):
    """What DDP wraps: the model's forward reduced to its loss dicts. DDP looks for unused
    parameters from the tensors a forward returns; the logits / velocity outputs reach heads
    that a micro-batch's loss may not (no vae tokens -> no gen loss through the vae head), and
    DDP would then wait forever for their gradients."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        out = self.model(batch)
        return {"losses": out.losses, "task_losses": out.task_losses}


class _DDPNet:
    """Callable like the model for the trainer's needs: ``net(batch).losses / .task_losses``."""

    def __init__(self, ddp):
        self.ddp = ddp

    def __call__(self, batch) -> SimpleNamespace:
        return SimpleNamespace(**self.ddp(batch))


def _timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0, got {raw!r}")
    return value


@contextlib.contextmanager
def process_group():
    """``Dist`` of this process: joins torchrun's group (once) and leaves it on exit.

    Without torchrun (WORLD_SIZE unset or 1) it yields :data:`SINGLE` and touches nothing.
    A collective failure (a peer died or timed out) leaves as one line and exit status 1: the
    launcher's own report names the rank that failed first.
    """
    world = env_world_size()
    if world == 1:
        yield SINGLE
        return
    if "RANK" not in os.environ:
        raise ValueError(f"WORLD_SIZE={world} but no RANK in the environment; launch with "
                         f"torchrun --nproc_per_node {world} -m moe_probe train …")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    timeout = timedelta(seconds=_timeout_s())
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=timeout)
    try:
        yield Dist(rank=rank, world=world, local_rank=local_rank)
    except (dist.DistError, RuntimeError) as e:
        # NCCL raises DistError; gloo a plain RuntimeError naming its transport ("Connection
        # closed by peer", "Timed out waiting"). Anything else is a bug: keep its traceback.
        if not (isinstance(e, dist.DistError) or "gloo" in str(e)):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"moe-probe train: error: rank {rank} of {world}: a collective failed "
                         f"(a peer process died or timed out): {first}") from None
    finally:
        # DDP's reducer sits in reference cycles and keeps the gloo group alive; left to the
        # interpreter's exit, tearing that group down aborted the process ("terminate called
        # without an active exception", ~1 run in 10 of the 2-rank test). Free it now, while
        # the group is still up.
        gc.collect()
        dist.destroy_process_group()
