"""Read a W&B offline run's `.wandb` log (shared by the export tests)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path


def wandb_records(path: Path):
    """The records of a `.wandb` transaction log, decoded with wandb's own protobuf.

    wandb 0.31 ships no reader for it (its Python DataStore is gone; `wandb.beta.LocalApi` is not
    released), so this reads the framing — LevelDB's log format behind a 7-byte `:W&B` header:
    32 KiB blocks of (crc32 of type+data, uint16 length, uint8 type, data) chunks — and checks
    every chunk's CRC."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, i, buf, out = 32768, 7, b"", []
    while i < len(data):
        if block - i % block < 7:  # too little room for a chunk header: zero padding
            i += block - i % block
            continue
        crc, n, kind = struct.unpack("<IHB", data[i:i + 7])
        chunk = data[i + 7:i + 7 + n]
        i += 7 + n
        if kind == 0:  # preallocated zeros past the end
            break
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF
        buf += chunk
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def wandb_history(records) -> dict[int, dict]:
    """{step: {key: value}} of the logged history rows (W&B's own ``_`` keys left out)."""
    got: dict[int, dict] = {}
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            items = {it.nested_key[0] if it.nested_key else it.key: json.loads(it.value_json)
                     for it in rec.history.item}
            got[rec.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return got
