"""A tiny Mixtral fine-tuned by the real HF ``Trainer`` with ``TraceCallback``, paced so that a
dashboard can watch it train: ``python tests/_hf_live.py OUT STEPS``. Run as its own process
by tests/test_dash_browser.py (a training job writing while the dashboard's server reads)."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from transformers import Trainer, TrainerCallback  # noqa: E402

from _hf_trainer import Windows, tiny, training_args  # noqa: E402
from moe_probe.hf import TraceCallback  # noqa: E402


class Pace(TrainerCallback):
    """A tiny model's step takes milliseconds; a real one takes long enough for a page to
    refresh between steps."""

    def on_step_end(self, args, state, control, **kw):
        time.sleep(0.2)


def main(out: str, steps: int) -> None:
    model = tiny("mixtral")
    args = training_args(tempfile.mkdtemp(prefix="hf-live-trainer-"), steps=steps)
    trainer = Trainer(model=model, args=args, train_dataset=Windows(model.config.vocab_size, 64),
                      callbacks=[TraceCallback(out, kinds="token_type_ids",
                                               kind_names=["odd", "even"]), Pace()])
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
