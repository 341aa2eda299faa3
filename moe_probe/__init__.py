"""moe_probe: make the routing dynamics of Mixture-of-Experts transformers visible.

Importing the package must stay cheap and torch-free: readers (diagnose, dashboards,
notebooks) import ``moe_probe.open_run`` without pulling in torch; ``moe_probe.watch`` imports it
when called.
"""

from moe_probe._version import __version__


def open_run(run_dir, **kwargs):
    """Open a run's trace store for reading (see :mod:`moe_probe.run` and
    :mod:`moe_probe.store.reader`)."""
    from moe_probe.run import open_run as _open_run

    return _open_run(run_dir, **kwargs)


def watch(model, out, **kwargs):
    """Trace a training loop of ``model`` into a new run at ``out`` (context manager): see
    :func:`moe_probe.watcher.watch`. Imports torch on call only."""
    from moe_probe.watcher import watch as _watch

    return _watch(model, out, **kwargs)


__all__ = ["open_run", "watch", "__version__"]
