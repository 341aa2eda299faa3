"""moe_probe.trace — tracers that turn hook-point values into small per-step store rows.

- ``config``   TraceConfig: what is traced and how often.
- ``routing``  RoutingCounter (model-agnostic: RouterRecord + LayerRouting; reused by ``hf``),
               attached with ``moe_probe.model.hooks.hooks`` on every ``hook_router``.
- ``grad``     gradient conflict between the und and gen losses per layer × component.
- ``snapshot`` saturation / co-activation on the fixed probe batch at each eval.
- ``probes``   linear probes on shared-expert outputs with control tasks;
  ``isolated`` shared-experts-only understanding metrics.
- ``watch``    Watch: a training step's routing / loss / grad rows in any loop (``moe_probe.watch``);
- ``online``   online findings: the diagnose detectors every N steps, warn / stop (``on_finding``);
- ``session``  TraceSession: the trainer's single handle (INTERNAL_API §3), built on Watch;
  ``layout``   the store coords/attrs of a model.

Submodules are imported explicitly; this package import stays cheap.
"""
