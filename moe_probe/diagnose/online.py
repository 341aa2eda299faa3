"""Online findings: the diagnose detectors on a run's rows as training produces them.

:class:`OnlineDiagnosis` is fed every row a run's writer is handed (``add(group, step, **arrays)``,
the writer's own call) and keeps, in memory, only the arrays the detectors read (``NEEDED``),
cast to the store's dtypes. :meth:`OnlineDiagnosis.diagnose` hands those rows, as the xarray
Datasets :func:`~moe_probe.diagnose.rundata.load_run` builds, to the same
:func:`~moe_probe.diagnose.runner.diagnose_run` that ``moe-probe diagnose`` runs: its findings and
onsets are the ones ``diagnose`` reports on the store once those rows are committed, without
reading the store again.

Incremental: the ``routing`` rows are also folded, at each check, into rollup levels kept in
memory (:class:`_Levels`, the writer's own :class:`~moe_probe.store.rollup.GroupRollup`), and
the detectors screen with them as they do a store's (``diagnose/source.py``): a check reads rows
only where the levels cannot rule a stretch out, and the rows past the finest level's last
window (< 16), so its cost follows the levels (1/16 of the rows) and the candidates, not the
run's length times its width.

Memory: per routed step ``L·M·(E + 1)`` int32 + ``L·M`` float32 (``load``, ``tokens``,
``capacity_rate``), and the levels' windows (about 1/8 more: int64 sums per 16 rows); per grad step ``3·L'·C`` float32; per token-routing row ``N·(L·K + 5)``
small ints (the probe set's picks). The other groups keep their steps only.
Torch-free, like every reader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from moe_probe.diagnose.config import DiagnoseConfig
from moe_probe.diagnose.findings import RunDiagnosis
from moe_probe.diagnose.rundata import DIAGNOSED, NEEDED, SCREENED, RunData
from moe_probe.diagnose.runner import diagnose_run
from moe_probe.run import RunInfo
from moe_probe.store.layout import label_arrays
from moe_probe.store.rollup import GroupRollup, create_levels
from moe_probe.store.schema import GROUPS, LABEL_DIMS, ROLLUP_FACTORS, ROLLUP_STATS, rollup_arrays

class _Rows:
    """A growing ``(n, *row)`` array with amortised doubling (rows appended one at a time)."""

    def __init__(self, row_shape: tuple[int, ...], dtype):
        self._a = np.empty((16, *row_shape), dtype=dtype)
        self.n = 0

    def append(self, row) -> None:
        self._reserve(self.n + 1)
        self._a[self.n] = row
        self.n += 1

    def extend(self, rows: np.ndarray) -> None:
        self._reserve(self.n + len(rows))
        self._a[self.n:self.n + len(rows)] = rows
        self.n += len(rows)

    def _reserve(self, n: int) -> None:
        if n > len(self._a):
            grown = np.empty((max(n, 2 * len(self._a)), *self._a.shape[1:]), dtype=self._a.dtype)
            grown[:self.n] = self._a[:self.n]
            self._a = grown

    def view(self) -> np.ndarray:
        return self._a[:self.n]


class _Levels:
    """One group's rollup levels in memory: rows folded in by a :class:`GroupRollup` laid out on
    an empty in-memory zarr group (it gives the levels' arrays and dtypes; nothing is written
    there), its finished windows taken into growing arrays."""

    def __init__(self, group: str, attrs: dict, labels: dict[str, list[str]], present):
        root = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
        label_arrays(root.require_group(group), labels)  # the rollup reads its groups' labels
        create_levels(root, group, labels, list(present))
        self.rollup = GroupRollup(root, group, attrs)
        self.labels = labels
        specs = rollup_arrays(group)
        sizes = {**{d: len(v) for d, v in labels.items()}, "stat": len(ROLLUP_STATS)}
        names = list(self.rollup.levels[0].arrays)
        self.dims = {n: ("step",) if n == "step" else ("step", *specs[n].dims) for n in names}
        self.windows = [{n: _Rows(tuple(sizes[d] for d in self.dims[n][1:]),
                                  self.rollup.levels[0].arrays[n].dtype) for n in names}
                        for _ in ROLLUP_FACTORS]
        self.folded = 0
        """Rows folded in so far."""

    def fold(self, steps: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        """Rows [folded, len(steps)) in; the levels' finished windows kept."""
        if len(steps) > self.folded:
            self.rollup.add(steps[self.folded:],
                            {n: arrays[n][self.folded:] for n in self.rollup.names})
            self.folded = len(steps)
            for kept, win in zip(self.windows, self.rollup.take()):
                for n, rows in kept.items():
                    if n in win:
                        rows.extend(win[n])

    def datasets(self) -> dict[int, xr.Dataset]:
        """{factor: level} as ``RunStore.dataset(group, level=f)`` gives a store's."""
        out = {}
        for f, kept in zip(ROLLUP_FACTORS, self.windows):
            coords = {"step": kept["step"].view(), **self.labels, "stat": list(ROLLUP_STATS)}
            out[f] = xr.Dataset({n: (self.dims[n], rows.view()) for n, rows in kept.items()
                                 if n != "step"}, coords=coords)
        return out


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
        self._levels = {g: _Levels(g, self.attrs, self._labels[g], NEEDED[g])
                        for g in SCREENED if g in self._labels}

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
        groups, levels = {}, {}
        for g, steps in self._steps.items():
            if not steps.n:
                continue
            coords = {"step": steps.view(), **self._labels[g]}
            arrays = {n: rows.view() for n, rows in self._arrays[g].items()}
            groups[g] = xr.Dataset({n: (("step", *GROUPS[g][n].dims), a) for n, a in arrays.items()},
                                   coords=coords)
            if g in self._levels:
                self._levels[g].fold(steps.view(), arrays)
                levels[g] = self._levels[g].datasets()
        name = RunInfo.from_attrs(self.attrs, path=Path(self.run_dir)).name
        return RunData(name=name, run_dir=self.run_dir, attrs=self.attrs, groups=groups,
                       levels=levels)

    def diagnose(self) -> RunDiagnosis:
        """Every detector on the rows so far (as ``moe-probe diagnose`` on the committed store)."""
        return diagnose_run(self.run_data(), self.cfg)
