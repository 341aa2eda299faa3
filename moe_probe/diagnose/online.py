"""Online findings: the diagnose detectors on a run's rows as training produces them.

:class:`OnlineDiagnosis` is fed every row a run's writer is handed (``add(group, step, **arrays)``,
the writer's own call) and keeps, in memory, only the arrays the detectors read (``NEEDED``),
cast to the store's dtypes. :meth:`OnlineDiagnosis.diagnose` hands those rows, as the xarray
Datasets :func:`~moe_probe.diagnose.rundata.load_run` builds, to the same
:func:`~moe_probe.diagnose.runner.diagnose_run` that ``moe-probe diagnose`` runs: its findings and
onsets are the ones ``diagnose`` reports on the store once those rows are committed, without
reading the store again.

Memory: per routed step ``L·M·(E + 1)`` int32 + ``L·M`` float32 (``load``, ``tokens``,
``capacity_rate``); per grad step ``3·L'·C`` float32; per token-routing row ``N·(L·K + 5)``
small ints (the probe set's picks). The other groups keep their steps only.
Torch-free, like every reader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from moe_probe.diagnose.config import DiagnoseConfig
from moe_probe.diagnose.findings import RunDiagnosis
from moe_probe.diagnose.rundata import DIAGNOSED, NEEDED, RunData
from moe_probe.diagnose.runner import diagnose_run
from moe_probe.run import RunInfo
from moe_probe.store.schema import GROUPS, LABEL_DIMS

class _Rows:
    """A growing ``(n, *row)`` array with amortised doubling (rows appended one at a time)."""

    def __init__(self, row_shape: tuple[int, ...], dtype):
        self._a = np.empty((16, *row_shape), dtype=dtype)
        self.n = 0

    def append(self, row) -> None:
        if self.n == len(self._a):
            grown = np.empty((2 * len(self._a), *self._a.shape[1:]), dtype=self._a.dtype)
            grown[:self.n] = self._a[:self.n]
            self._a = grown
        self._a[self.n] = row
        self.n += 1

    def view(self) -> np.ndarray:
        return self._a[:self.n]


class OnlineDiagnosis:
    """Rows in, findings out; see the module docstring."""

    def __init__(self, *, attrs: dict, labels: dict[str, dict[str, list[str]]], run_dir: str,
                 cfg: DiagnoseConfig | None = None):
        """``attrs``: the store's root attrs; ``labels``: group -> {dim: labels} of the store's
        groups (rows of other groups are ignored); ``run_dir``: as the report names the run."""
        self.cfg = cfg or DiagnoseConfig()
        self.attrs, self.run_dir = dict(attrs), str(run_dir)
        self._labels = {g: {d: [str(x) for x in v] for d, v in dims.items()}
                        for g, dims in labels.items() if g in DIAGNOSED}
        self._steps = {g: _Rows((), np.int64) for g in self._labels}
        self._arrays: dict[str, dict[str, _Rows]] = {}
        for g, dims in self._labels.items():
            self._arrays[g] = {
                name: _Rows(tuple(len(dims[d]) for d in GROUPS[g][name].dims), GROUPS[g][name].dtype)
                for name in NEEDED.get(g, ())}

    @classmethod
    def for_run(cls, run_dir, cfg: DiagnoseConfig | None = None) -> OnlineDiagnosis:
        """For the run at ``run_dir`` (its store's attrs and labels), holding the rows it has
        committed already (a resumed run): read once here, never again."""
        from moe_probe.diagnose.rundata import load_run
        from moe_probe.run import Run

        store = Run(run_dir).store()
        labels = {g: {d: store.labels(g, d) for d in LABEL_DIMS[g]}
                  for g in store.groups if g in DIAGNOSED}
        run = load_run(run_dir)
        online = cls(attrs=run.attrs, labels=labels, run_dir=str(run_dir), cfg=cfg)
        for g in run.extent():
            ds = run.get(g)
            arrays = {n: ds[n].transpose("step", *GROUPS[g][n].dims).values
                      for n in NEEDED.get(g, ()) if n in ds}
            for i, step in enumerate(ds["step"].values):
                online.add(g, int(step), **{n: a[i] for n, a in arrays.items()})
        return online

    def add(self, group: str, step: int, **arrays) -> None:
        """One row of ``group`` (the arrays a writer's ``append`` gets; extra ones ignored)."""
        if group not in self._steps:
            return
        for name, rows in self._arrays[group].items():
            rows.append(np.asarray(arrays[name]).astype(rows.view().dtype))
        self._steps[group].append(int(step))

    def run_data(self) -> RunData:
        """The rows so far as :func:`~moe_probe.diagnose.rundata.load_run` gives a store's."""
        groups = {}
        for g, steps in self._steps.items():
            if not steps.n:
                continue
            coords = {"step": steps.view(), **self._labels[g]}
            groups[g] = xr.Dataset(
                {n: (("step", *GROUPS[g][n].dims), rows.view()) for n, rows in self._arrays[g].items()},
                coords=coords)
        name = RunInfo.from_attrs(self.attrs, path=Path(self.run_dir)).name
        return RunData(name=name, run_dir=self.run_dir, attrs=self.attrs, groups=groups)

    def diagnose(self) -> RunDiagnosis:
        """Every detector on the rows so far (as ``moe-probe diagnose`` on the committed store)."""
        return diagnose_run(self.run_data(), self.cfg)
