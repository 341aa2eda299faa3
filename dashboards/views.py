"""The view registry: every figure a page shows, registered once, beside its page's layout.

A view is a figure builder of `dashboards/figures` with the names of its arguments. A page
registers itself and its views (`pages_common.register_page` → `add_page`), together with
`values`: the builders' arguments by name for a selection (the shell's `sel` store), as the page
shows them when nothing on it was changed yet. Everything that makes views fast goes through
here:

- figures are cached (dashboards/cache.py), versioned by the committed rows of the runs they
  show, and a view asked for twice at once is built once;
- `warm` builds a page's `warm` views in the background, at start-up and when a browser asks
  for the page (app.py), with the same arguments, by name, as the page's callbacks then pass;
- a page's `first_screen` views are built with its layout (pages_common.first_screen).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Callable

from dashboards import data
from dashboards.cache import Cache

_figures = Cache("figures", entries=96)
_RUN_ARGS = ("run_id", "run_ids", "control_id")
"""Arguments naming the runs a view shows: their committed rows are the figure's version."""


def _freeze(v):
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


@dataclass(frozen=True, kw_only=True)
class View:
    """One figure of a page."""
    id: str
    """The id of the graph that shows it (unique over the app)."""
    build: Callable
    """Figure builder, called as build(root=ROOT, **{name: values[name] for name in args})."""
    args: tuple[str, ...]
    """Names of the builder's arguments besides `root`, looked up in the page's values."""
    title: str
    """Title of the message figure shown instead when it cannot be built."""
    first_screen: bool = False
    """In the page's first screen (1400×1000 window): built with the page's layout."""
    warm: bool = False
    """Built in the background at start-up and whenever a browser asks for its page."""

    def __post_init__(self):
        try:  # names that do not fit the builder fail at import, not on a user's click
            inspect.signature(self.build).bind(root=None, **dict.fromkeys(self.args))
        except TypeError as e:
            raise ValueError(f"view {self.id}: arguments {self.args} do not fit "
                             f"{self.build.__name__}: {e}") from None

    def figure(self, root, values: dict):
        """The figure for the page's `values` (a dict holding at least `args`), cached while the
        runs it shows commit no new rows."""
        kw = {a: values[a] for a in self.args}
        runs = []
        for a in _RUN_ARGS:
            if a in kw:
                runs += list(kw[a]) if isinstance(kw[a], (list, tuple)) else [kw[a]]
        try:
            version = tuple((r, _freeze(data.committed(root, r))) for r in runs if r)
        except data.DataError:
            return self.build(root=root, **kw)  # the builder reports it (not cached)
        return _figures.get((self.id, str(root), _freeze(kw)), version,
                            lambda: self.build(root=root, **kw))


@dataclass(frozen=True, kw_only=True)
class Page:
    """A page of the app and its views."""
    path: str
    """Its URL path (also Dash's page path)."""
    name: str
    """Its name in the navigation bar."""
    values: Callable[[str, dict | None], dict]
    """values(ROOT, sel) → the views' arguments by name for the selection, no zoom, default
    controls; raises DataError when there is nothing to show (no run selected...)."""
    views: tuple[View, ...]
    """Its views, in the order they are warmed."""


PAGES: dict[str, Page] = {}
"""Registered pages by path."""
VIEWS: dict[str, View] = {}
"""Registered views by id."""


def add_page(page: Page) -> None:
    for v in page.views:
        assert VIEWS.get(v.id, v) is v, f"view id {v.id} registered twice"
        VIEWS[v.id] = v
    PAGES[page.path] = page


def warm(root, path: str, sel: dict | None) -> tuple[str, float] | None:
    """Build the `warm` views of the page at `path` for the selection `sel`, as its callbacks
    would; (what was warmed, seconds) or None if the page has none. Errors are raised (the
    caller, a background warmer, decides what to say)."""
    page = PAGES.get(path)
    todo = [v for v in page.views if v.warm] if page else []
    if not todo:
        return None
    t0 = time.perf_counter()
    values = page.values(str(root), sel)
    for v in todo:
        v.figure(str(root), values)
    return f"{page.name} views of {values.get('run_id') or values.get('run_ids')}", \
        time.perf_counter() - t0


def warm_paths() -> list[str]:
    """Paths of the pages with views to warm."""
    return [p.path for p in PAGES.values() if any(v.warm for v in p.views)]
