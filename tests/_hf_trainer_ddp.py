"""A Trainer fine-tune under ``TraceCallback`` (run by tests/test_hf_trainer_dist.py).

``python tests/_hf_trainer_ddp.py OUT``: one process, gradient accumulation 2; under
``torchrun --nproc_per_node 2``: accumulation 1 on each of 2 gloo ranks, the same global batches
(accelerate hands rank r every r-th batch of B).
"""

import os
import sys

import torch

from _hf_trainer import ACCUM, B, Windows, tiny, training_args
from transformers import Trainer

from moe_probe.hf import TraceCallback

STEPS = 3


def main(out: str) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = tiny("mixtral")
    args = training_args(f"{out}.hf", steps=STEPS, accum=ACCUM // world, optim="sgd",
                         learning_rate=0.1, ddp_backend="gloo" if world > 1 else None)
    trainer = Trainer(model=model, args=args, train_dataset=Windows(model.config.vocab_size, STEPS * ACCUM * B),
                      callbacks=[TraceCallback(out, kinds="token_type_ids", kind_names=["odd", "even"])])
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1])
