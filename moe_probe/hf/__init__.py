"""Hugging Face MoE adapter: routing capture through forward hooks and ``moe-probe scan``.

- ``families.py`` — the table (family -> router / experts / shared-expert paths, selection rule).
- ``discover.py`` — MoE layers from the table, else by structure (``find_moe_layers``).
- ``routers.py``  — ``HFRouters``: the model's routers for ``moe_probe.watch`` (any training loop).
- ``capture.py``  — ``router_record``: a router's output as a ``RouterRecord``; ``RouterCapture``:
  the records of every layer in one forward (hooks from ``moe_probe.model.hooks``, attached for
  that forward only); shared-expert outputs; logits with routed experts masked.
- ``loading.py``  — offline model loading (directory or config JSON) and text windows.
- ``grad.py``, ``probes.py``, ``advise.py`` — gradient conflict, shared-expert probes, the
  Symbiotic-MoE partition proposal.
- ``scan.py`` / ``commands.py`` — the ``scan`` pipeline writing ``RUN_DIR/traces.zarr``.
- ``callback.py`` — ``TraceCallback`` / ``TraceTrainerMixin``: the HF ``Trainer`` (and TRL) traced
  through ``moe_probe.watch`` (imported on first use: ``moe_probe.hf.TraceCallback``).

Only this package knows HF module names. Set ``MOE_PROBE_HF_STRUCTURAL=1`` to ignore the family
table and find routers by structure alone (what a family missing from the table gets).
"""


def __getattr__(name):
    """``TraceCallback`` and ``TraceTrainerMixin``, imported (with transformers) on first use."""
    if name in ("TraceCallback", "TraceTrainerMixin"):
        from moe_probe.hf import callback

        return getattr(callback, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TraceCallback", "TraceTrainerMixin"]
