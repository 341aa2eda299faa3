"""Cost of ``moe_probe.hf.TraceCallback`` on a Hugging Face ``Trainer`` step, side by side.

A mid-size Mixtral built from config (hidden 256, 4 MoE layers, 8 experts, top-2, seq 256, CPU),
trained by the real Trainer in three variants on ONE model:

- ``plain``:   ``Trainer``, no callback;
- ``routing``: ``Trainer`` + ``TraceCallback`` counting every step (a routing and a loss row each);
- ``tasks``:   ``TraceTrainerMixin`` trainer (the loss as two task losses), no callback;
- ``grad``:    the same + ``TraceCallback(grad_every=1)``: the gradient conflict on every step,
  i.e. a sampled step (ratios to ``plain`` and to ``tasks``).

Each repeat trains every variant for ``--steps`` optimizer steps (a fresh Trainer and run
directory; set-up is not timed: a callback times ``on_step_begin`` -> ``on_step_end``); repeats
are interleaved with the order rotating, so machine-load drift hits all variants alike. Medians
of per-step times and their ratios to ``plain`` are printed for process CPU time (all threads,
the store writer's included) and wall time. Targets: routing <= 1.03, grad <= 1.7.

    OMP_NUM_THREADS=1 python benchmarks/bench_hf_trainer.py [--reps 6] [--steps 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from moe_probe.hf import TraceCallback, TraceTrainerMixin  # noqa: E402

HIDDEN, LAYERS, EXPERTS, TOP_K, SEQ, BATCH, VOCAB = 256, 4, 8, 2, 256, 2, 1024


class TaskTrainer(TraceTrainerMixin, Trainer):
    pass


class StepClock(TrainerCallback):
    def __init__(self):
        self.cpu: list[float] = []
        self.wall: list[float] = []

    def on_step_begin(self, args, state, control, **kw):
        self._t = (time.process_time(), time.perf_counter())

    def on_step_end(self, args, state, control, **kw):
        self.cpu.append(time.process_time() - self._t[0])
        self.wall.append(time.perf_counter() - self._t[1])


class Batches(torch.utils.data.Dataset):
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i], "task": torch.tensor(i % 2)}


def model():
    cfg = AutoConfig.for_model("mixtral", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                               num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4,
                               num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
                               max_position_embeddings=SEQ, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).train()


def train(variant: str, net, data, root: Path, steps: int, rep: int) -> StepClock:
    clock = StepClock()
    args = TrainingArguments(output_dir=str(root / f"hf-{variant}-{rep}"), per_device_train_batch_size=BATCH,
                             max_steps=steps, learning_rate=1e-4, report_to=[], use_cpu=True,
                             logging_steps=1, save_strategy="no", disable_tqdm=True,
                             remove_unused_columns=False, dataloader_num_workers=0, seed=max(rep, 0))
    cls, cbs = Trainer, []
    if variant == "routing":
        cbs = [TraceCallback(root / f"{variant}-{rep}")]
    elif variant == "tasks":
        cls = TaskTrainer
    elif variant == "grad":
        cls, cbs = TaskTrainer, [TraceCallback(root / f"{variant}-{rep}", grad_every=1, tasks=("a", "b"))]
    cls(model=net, args=args, train_dataset=data, callbacks=[*cbs, clock]).train()
    return clock


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=6, help="interleaved repeats per variant")
    ap.add_argument("--steps", type=int, default=2, help="timed optimizer steps per repeat")
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    net, data = model(), Batches(BATCH * args.steps)
    variants = ["plain", "routing", "tasks", "grad"]
    cpu = {v: [] for v in variants}
    wall = {v: [] for v in variants}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        train("plain", net, data, Path(tmp), 1, -1)  # warm-up (allocator, kernels)
        for rep in range(args.reps):
            for v in variants[rep % 4:] + variants[: rep % 4]:
                clock = train(v, net, data, Path(tmp), args.steps, rep)
                cpu[v] += clock.cpu
                wall[v] += clock.wall
    n_params = sum(p.numel() for p in net.parameters())
    print(f"mixtral hidden={HIDDEN} layers={LAYERS} experts={EXPERTS} top-{TOP_K} seq={SEQ} batch={BATCH} "
          f"params={n_params / 1e6:.1f}M threads={torch.get_num_threads()} "
          f"reps={args.reps} steps/rep={args.steps} total={time.perf_counter() - t0:.0f}s")
    base_c, base_w = statistics.median(cpu["plain"]), statistics.median(wall["plain"])
    print(f"{'variant':<8} {'cpu ms':>8} {'ratio':>6} {'wall ms':>8} {'ratio':>6}   target")
    for v, target in zip(variants, ["", "<= 1.03", "", "<= 1.7"]):
        c, w = statistics.median(cpu[v]), statistics.median(wall[v])
        print(f"{v:<8} {c * 1e3:8.1f} {c / base_c:6.3f} {w * 1e3:8.1f} {w / base_w:6.3f}   {target}")
    c = statistics.median(cpu["grad"]) / statistics.median(cpu["tasks"])
    w = statistics.median(wall["grad"]) / statistics.median(wall["tasks"])
    print(f"grad / tasks (the tracer alone): cpu {c:.3f}  wall {w:.3f}")


if __name__ == "__main__":
    main()
