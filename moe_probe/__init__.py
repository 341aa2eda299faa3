"""moe_probe: make the routing dynamics of Mixture-of-Experts transformers visible.

Importing the package must stay cheap and torch-free: readers (diagnose, dashboards,
notebooks) import ``moe_probe.open_run`` without pulling in torch.
"""

from moe_probe._version import __version__


def open_run(run_dir, **kwargs):
    """Open a run's trace store for reading (see :mod:`moe_probe.run` and
    :mod:`moe_probe.store.reader`)."""
    from moe_probe.run import open_run as _open_run

    return _open_run(run_dir, **kwargs)


__all__ = ["open_run", "__version__"]
