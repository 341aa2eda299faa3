"""moe_probe.store: the zarr trace store — writer, reader, schema.

Pure numpy/zarr/xarray; importing it never imports torch. It works on store paths; where a run
keeps its store is :mod:`moe_probe.run`'s business (``moe_probe.open_run(RUN_DIR)``).
"""

from moe_probe.store.reader import RunStore
from moe_probe.store.schema import (
    CORE_GROUPS, EXTRA_GROUPS, GROUPS, SCHEMA_VERSION, NotMeasured, StoreError, default_coords,
)
from moe_probe.store.writer import StoreWriteError, StoreWriter

__all__ = [
    "StoreWriter", "StoreWriteError", "StoreError", "NotMeasured", "RunStore", "GROUPS",
    "CORE_GROUPS", "EXTRA_GROUPS", "SCHEMA_VERSION", "default_coords",
]
