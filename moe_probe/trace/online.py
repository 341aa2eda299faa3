"""Online findings in a training loop: the diagnose detectors every N steps, and what to do.

Rank 0's writer is a :class:`DiagnosedWriter`: every row it is handed also goes to an
:class:`~moe_probe.diagnose.online.OnlineDiagnosis` (in memory; the store is never read back).
After every ``every``-th closed step, :class:`FindingMonitor` runs the detectors on those rows —
the findings ``moe-probe diagnose`` reports on the store at that point — and acts on the new ones:

- ``"warn"``: a :class:`FindingWarning` per new finding (one line);
- ``"stop"``: training stops at the first check with a **critical** finding of the ``fail_on``
  category (``collapse`` | ``conflict`` | ``any``, as ``diagnose --fail-on``): ``should_stop``
  turns true and ``stopped`` holds a :class:`StopTraining` naming it (the loop breaks, or the
  next step raises it);
- a callable: called with each new :class:`~moe_probe.diagnose.findings.Finding`; a true return
  stops training as ``"stop"`` does.

Under torch.distributed rank 0 decides and every rank learns it (one broadcast per check), so all
ranks stop at the same step.
"""

from __future__ import annotations

import warnings

import torch.distributed as dist

from moe_probe.diagnose.findings import FAIL_ON, Finding, RunDiagnosis, fails_on
from moe_probe.diagnose.online import OnlineDiagnosis


class FindingWarning(UserWarning):
    """A finding of the online diagnosis (``on_finding="warn"``)."""


class StopTraining(Exception):
    """Training stopped by a finding: ``.finding`` (the Finding), ``.step`` (last step trained)."""

    def __init__(self, finding: Finding, step: int):
        self.finding, self.step = finding, step
        super().__init__(f"{describe(finding)}; stopped after step {step}")


def describe(f: Finding) -> str:
    """One line naming a finding: kind, severity, layers, modality (or component), onset."""
    what = f.modality or f.evidence.get("component")
    return (f"{f.severity} {f.kind} in layer(s) {', '.join(f.layers)}"
            + (f" ({what})" if what else "") + f" from step {f.onset_step}")


class DiagnosedWriter:
    """A run's writer that also hands every row it gets to an :class:`OnlineDiagnosis`."""

    def __init__(self, writer, online: OnlineDiagnosis):
        self._writer, self.online = writer, online

    def append(self, group: str, step: int, **arrays) -> None:
        self._writer.append(group, step, **arrays)  # checked (and refused) there first
        self.online.add(group, step, **arrays)

    def __getattr__(self, name):
        return getattr(self._writer, name)


def check_on_finding(on_finding, every, fail_on) -> None:
    """One-line ValueError for settings the monitor cannot run with."""
    if on_finding is not None and on_finding not in ("warn", "stop") and not callable(on_finding):
        raise ValueError(f"on_finding must be 'warn', 'stop' or a callable, got {on_finding!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"diagnose_every must be an integer >= 1, got {every!r}")
    if fail_on not in FAIL_ON:
        raise ValueError(f"fail_on must be one of {', '.join(FAIL_ON)}, got {fail_on!r}")


class FindingMonitor:
    """Runs the online diagnosis after every ``every``-th step and acts on its findings."""

    def __init__(self, online: OnlineDiagnosis | None, *, on_finding, every: int = 10,
                 fail_on: str = "collapse", distributed: bool = False):
        """``online``: rank 0's diagnosis (None on the other ranks, which follow rank 0)."""
        check_on_finding(on_finding, every, fail_on)
        self.online, self.on_finding, self.every, self.fail_on = online, on_finding, every, fail_on
        self.distributed = distributed
        self.diagnosis: RunDiagnosis | None = None
        """The latest check's diagnosis (rank 0): what ``moe-probe diagnose`` reports on the
        store's rows at that step."""
        self.stopped: StopTraining | None = None
        self._seen: set[tuple] = set()

    @property
    def should_stop(self) -> bool:
        return self.stopped is not None

    def after_step(self, step: int) -> bool:
        """Check when ``step`` closes a stretch of ``every`` steps; True when training must stop."""
        if self.stopped is not None or (step + 1) % self.every:
            return self.stopped is not None
        stop = None
        if self.online is not None:
            self.diagnosis = self.online.diagnose()
            for f in self.diagnosis.findings:
                if self._new(f) and self._act(f) and stop is None:
                    stop = f
            if stop is None and self.on_finding == "stop":
                stop = next((f for f in self.diagnosis.findings
                             if f.severity == "critical" and fails_on(f, self.fail_on)), None)
        if self.distributed:
            box = [None if stop is None else stop.to_dict()]
            dist.broadcast_object_list(box, src=0)
            stop = None if box[0] is None else Finding.from_dict(box[0])
        if stop is not None:
            self.stopped = StopTraining(stop, step)
        return stop is not None

    def _new(self, f: Finding) -> bool:
        key = (f.kind, f.severity, f.modality, f.layers, f.evidence.get("component"))
        new = key not in self._seen
        self._seen.add(key)
        return new

    def _act(self, f: Finding) -> bool:
        """Report a new finding; True when a callable asks to stop."""
        if self.on_finding == "warn":
            warnings.warn(f"moe_probe: {describe(f)}", FindingWarning, stacklevel=4)
        elif callable(self.on_finding):
            return bool(self.on_finding(f))
        return False


def monitored(writer, run_dir, *, on_finding, every: int = 10, fail_on: str = "collapse",
              distributed: bool = False):
    """``(writer, monitor)`` for a run: on rank 0 (``run_dir`` given) the writer feeds an online
    diagnosis holding the run's committed rows (a resumed run's are read once, here)."""
    online = None
    if run_dir is not None:
        online = OnlineDiagnosis.for_run(run_dir)
        writer = DiagnosedWriter(writer, online)
    return writer, FindingMonitor(online, on_finding=on_finding, every=every, fail_on=fail_on,
                                  distributed=distributed)
