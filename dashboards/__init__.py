"""Interactive routing dashboard: `moe-probe dash [ROOT] [--host 127.0.0.1] [--port 8050] [--refresh S]`.

Pages (one module each in `pages/`, registered with `pages_common.register_page`):
Runs (every run under ROOT, last capacity rate, diagnosis verdicts, pick runs to compare),
Routing, Conflicts, Probes, Compare (paper Fig. 5a/5b/6), Live (committed rows while a run writes).

Layers: `data` (ROOT confinement, lazy slices of the stores through `moe_probe.open_run`),
`bucketing` (min/max per bucket), `components` (heat map, bucketed lines), `figures/` (data path +
figure builders, no Dash), `cache` (the one cache: version-keyed LRU with single flight, for
datasets, slices, figures and diagnoses), `views` (the view registry: each figure of a page with
its arguments by name; figure caching and warming go through it), `pages/` (layout + callbacks,
first screen built with the layout: `pages_common.first_screen`), `app`.
Read-only, local assets only (works offline), binds 127.0.0.1 unless told otherwise.
"""
