"""What ``RUN_DIR/traces.zarr`` holds: groups, arrays, dims, dtypes, chunking (ARCHITECTURE.md, "Store").

Pure python + numpy: the writer, the reader and the fixtures share this table, and nothing else
defines the layout. Every array has ``step`` as its first dim (rows grow with training); the other
dims are labelled by a per-group coordinate array of strings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec

from moe_probe.modalities import GRAD_COMPONENTS, LOSS_TERMS, MODALITIES, TASKS

__all__ = [
    "SCHEMA_VERSION", "GROUPS", "CORE_GROUPS", "EXTRA_GROUPS", "LABEL_DIMS", "CHUNK_STEPS",
    "ArraySpec", "StoreError", "NotMeasured", "default_coords", "chunk_shape", "row_shape",
    "parse_version", "migrate_attrs", "required", "optional", "ROLLUP_ROOT", "ROLLUP_FACTORS",
    "ROLLUP_GROUPS", "ROLLUP_STATS", "ROLLUP_CHUNKS", "ROLLUP_CHUNK_BYTES", "COUNTS", "rollup_path", "rollup_arrays",
    "rollup_chunks", "level_compressors", "ROLLUP_FINEST_LAYERS",
]

SCHEMA_VERSION = "1.2"
"""``major.minor``. A minor version only adds (optional arrays, extra groups, attrs): any reader of
the same major opens it and ignores what it does not know. A new major may remove or change
meaning; readers refuse majors newer than their own and migrate older ones on read
(:func:`migrate_attrs`).

History:
- 1.0 (stored as the integer ``1``): the closed schema of moe_probe 0.1.
- 1.1: ``schema_version`` is a ``"major.minor"`` string; arrays are required or optional; the
  optional ``routing/load_cv``; the extra group ``grad_expert`` written through the writer (1.0
  scans wrote it by hand, unchunked and without checksums, which 1.1 readers still read);
  ``run.package_version`` (1.0 training runs wrote ``run.version``).
- 1.2: rollups (:func:`rollup_path`): coarser levels of the step-sampled groups, optional; a store
  without them (or with levels behind its rows) reads as before, from the rows. The extra group
  ``token_routing`` (per-token top-k of the probe set at snapshot steps, with the root attr
  ``token_routing`` naming its labels; stores without it are read as "not measured")."""


class StoreError(ValueError):
    """A store cannot be used as asked (missing, foreign, other schema version, corrupt): one line."""


class NotMeasured(StoreError):
    """A declared optional array (or extra group) this run did not record: "not measured"."""


@dataclass(frozen=True)
class ArraySpec:
    dims: tuple[str, ...]
    """Dims after ``step``."""
    dtype: str
    required: bool = True
    """Every store of the group has it. An optional array may be absent (a store written before
    it existed, or a run that does not measure it); readers then say "not measured"."""


_F, _I = "float32", "int32"
# Counts are int32 (a per-step count never nears 2**31; halves the 50k-step `load` on disk), except
# `kept`: a dropless layer's nominal kept is shared among modalities in proportion to their load,
# so it is fractional. Metrics are float32: they are plotted, never summed over millions of rows.
GROUPS: dict[str, dict[str, ArraySpec]] = {
    "routing": {
        "tokens": ArraySpec(("layer", "modality"), _I),
        "kept": ArraySpec(("layer", "modality"), _F),
        "capacity_rate": ArraySpec(("layer", "modality"), _F),
        "entropy": ArraySpec(("layer", "modality"), _F),
        "maxvio": ArraySpec(("layer", "modality"), _F),
        "dead_frac": ArraySpec(("layer", "modality"), _F),
        "confidence": ArraySpec(("layer", "modality"), _F),
        "load": ArraySpec(("layer", "modality", "expert"), _I),
        "router_z": ArraySpec(("layer",), _F),
        "load_cv": ArraySpec(("layer", "modality"), _F, required=False),
    },
    "loss": {"value": ArraySpec(("term",), _F)},
    "grad": {
        "cosine": ArraySpec(("layer", "component"), _F),
        "norm_und": ArraySpec(("layer", "component"), _F),
        "norm_gen": ArraySpec(("layer", "component"), _F),
    },
    "probe": {
        "accuracy": ArraySpec(("layer", "task"), _F),
        "control_accuracy": ArraySpec(("layer", "task"), _F),
        "selectivity": ArraySpec(("layer", "task"), _F),
        "isolated": ArraySpec(("metric",), _F),
    },
    "eval": {"value": ArraySpec(("metric",), _F)},
    "snapshot": {
        "saturation": ArraySpec(("layer",), _F),
        "coactivation": ArraySpec(("layer", "expert", "expert2"), _F),
    },
    # Extra groups (EXTRA_GROUPS): declared here so they get the same codecs, checksums and commit
    # marker, but written only by the runs that measure them.
    "grad_expert": {
        "cosine": ArraySpec(("layer", "expert"), _F),
        "norm_und": ArraySpec(("layer", "expert"), _F),
        "norm_gen": ArraySpec(("layer", "expert"), _F),
    },
    # Per token of the fixed probe set, at snapshot steps. The token columns repeat every row
    # (the probe set is fixed; repeated rows cost nothing after zstd) so a row reads alone.
    "token_routing": {
        "token_id": ArraySpec(("token",), "int32"),
        "kind": ArraySpec(("token",), "int8"),
        "label": ArraySpec(("token",), "int16"),
        "patch": ArraySpec(("token",), "int16"),
        "image": ArraySpec(("token",), "int16"),
        "topk_ids": ArraySpec(("layer", "token", "k"), "int16"),
        "topk_gates": ArraySpec(("layer", "token", "k"), "float16", required=False),
    },
}

EXTRA_GROUPS: tuple[str, ...] = ("grad_expert", "token_routing")
"""Declared groups outside the core set: per-expert gradient conflict (HF scans with two text
sets); token-level routing of the probe set (``token_routing``: ``token_id`` the text id or -1,
``kind`` the index into root attrs ``modalities``, ``label`` the index into the concatenated label
sets of root attrs ``token_routing.labels`` or -1, ``patch`` the patch index in its image
(row-major over the patch grid) or -1, ``image`` the sklearn digits index of its image or -1;
``topk_ids`` the picks in the router's order and ``topk_gates`` their gate weights)."""

CORE_GROUPS: tuple[str, ...] = tuple(g for g in GROUPS if g not in EXTRA_GROUPS)
"""The groups of ARCHITECTURE.md's store, in their usual order."""


def required(group: str) -> list[str]:
    return [n for n, spec in GROUPS[group].items() if spec.required]


def optional(group: str) -> list[str]:
    return [n for n, spec in GROUPS[group].items() if not spec.required]


def parse_version(v) -> tuple[int, int]:
    """``(major, minor)`` of a root ``schema_version``: ``"1.1"``, or 1.0's integer ``1``."""
    if isinstance(v, bool):
        raise StoreError(f"schema_version {v!r} is not a version")
    if isinstance(v, int):
        return v, 0
    if isinstance(v, str):
        major, _, minor = v.partition(".")
        if major.isdigit() and (minor.isdigit() or minor == ""):
            return int(major), int(minor or 0)
    raise StoreError(f"schema_version {v!r} is not a version (expected 'major.minor')")


def migrate_attrs(attrs: dict) -> dict:
    """Root attrs of an older store in the current shape (a copy; the store is not changed).

    1.0 -> 1.1: ``schema_version`` 1 -> "1.0" (kept: it says what was written); ``run.version``
    -> ``run.package_version``. Arrays need no migration: 1.0's arrays are all still declared
    with the same dims and dtypes, and the arrays 1.1 added are optional."""
    out = dict(attrs)
    major, minor = parse_version(out.get("schema_version"))
    out["schema_version"] = f"{major}.{minor}"
    run = out.get("run")
    if isinstance(run, dict) and "version" in run and "package_version" not in run:
        run = dict(run)
        run["package_version"] = run.pop("version")
        out["run"] = run
    return out

LABEL_DIMS: dict[str, tuple[str, ...]] = {
    g: tuple(dict.fromkeys(d for spec in arrays.values() for d in spec.dims))
    for g, arrays in GROUPS.items()
}
"""Labelled dims of each group, each stored as a string coordinate array in that group."""

CHUNK_STEPS: dict[str, int] = {
    "routing": 512, "loss": 1024, "grad": 256, "probe": 64, "eval": 64, "snapshot": 16,
    "grad_expert": 256, "token_routing": 8,
}
"""Rows per chunk. Sized so a chunk spans a similar stretch of training whatever a group's rate
(routing every step, grad every 10, probe/eval/snapshot every 50): a dashboard reading 50k steps of
one series opens ~100 chunks per array, while the writer, which rewrites only the tail chunk on
each append, rewrites at most ~200 KB per array of a 32-layer × 64-expert run."""

# Arrays with an expert dim are chunked one layer at a time: the dashboard's heavy read is one
# layer's (step, modality, expert) history, which then touches 1/L of the bytes; per-step reads of
# all layers (a heat map at one step) stay cheap because a step-chunk of one layer is small.
_PER_LAYER = {"load", "coactivation", "topk_ids", "topk_gates"}


def chunk_shape(group: str, name: str, sizes: dict[str, int], chunk_steps: int) -> tuple[int, ...]:
    spec = GROUPS[group][name]
    tail = []
    for d in spec.dims:
        n = max(1, sizes[d])
        tail.append(1 if (d == "layer" and name in _PER_LAYER) else n)
    return (chunk_steps, *tail)


def row_shape(group: str, name: str, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(sizes[d] for d in GROUPS[group][name].dims)


def default_coords(
    *,
    layers: list[str],
    n_experts: int,
    eval_metrics: list[str] | None = None,
    isolated_metrics: list[str] | None = None,
    tasks: list[str] | None = None,
    groups: tuple[str, ...] = CORE_GROUPS,
) -> dict[str, dict[str, list[str]]]:
    """The usual ``coords`` for :meth:`StoreWriter.create`: expert labels "0".."E-1", grad layers
    = model layers + "all", loss terms/modalities/components from :mod:`moe_probe.modalities`.
    ``probe`` is left out when ``isolated_metrics`` is None (a model without shared experts)."""
    experts = [str(e) for e in range(n_experts)]
    layers = [str(x) for x in layers]
    out: dict[str, dict[str, list[str]]] = {
        "routing": {"layer": layers, "modality": list(MODALITIES), "expert": experts},
        "loss": {"term": list(LOSS_TERMS)},
        "grad": {"layer": layers + ["all"], "component": list(GRAD_COMPONENTS)},
        "eval": {"metric": list(eval_metrics or [])},
        "snapshot": {"layer": layers, "expert": experts, "expert2": experts},
        "grad_expert": {"layer": layers, "expert": experts},
    }
    if isolated_metrics is not None:
        out["probe"] = {"layer": layers, "task": list(tasks or TASKS),
                        "metric": list(isolated_metrics)}
    return {g: c for g, c in out.items() if g in groups}


def fill_value(dtype: str):
    return np.nan if np.dtype(dtype).kind == "f" else 0


# ---------------------------------------------------------------- rollups (schema 1.2)
ROLLUP_ROOT = "rollup"
"""Root group of the rollup levels: ``traces.zarr/rollup/<group>/x<factor>``."""
ROLLUP_FACTORS: tuple[int, ...] = (16, 256, 4096)
"""Rows of the group per window, finest first. Windows count rows (like the detectors' windows),
not optimizer steps, and each level's windows are whole windows of the finer one."""
ROLLUP_GROUPS: tuple[str, ...] = ("routing", "loss", "grad", "grad_expert")
"""Groups with rollups: the long ones (probe/eval/snapshot rows are ~1/50 of the steps)."""
ROLLUP_STATS: tuple[str, ...] = ("min", "max", "mean", "count", "positive")
"""The ``stat`` labels of a rate's window: NaN-skipping min, max and mean, the count of non-NaN
rows (the weights that make a coarser level's mean exact from a finer one's), and the count of
rows above 0 (bounds how many rows can pass a threshold >= 0: the dead-experts detector's)."""
COUNTS: frozenset[str] = frozenset({"tokens", "load", "kept"})
"""Arrays that hold counts: their windows hold sums (int64; ``kept`` float64)."""
ROLLUP_CHUNKS: dict[int, int] = {16: 256, 256: 64, 4096: 16}
"""Windows per chunk of each level: 4096, 16384, 65536 rows. The writer writes a level a whole
chunk at a time as chunks fill, and on close the finest level's last windows too; a coarser level
then lags its rows by less than a chunk (readers take those steps from the finer level), so a
level costs one write per chunk of rows, and a writer holds less than a chunk of each level in
memory."""
ROLLUP_CHUNK_BYTES = 1 << 20
"""Most bytes in a chunk of the finest level's widest array when its chunks grow past 256
windows (a narrow store: see ``rollup._finest_windows``), counting one layer of an array chunked
by layer (the finest level's ``load`` chunks hold :data:`ROLLUP_FINEST_LAYERS` layers, so up to
4x this)."""


def compressors() -> tuple:
    """The codecs of the rows' data arrays and of every ``step`` coordinate (rollup levels' data:
    :func:`level_compressors`). Byte-shuffled blosc-zstd: counts and
    float metrics shrink ~40% more than with plain zstd and decode faster
    (benchmarks/bench_writer.py); crc32c makes a damaged chunk an error rather than silently
    wrong numbers. Both are core zarr v3 codecs."""
    return (BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec())


def level_compressors() -> tuple:
    """The codecs of the rollup levels' data arrays (their ``step`` stays :func:`compressors`'):
    byte-shuffled blosc-lz4 and crc32c. The writer
    encodes the finest level's chunks while training, and zstd spends ~10x lz4's time on them (a
    rate array's 256-window chunk of a 32-layer × 64-expert store: ~3 ms against ~0.2 ms) for
    6-40% fewer bytes on data that is 1/16 of the rows' or less (the benchmark's whole 32 × 64
    store: 3.5% more bytes); lz4 also decodes ~3x faster for the readers that use levels
    (benchmarks/bench_writer.py)."""
    return (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec())


ROLLUP_FINEST_LAYERS = 4
"""Layers per chunk of the finest level's ``load`` (the level arrays chunked by layer; coarser
levels: one, as the rows). That level is written every few thousand rows while training, and zarr's work per chunk
(~0.7 ms) outweighs its bytes: 32 one-layer ``load`` chunks cost a 32-layer × 64-expert store's
writer 2.7x the time of 8 four-layer ones, while a reader of one layer's windows decodes 4x
the bytes only in a zoom of up to a few thousand windows (benchmarks/bench_writer.py)."""


def rollup_chunks(windows: int, name: str, dims: tuple[str, ...],
                  sizes: dict[str, int], layers: int = 1) -> tuple[int, ...]:
    """Chunk shape of a level's array: ``windows`` (:data:`ROLLUP_CHUNKS`), and, like the rows,
    ``layers`` layers at a time for ``load`` (a reader of one layer's window sums decodes the
    bytes of ``layers`` layers: one for the coarser levels, :data:`ROLLUP_FINEST_LAYERS` for the
    finest)."""
    return (windows, *(min(layers, max(1, sizes[d])) if d == "layer" and name in _PER_LAYER
                       else max(1, sizes[d]) for d in dims))


def rollup_path(group: str, factor: int) -> str:
    """The zarr group path of one level, relative to the store root (plain xarray:
    ``xr.open_zarr(store, group=rollup_path("routing", 256), consolidated=False)``)."""
    return f"{ROLLUP_ROOT}/{group}/x{int(factor)}"


def rollup_arrays(group: str) -> dict[str, ArraySpec]:
    """The arrays of a level of ``group``, each with ``step`` (the window's first step) first.

    Counts: the window's sum, same dims. Rates: dims ``(stat, *dims)`` (:data:`ROLLUP_STATS`),
    float32 like the rows, except ``group_dead_frac`` (float64: its values are the detector's).
    Also ``step_last`` (the window's last step) and, for ``routing``: ``window_capacity_rate`` =
    kept / (k · tokens) over the window (needs ``model.top_k``), and ``group_dead_frac`` (stats of
    the per-row fraction of the experts of the group a modality routes into that get under 1% of
    the uniform share of the group's assignments, pooled over every kind routed there: the
    dead-experts detector's own row series, :func:`moe_probe.metrics.pooled_dead`)."""
    out = {"step_last": ArraySpec((), "int64")}
    for name, spec in GROUPS[group].items():
        if name in COUNTS:
            out[name] = ArraySpec(spec.dims, "float64" if spec.dtype == _F else "int64",
                                  spec.required)
        else:  # float32 like the rows (min/max exact; counts exact below 2**24 rows)
            out[name] = ArraySpec(("stat", *spec.dims), _F, spec.required)
    if group == "routing":
        out["window_capacity_rate"] = ArraySpec(("layer", "modality"), "float64", False)
        out["group_dead_frac"] = ArraySpec(("stat", "layer", "modality"), "float64", False)
    return out
