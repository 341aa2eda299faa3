"""moe_probe.reproduce: the paper's experiment at CPU scale (``moe-probe reproduce``).

``moe-probe reproduce [--quick] [--seeds N] [--sweep] --out DIR``

- Plan (:mod:`.config`): per seed one cached stage-1 base, then stage 2 for ``moe``, ``mot``,
  ``symbiotic``, ``und_only`` and the Symbiotic ablations (no shielding, no differential LR,
  und split 1/4 and 1/2; the 3/4 split is ``symbiotic`` itself). ``--quick``: ``tiny-*``
  recipes, 2 seeds; default: the demo recipes, 5 seeds.
- Runs (:mod:`.runner`) live in ``DIR/<kind>/seed<S>/`` (bases in ``DIR/.base``). Resumable:
  finished runs (``reproduce_done.json``) are skipped, half-done ones continued from their
  checkpoint. ``$MOE_PROBE_JOBS`` sets the worker processes (default: 1 quick, 2 otherwise).
- Results (:mod:`.metrics`, :mod:`.table`, :mod:`.claims`): ``results.md`` / ``.csv`` /
  ``.json`` with mean and t-based 95% CI over seeds per kind, every cell's per-seed values
  and store sources, and each paper claim with a verdict from paired t-tests across seeds
  (Holm-corrected per claim; ``claims.csv`` has one row per comparison); ``report.html`` is
  ``moe-probe diagnose`` over all runs.
- ``--sweep`` (:mod:`.sweep`, :mod:`.sweep_results`, :mod:`.sweep_report`): the map of where
  collapse appears, through the same runner.
"""
