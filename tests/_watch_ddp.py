"""A plain DDP loop under ``moe_probe.watch`` (run by tests/test_watch_dist.py).

``python tests/_watch_ddp.py OUT``: one process, gradient accumulation 2; under
``torchrun --nproc_per_node 2``: rank r runs micro-batch r of each step (the same global batch).
``python tests/_watch_ddp.py OUT TOOLS``: also ``report_to=TOOLS`` (e.g. ``tensorboard``).
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import moe_probe
from moe_probe.hf.capture import lm_loss
from moe_probe.hf.loading import load_model

STEPS, MICRO, B, S = 3, 2, 2, 16
FIX = Path(__file__).resolve().parents[1] / "fixtures" / "hf"


def main(out: str, report_to: str = "") -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0
    if world > 1:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
    model, _, _ = load_model(str(FIX / "mixtral.json"), seed=0)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with moe_probe.watch(net, out, kind_names=["text", "code"], grad_every=2, tasks=("a", "b"),
                         kinds=lambda input_ids, **_: input_ids % 2 == 0,
                         report_to=report_to) as w:
        for step in range(STEPS):
            batches = [torch.randint(3, model.config.vocab_size, (B, S), generator=g) for _ in range(MICRO)]
            for i, ids in enumerate(batches):
                if world > 1 and i != rank:
                    continue
                logits = net(input_ids=ids).logits
                scale = MICRO // world  # mean over all micro-batches (DDP averages over ranks)
                w.backward({"a": lm_loss(logits[:1], ids[:1]) / scale,
                            "b": lm_loss(logits[1:], ids[1:]) / scale})
            opt.step()
            opt.zero_grad(set_to_none=True)
            w.step(step)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
