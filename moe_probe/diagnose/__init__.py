"""moe_probe.diagnose — collapse / conflict diagnosis of traced runs (`moe-probe diagnose`).

    moe-probe diagnose RUN_DIR… [--control RUN] [--json FILE] [--html FILE]
                      [--fail-on collapse|conflict|any]

Reads stores only through :func:`moe_probe.open_run` (no torch). Parts:

* :mod:`.rundata` — a run's attrs and groups as xarray Datasets (:class:`RunData`); detectors
  take these, so they run on hand-built Datasets as well as on stores.
* :mod:`.config` — :class:`DiagnoseConfig`, every threshold with its documented default.
* detectors — :mod:`.routing` (routing_collapse, dead_experts, load_imbalance),
  :mod:`.dominance` (modality_dominance), :mod:`.gradients` (gradient_domination,
  gradient_conflict), :mod:`.probes` (shared_regression). Each returns a :class:`CheckResult`:
  findings, "ok", or "not measured" with the reason (a group that was not traced is never a
  finding).
* :mod:`.findings` — :class:`Finding` and the JSON schema of ``--json``.
* reports — :mod:`.markdown` (stdout), :mod:`.html_report` with :mod:`.figures_curves` and
  :mod:`.figures_maps` (self-contained page, plotly.js embedded once).
"""
