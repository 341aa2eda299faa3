"""Verdicts: what a detector found, and the JSON schema of `moe-probe diagnose --json`.

JSON schema (``schema`` = ``"moe_probe.diagnose/1"``)::

    {
      "schema": "moe_probe.diagnose/1",
      "config": {<DiagnoseConfig field>: value, ...},   # thresholds the detectors ran with
      "control": "RUN_DIR" | null,                       # --control run, if any
      "runs": [
        {
          "run_dir": str, "name": str, "recipe": str|null, "arch": str|null,
          "steps": {group: committed rows},  "last_step": int|null,
          "final_capacity_rate": {modality: float|null},  # mean over layers, last routed row
          "checks": {kind: "finding" | "ok" | "not measured: <why>"},
          "findings": [Finding, ...]
        }, ...
      ],
      "findings": [Finding, ...]                         # all runs, flat
    }

    Finding = {"kind": str, "severity": "info"|"warning"|"critical", "run": str,
               "layers": [str], "modality": str|null, "onset_step": int|null,
               "evidence": {...numbers...}, "explanation": str, "remedy": str}

Kinds: see :data:`KINDS`; `--fail-on collapse` matches :data:`COLLAPSE_KINDS`, `conflict`
matches :data:`CONFLICT_KINDS` (``expert_takeover``, which names the tokens behind a takeover
from the token-level snapshots, only ``any``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

SCHEMA = "moe_probe.diagnose/1"

KINDS: tuple[str, ...] = (
    "routing_collapse", "dead_experts", "modality_dominance", "load_imbalance",
    "gradient_domination", "gradient_conflict", "shared_regression", "expert_takeover",
)
COLLAPSE_KINDS = frozenset({"routing_collapse", "dead_experts", "modality_dominance",
                            "load_imbalance"})
CONFLICT_KINDS = frozenset({"gradient_domination", "gradient_conflict"})
SEVERITIES = ("info", "warning", "critical")
FAIL_ON = ("collapse", "conflict", "any")
"""The categories of ``--fail-on`` (diagnose and train)."""


def fails_on(finding: "Finding", fail_on: str | None) -> bool:
    """Whether ``--fail-on fail_on`` counts ``finding`` (its kind is in the category)."""
    if fail_on is None:
        return False
    kinds = {"collapse": COLLAPSE_KINDS, "conflict": CONFLICT_KINDS}.get(fail_on)
    return kinds is None or finding.kind in kinds

REMEDIES: dict[str, str] = {
    "routing_collapse": (
        "Give generation tokens their own experts: `moe-probe train --recipe symbiotic` "
        "(modality-aware expert groups, same parameter count); or raise capacity with "
        "`--set model.capacity_factor=1.5`, or balance with `--set model.bias_balance=true`."),
    "dead_experts": (
        "Re-balance the router: `--set model.bias_balance=true` (loss-free bias balancing) or a "
        "stronger balance loss `--set model.aux_weight=0.05`."),
    "modality_dominance": (
        "Separate the token kinds: `--recipe symbiotic` routes vae tokens only into the "
        "generation group, so they cannot take over understanding experts."),
    "load_imbalance": (
        "`--set model.bias_balance=true` or a higher `--set model.capacity_factor=1.5` so the "
        "busiest experts stop dropping tokens."),
    "gradient_domination": (
        "Shield shared parameters from generation gradients: `--set train.shielding=true` "
        "(with `train.shield_release=0.1`) and differential LR `--set train.differential_lr=true`; "
        "`--recipe symbiotic` applies both."),
    "gradient_conflict": (
        "Untie the conflicting parameters with `--recipe symbiotic` (modality-aware groups) and "
        "keep gradient shielding on (`--set train.shielding=true`)."),
    "shared_regression": (
        "Protect the shared experts: gradient shielding (`--set train.shielding=true`), a lower LR "
        "for what the base model knows (`--set train.lr_base=1e-4`, `train.differential_lr=true`); "
        "`--recipe symbiotic` applies both."),
    "expert_takeover": (
        "Keep generation tokens off the understanding experts: `--recipe symbiotic` routes vae "
        "tokens only into the generation group; the Experts page shows what each expert takes."),
}

REMEDIES_GROUPED: dict[str, str] = {
    # A run that already has modality-aware groups gains nothing from "use --recipe symbiotic".
    "routing_collapse": (
        "The expert groups are already separate: raise capacity with "
        "`--set model.capacity_factor=1.5`, balance inside the groups with "
        "`--set model.bias_balance=true`, or give the collapsing group more experts "
        "(`--set model.und_fraction=…`)."),
    "modality_dominance": (
        "Check the expert partition (`moe-probe info RUN`): tokens should only reach their own "
        "group; a larger group for the dominated kind (`--set model.und_fraction=…`) adds room."),
    "gradient_domination": (
        "Keep generation gradients off shared parameters: longer shielding "
        "(`--set train.shield_steps=…`), a smaller `train.shield_release`, and differential LR "
        "(`--set train.differential_lr=true`)."),
    "gradient_conflict": (
        "Keep gradient shielding on longer (`--set train.shield_steps=…`) or release less "
        "(`--set train.shield_release=0.05`); lower `train.lr_base` for the shared parameters."),
    "shared_regression": (
        "Protect the shared experts: longer or stronger shielding (`--set train.shield_steps=…`, "
        "`train.shield_release=0.05`) and a lower `--set train.lr_base=…` for what the base knows."),
    "expert_takeover": (
        "Check the expert partition (`moe-probe info RUN`): generation tokens should only reach "
        "the generation group; the Experts page shows what each expert takes."),
}
"""Remedies for runs whose layers already have und/gen groups (symbiotic, mot)."""


def remedy_for(kind: str, arch: str | None) -> str:
    if arch in ("symbiotic", "mot") and kind in REMEDIES_GROUPED:
        return REMEDIES_GROUPED[kind]
    return REMEDIES[kind]


def _clean(x):
    """JSON-safe numbers: numpy scalars to Python, NaN/inf to None (strict JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


@dataclass(frozen=True, kw_only=True)
class Finding:
    """One problem a detector saw in one run."""

    kind: str
    """One of :data:`KINDS`."""
    severity: str
    """`info`, `warning` or `critical`."""
    run: str
    """Run directory the finding belongs to."""
    layers: tuple[str, ...]
    """Layer labels involved (store `layer` coordinate)."""
    modality: str | None
    """Token kind involved, or None where the finding is about tasks (gradients, probes)."""
    onset_step: int | None
    """First optimizer step of the evidence (start of the first qualifying window)."""
    evidence: dict = field(default_factory=dict)
    """The numbers behind the verdict (JSON-able)."""
    explanation: str = ""
    """Plain-language account of what the numbers mean."""
    remedy: str = ""
    """What the toolkit can do about it."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown finding kind {self.kind!r}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}")
        object.__setattr__(self, "layers", tuple(str(x) for x in self.layers))
        object.__setattr__(self, "evidence", _clean(self.evidence))
        if self.onset_step is not None:
            object.__setattr__(self, "onset_step", int(self.onset_step))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Finding":
        return cls(**{**d, "layers": tuple(d.get("layers", ()))})


@dataclass(frozen=True, kw_only=True)
class CheckResult:
    """A detector's outcome on one run: findings, "ok", or why it could not measure."""

    kind: str
    findings: tuple[Finding, ...] = ()
    not_measured: str | None = None
    """Reason the data needed is absent (no grad rows, too few rows, ...); then no findings."""

    @property
    def status(self) -> str:
        if self.not_measured is not None:
            return f"not measured: {self.not_measured}"
        return "finding" if self.findings else "ok"


@dataclass(frozen=True, kw_only=True)
class RunDiagnosis:
    run_dir: str
    name: str
    recipe: str | None
    arch: str | None
    steps: dict
    last_step: int | None
    final_capacity_rate: dict
    checks: dict
    """kind -> status string (see :attr:`CheckResult.status`)."""
    findings: tuple[Finding, ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["findings"] = [f.to_dict() for f in self.findings]
        return _clean(d)

    @classmethod
    def from_dict(cls, d: dict) -> "RunDiagnosis":
        return cls(**{**d, "findings": tuple(Finding.from_dict(f) for f in d["findings"])})


@dataclass(frozen=True, kw_only=True)
class Report:
    runs: tuple[RunDiagnosis, ...]
    config: dict
    control: str | None = None

    @property
    def findings(self) -> tuple[Finding, ...]:
        return tuple(f for r in self.runs for f in r.findings)

    def matching(self, fail_on: str | None) -> list[Finding]:
        """Findings that `--fail-on fail_on` counts."""
        return [f for f in self.findings if fails_on(f, fail_on)]

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "config": _clean(self.config), "control": self.control,
                "runs": [r.to_dict() for r in self.runs],
                "findings": [f.to_dict() for f in self.findings]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not a diagnose report (schema {d.get('schema')!r}, want {SCHEMA!r})")
        return cls(runs=tuple(RunDiagnosis.from_dict(r) for r in d["runs"]),
                   config=d["config"], control=d.get("control"))
