"""Laying a store out on disk: a group's arrays, their labels and ``step``, and the root attrs.

The writer lays out the row groups (:func:`create_group`), :mod:`moe_probe.store.rollup` the
levels; both write their label arrays and their ``step`` array here, so the two layouts stay
alike (plain xarray reads a level as it reads rows).
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import numpy as np
import zarr

from moe_probe._version import __version__
from moe_probe.modalities import MODALITIES
from moe_probe.store.schema import (
    GROUPS, LABEL_DIMS, SCHEMA_VERSION, chunk_shape, compressors, fill_value, row_shape,
)

__all__ = ["create_group", "label_arrays", "step_array", "root_attrs", "jsonable"]


def label_arrays(grp: zarr.Group, labels: dict[str, list], *, overwrite: bool = False) -> None:
    """One string array per dim, holding its labels."""
    for d, vals in labels.items():
        vals = np.array(vals, dtype=str)
        c = grp.create_array(d, shape=(vals.size,), dtype=str, dimension_names=(d,),
                             overwrite=overwrite)
        if vals.size:
            c[:] = vals


def step_array(grp: zarr.Group, chunk: int, *, overwrite: bool = False) -> None:
    """The empty ``step`` coordinate (-1 past what is written), ``chunk`` rows per chunk."""
    grp.create_array("step", shape=(0,), dtype="int64", chunks=(chunk,), fill_value=-1,
                     dimension_names=("step",), compressors=compressors(), overwrite=overwrite)


def create_group(root: zarr.Group, g: str, labels: dict, chunk_steps: int) -> None:
    """Row group ``g``: labels, every array of the schema (0 rows), ``step``, marker 0."""
    grp = root.create_group(g)
    sizes = {d: len(labels[d]) for d in LABEL_DIMS[g]}
    label_arrays(grp, {d: labels[d] for d in LABEL_DIMS[g]})
    for name, spec in GROUPS[g].items():
        grp.create_array(
            name, shape=(0, *row_shape(g, name, sizes)), dtype=spec.dtype,
            chunks=chunk_shape(g, name, sizes, chunk_steps), fill_value=fill_value(spec.dtype),
            dimension_names=("step", *spec.dims), compressors=compressors(),
        )
    step_array(grp, chunk_steps)
    grp.attrs["committed_steps"] = 0


def root_attrs(attrs: dict) -> dict:
    """Root attrs as written: the caller's, plus schema version, modalities and run provenance."""
    out = jsonable(dict(attrs))
    out["schema_version"] = SCHEMA_VERSION
    out.setdefault("modalities", list(MODALITIES))
    out.setdefault("run", {})
    if isinstance(out["run"], dict):
        out["run"].setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat())
        out["run"].setdefault("package_version", __version__)
    return out


def jsonable(obj):
    """Round-trip through JSON so numpy scalars / tuples / paths in attrs fail or convert now."""
    return json.loads(json.dumps(obj, default=_default))


def _default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (Path, _dt.datetime)):
        return str(o)
    raise TypeError(f"attribute value of type {type(o).__name__} is not JSON-serialisable")
