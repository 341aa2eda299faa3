"""Detectors against hand-built Datasets with the documented dims (ARCHITECTURE.md, "Store").

Each test plants one problem with known layers/modality/onset (or none) and checks the verdict.
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from moe_probe.diagnose.config import DiagnoseConfig
from moe_probe.diagnose.findings import Report
from moe_probe.diagnose.runner import diagnose, diagnose_run
from moe_probe.diagnose.rundata import RunData

MODS = ["text", "vit", "vae"]
LAYERS = ["0", "1", "2"]
E = 8


def _routing(n=200, *, seed=0, cap=None, load_fn=None, group_of=lambda mi: list(range(E))):
    """Routing group from per-step loads; capacity_rate given explicitly (cap[s, l, m]);
    MaxVio and dead_frac over the experts of each modality's group, as the tracer computes them."""
    rng = np.random.default_rng(seed)
    steps = np.arange(n, dtype=np.int64) * 2  # traced every 2 steps: onsets are steps, not rows
    tokens = np.array([64, 64, 256])
    load = np.zeros((n, len(LAYERS), 3, E))
    for s in range(n):
        for li in range(len(LAYERS)):
            for mi in range(3):
                p = np.full(E, 1.0 / E) if load_fn is None else load_fn(s, li, mi)
                load[s, li, mi] = rng.multinomial(tokens[mi] * 2, p)
    maxvio, dead = np.zeros(load.shape[:3]), np.zeros(load.shape[:3])
    for mi in range(3):
        g = load[:, :, mi][..., group_of(mi)]
        mean = g.mean(-1)
        maxvio[:, :, mi] = (g.max(-1) - mean) / np.maximum(mean, 1e-9)
        dead[:, :, mi] = (g < 0.01 * mean[..., None]).mean(-1)
    if cap is None:
        cap = np.clip(0.97 + rng.normal(0, 0.01, (n, len(LAYERS), 3)), 0, 1)
    dims3 = ("step", "layer", "modality")
    return xr.Dataset(
        {"capacity_rate": (dims3, cap), "maxvio": (dims3, maxvio), "dead_frac": (dims3, dead),
         "tokens": (dims3, np.broadcast_to(tokens, cap.shape).copy()),
         "load": (dims3 + ("expert",), load)},
        coords={"step": steps, "layer": LAYERS, "modality": MODS,
                "expert": [str(e) for e in range(E)]})


def _grad(n=20, *, seed=0, cosine=None, ratio=1.0):
    rng = np.random.default_rng(seed)
    layers, comps = LAYERS + ["all"], ["attn", "router", "shared", "experts"]
    shape = (n, len(layers), len(comps))
    cos = np.clip(0.3 + rng.normal(0, 0.1, shape), -1, 1) if cosine is None else cosine(shape)
    nu = np.abs(1 + rng.normal(0, 0.1, shape))
    dims = ("step", "layer", "component")
    return xr.Dataset({"cosine": (dims, cos), "norm_und": (dims, nu),
                       "norm_gen": (dims, nu * ratio * np.abs(1 + rng.normal(0, 0.05, shape)))},
                      coords={"step": np.arange(n, dtype=np.int64) * 10, "layer": layers,
                              "component": comps})


def _probe(n=6, *, seed=0, sel_fn=None, iso_fn=None):
    rng = np.random.default_rng(seed)
    tasks = ["digit", "kind"]
    sel = np.full((n, len(LAYERS), 2), 0.4) + rng.normal(0, 0.01, (n, len(LAYERS), 2))
    iso = np.stack([np.full(n, 0.6), np.full(n, 2.0)], 1) + rng.normal(0, 0.005, (n, 2))
    if sel_fn:
        sel = sel_fn(sel)
    if iso_fn:
        iso = iso_fn(iso)
    dims = ("step", "layer", "task")
    return xr.Dataset({"selectivity": (dims, sel), "accuracy": (dims, sel + 0.5),
                       "control_accuracy": (dims, np.full_like(sel, 0.5)),
                       "isolated": (("step", "metric"), iso)},
                      coords={"step": np.arange(n, dtype=np.int64) * 50, "layer": LAYERS,
                              "task": tasks, "metric": ["mmu_acc", "lm_loss"]})


def _run(name="r", **groups):
    return RunData(name=name, run_dir=f"/runs/{name}",
                   attrs={"model": {"arch": "moe"}, "run": {"recipe": "moe"}}, groups=groups)


def _healthy(**over):
    g = {"routing": _routing(), "grad": _grad(), "probe": _probe()}
    g.update(over)
    return _run(**g)


CFG = DiagnoseConfig()


def test_healthy_run_has_no_finding_and_everything_measured():
    d = diagnose_run(_healthy(), CFG)
    assert d.findings == ()
    # token-level routing is an extra group this hand-built run does not have
    assert d.checks.pop("expert_takeover") == "not measured: no token-level routing rows"
    assert set(d.checks.values()) == {"ok"}
    assert d.final_capacity_rate["text"] == pytest.approx(0.97, abs=0.05)


def test_absent_groups_are_not_measured_never_findings():
    d = diagnose_run(_run(routing=_routing()), CFG)
    assert d.findings == ()
    for kind in ("gradient_domination", "gradient_conflict", "shared_regression"):
        assert d.checks[kind].startswith("not measured")
    assert d.checks["routing_collapse"] == "ok"


def _cap_with(fn, n=200, seed=1):
    rng = np.random.default_rng(seed)
    cap = np.clip(0.97 + rng.normal(0, 0.01, (n, len(LAYERS), 3)), 0, 1)
    fn(cap)
    return cap


def test_collapse_found_with_layers_modality_and_onset():
    def plant(cap):  # text collapses in layers 1 and 2 from row 120 (step 240), gradually
        cap[120:, 1:, 0] = np.linspace(0.7, 0.4, 80)[:, None]

    d = diagnose_run(_healthy(routing=_routing(cap=_cap_with(plant))), CFG)
    (f,) = d.findings
    assert (f.kind, f.modality, f.layers) == ("routing_collapse", "text", ("1", "2"))
    assert abs(f.onset_step - 240) <= 2 * CFG.smooth
    assert f.severity == "critical" and f.evidence["final_mean"] == pytest.approx(0.4, abs=0.01)
    assert "symbiotic" in f.remedy


@pytest.mark.parametrize("length", [1, 2, 5, 19])
def test_short_dips_do_not_trigger_collapse(length):
    def plant(cap):
        cap[50:50 + length, 0, 0] = 0.3

    d = diagnose_run(_healthy(routing=_routing(cap=_cap_with(plant))), CFG)
    assert [f.kind for f in d.findings] == []


def test_one_spike_inside_collapse_does_not_split_the_window():
    def plant(cap):
        cap[100:130, 0, 2] = 0.5
        cap[110, 0, 2] = 0.99  # a noisy spike; windows of 10 either side, none of 20 raw

    d = diagnose_run(_healthy(routing=_routing(cap=_cap_with(plant))), CFG)
    (f,) = d.findings
    assert (f.modality, f.layers, f.onset_step) == ("vae", ("0",), 200)
    assert f.severity == "info"  # recovered by the end


def _kill(experts, *, layer, from_row, modalities):
    def load_fn(s, li, mi):
        p = np.full(E, 1.0 / E)
        if mi in modalities and li == layer and s >= from_row:
            p[experts] = 0
            p /= p.sum()
        return p
    return load_fn


def test_dead_experts_named_from_load():
    run = _healthy(routing=_routing(load_fn=_kill([6, 7], layer=0, from_row=80,
                                                  modalities=(0, 1, 2))))
    d = diagnose_run(run, CFG)
    (f,) = d.findings  # losing 2 of 8 leaves the others at 1.33x the mean: not an imbalance
    assert (f.kind, f.layers, f.onset_step) == ("dead_experts", ("0",), 160)
    assert f.evidence["experts"] == [6, 7] and f.modality is None  # all token kinds lost them


def test_one_modality_leaving_experts_is_not_death():
    # vae stops using 6-7 but text and vit still route there: the experts are alive
    run = _healthy(routing=_routing(load_fn=_kill([6, 7], layer=0, from_row=80, modalities=(2,))))
    assert diagnose_run(run, CFG).findings == ()

    # ...unless the layer is grouped and 6-7 belong to vae's group alone
    def grouped(s, li, mi):
        p = np.zeros(E)
        if mi < 2:
            p[:4] = 1
        else:
            p[4:] = 1
            if li == 0 and s >= 80:
                p[[6, 7]] = 0
        return p / p.sum()

    run = _healthy(routing=_routing(load_fn=grouped,
                                    group_of=lambda mi: [0, 1, 2, 3] if mi < 2 else [4, 5, 6, 7]))
    run.attrs["model"]["groups"] = {l: {"und": [0, 1, 2, 3], "gen": [4, 5, 6, 7]} for l in LAYERS}
    found = diagnose_run(run, CFG).findings
    (f,) = [f for f in found if f.kind == "dead_experts"]
    # half of vae's group is gone, so the other half carries 2x the mean: MaxVio ~1, a real
    # (borderline) imbalance of vae in that layer and nowhere else
    assert {(g.kind, g.modality, g.layers) for g in found if g is not f} <= {
        ("load_imbalance", "vae", ("0",))}
    assert (f.kind, f.modality, f.evidence["experts"]) == ("dead_experts", "vae", [6, 7])


def test_modality_dominance_and_imbalance():
    def load_fn(s, li, mi):
        p = np.zeros(E)
        if mi < 2:
            p[:4] = 1
        elif li == 1 and s >= 100:  # vae moves onto the und experts 0-3 of layer 1
            p[:4] = 1
        else:
            p[4:] = 1
        return p / p.sum()

    d = diagnose_run(_healthy(routing=_routing(load_fn=load_fn)), CFG)
    dom = [f for f in d.findings if f.kind == "modality_dominance"]
    assert len(dom) == 1
    assert dom[0].layers == ("1",) and dom[0].modality == "vae" and dom[0].onset_step == 200
    assert dom[0].evidence["per_layer"]["1"]["taken_over"] == [0, 1, 2, 3]
    # Each modality fills half the experts from the start: MaxVio = 1.0 + sampling noise, under
    # a bar of 1.5 and sustained above a bar of 0.5 from row 0.
    d1 = diagnose_run(_healthy(routing=_routing(load_fn=load_fn)), DiagnoseConfig(maxvio=1.5))
    assert not [f for f in d1.findings if f.kind == "load_imbalance"]
    d2 = diagnose_run(_healthy(routing=_routing(load_fn=load_fn)), DiagnoseConfig(maxvio=0.5))
    imb = [f for f in d2.findings if f.kind == "load_imbalance"]
    assert {f.modality for f in imb} == {"text", "vit", "vae"} and imb[0].onset_step == 0


def test_gradient_conflict_per_layer_component():
    def cosine(shape):
        rng = np.random.default_rng(3)
        c = np.clip(0.3 + rng.normal(0, 0.1, shape), -1, 1)
        c[5:, 0, 2] = -0.4 + rng.normal(0, 0.05, shape[0] - 5)  # layer 0 shared, from row 5
        c[:, 1, 3] = np.nan  # a component the layer lacks: not evidence
        return c

    d = diagnose_run(_healthy(grad=_grad(cosine=cosine)), CFG)
    (f,) = d.findings
    assert (f.kind, f.layers, f.evidence["component"]) == ("gradient_conflict", ("0",), "shared")
    assert f.onset_step == 50 and f.severity == "critical"


def test_noisy_cosine_around_zero_is_not_persistent_conflict():
    def cosine(shape):
        return np.random.default_rng(4).normal(0.0, 0.2, shape)

    d = diagnose_run(_healthy(grad=_grad(n=40, cosine=cosine)), CFG)
    assert [f.kind for f in d.findings] == []


def test_gradient_domination_on_shared_and_router_only():
    d = diagnose_run(_healthy(grad=_grad(ratio=8.0)), CFG)
    dom = sorted((f.evidence["component"], f.layers) for f in d.findings)
    assert dom == [("router", ("0", "1", "2", "all")), ("shared", ("0", "1", "2", "all"))]
    assert all(f.onset_step == 0 and f.modality == "vae" for f in d.findings)


def test_shared_regression_vs_start_and_vs_control():
    def falling(sel):
        sel[3:, 2, 0] -= 0.2  # layer 2 digit selectivity falls from the 4th probe
        return sel

    d = diagnose_run(_healthy(probe=_probe(sel_fn=falling)), CFG)
    (f,) = d.findings
    assert (f.kind, f.layers, f.onset_step) == ("shared_regression", ("2",), 150)
    assert f.evidence["basis"] == "start"

    def loss_up(iso):
        iso[:, 1] *= np.linspace(1, 1.5, iso.shape[0])  # lm_loss rises: lower is better
        return iso

    d = diagnose_run(_healthy(probe=_probe(iso_fn=loss_up)), CFG)
    (f,) = d.findings
    assert list(f.evidence["series"]) == ["isolated[lm_loss]"] and f.layers == ()

    better = _run("ctrl", probe=_probe(seed=5, iso_fn=lambda iso: iso + [0.2, 0]))
    d = diagnose_run(_healthy(), CFG, control=better)
    (f,) = d.findings
    assert f.evidence["basis"] == "control" and list(f.evidence["series"]) == ["isolated[mmu_acc]"]
    # a run compared with itself as control finds nothing
    assert diagnose_run(better, CFG, control=better).findings == ()


def test_report_json_round_trip_and_fail_on():
    bad = _healthy(grad=_grad(ratio=8.0))
    report = diagnose([_healthy(), bad], CFG)
    back = Report.from_dict(__import__("json").loads(report.to_json()))
    assert back == report
    assert len(report.matching("conflict")) == 2 and report.matching("collapse") == []
    assert len(report.matching("any")) == 2 and report.matching(None) == []
    with pytest.raises(ValueError):
        Report.from_dict({"schema": "other"})


def test_remedies_follow_the_runs_arch():
    """A grouped (symbiotic/mot) run is never told to switch to the symbiotic recipe."""
    from moe_probe.diagnose.findings import REMEDIES, remedy_for

    assert "--recipe symbiotic" in remedy_for("routing_collapse", "moe")
    for arch in ("symbiotic", "mot"):
        for kind in REMEDIES:
            assert "--recipe symbiotic" not in remedy_for(kind, arch), (kind, arch)
