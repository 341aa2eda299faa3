"""Figure builders of the pages: data path + plotly figures, no Dash (benchmarks call them)."""

from __future__ import annotations

import functools

from dashboards import data

_figs = data._LRU(64, 1 << 60)


def _freeze(v):
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


def memo(fn):
    """Reuse a built figure while the runs it shows have no new committed rows.

    Building a plotly figure (validation of every property) costs more than the cached slice
    it shows; refresh ticks, page revisits and several browser tabs ask for the same figure."""

    @functools.wraps(fn)
    def wrapper(root, runs, *args, **kwargs):
        ids = list(runs) if isinstance(runs, (list, tuple)) else [runs]
        try:
            version = tuple((r, _freeze(data.committed(root, r))) for r in ids)
        except data.DataError:
            return fn(root, runs, *args, **kwargs)  # let the builder report it
        key = (fn.__module__, fn.__name__, str(root), version, _freeze(args), _freeze(kwargs))
        fig = _figs.get(key)
        if fig is None:
            fig = fn(root, runs, *args, **kwargs)
            _figs.put(key, fig)
        return fig

    return wrapper
