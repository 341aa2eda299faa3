"""Interactive routing dashboard: `moe-probe dash [ROOT] [--host 127.0.0.1] [--port 8050] [--refresh S]`.

Pages (one module each in `pages/`, registered with `dash.register_page`):
Runs (every run under ROOT, last capacity rate, diagnosis verdicts, pick runs to compare),
Routing, Conflicts, Probes, Compare (paper Fig. 5a/5b/6), Live (committed rows while a run writes).

Layers: `data` (ROOT confinement, lazy slices of the stores through `moe_probe.open_run`),
`bucketing` (min/max per bucket), `components` (heat map, bucketed lines), `figures/` (data path +
figure per view, no Dash; the benchmark times these), `pages/` (layout + callbacks), `app`.
Read-only, local assets only (works offline), binds 127.0.0.1 unless told otherwise.
"""
