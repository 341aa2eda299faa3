"""moe_probe.store: the zarr trace store (``RUN_DIR/traces.zarr``) — writer, reader, schema.

Pure numpy/zarr/xarray; importing it never imports torch.
"""

from moe_probe.store.reader import RunStore, find_runs, open_run
from moe_probe.store.schema import GROUPS, SCHEMA_VERSION, StoreError, default_coords
from moe_probe.store.writer import StoreWriteError, StoreWriter

__all__ = [
    "StoreWriter", "StoreWriteError", "StoreError", "RunStore", "open_run", "find_runs",
    "GROUPS", "SCHEMA_VERSION", "default_coords",
]
