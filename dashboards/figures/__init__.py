"""Figure builders of the pages: data path + plotly figures, no Dash (benchmarks call them)."""

from __future__ import annotations

import functools
import threading
from concurrent.futures import Future

from dashboards import data

_figs = data._LRU(64, 1 << 60)
_building: dict = {}  # key → Future of a figure being built now
_building_lock = threading.Lock()


def _freeze(v):
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


def memo(fn):
    """Reuse a built figure while the runs it shows have no new committed rows.

    Building a plotly figure (validation of every property) costs more than the cached slice
    it shows; refresh ticks, page revisits and several browser tabs ask for the same figure.
    A figure being built is built once: a second caller (a page's callback while the server
    warms the same view, see dashboards/app.py) waits for the first one's result. A failed
    build is not shared: each waiter then asks again, and one of them builds."""

    @functools.wraps(fn)
    def wrapper(root, runs, *args, **kwargs):
        ids = list(runs) if isinstance(runs, (list, tuple)) else [runs]
        try:
            version = tuple((r, _freeze(data.committed(root, r))) for r in ids)
        except data.DataError:
            return fn(root, runs, *args, **kwargs)  # let the builder report it
        key = (fn.__module__, fn.__name__, str(root), version, _freeze(args), _freeze(kwargs))
        fig = _figs.get(key)
        if fig is not None:
            return fig
        with _building_lock:
            fig = _figs.get(key)  # again: a build may have ended since
            if fig is not None:
                return fig
            fut, mine = _building.get(key), False
            if fut is None:
                fut = _building[key] = Future()
                mine = True
        if not mine:
            try:
                return fut.result()
            except BaseException:  # noqa: BLE001 - not shared: ask again (and build, report)
                return wrapper(root, runs, *args, **kwargs)
        try:
            fig = fn(root, runs, *args, **kwargs)
            _figs.put(key, fig)
            fut.set_result(fig)
            return fig
        except BaseException as e:
            fut.set_exception(e)
            raise
        finally:
            with _building_lock:
                _building.pop(key, None)

    return wrapper
