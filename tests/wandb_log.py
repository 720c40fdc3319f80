"""Read an offline wandb run (`run-ID.wandb`) back: its run id, config and history rows.

wandb 0.2x+ writes the file from its Go core and no longer ships a Python reader. The format is
LevelDB's log format: a 7-byte header (":W&B", a 2-byte magic, a version byte), then 32 KiB
blocks of chunks, each `crc32 (4) | length (2, little-endian) | type (1: full, 2: first,
3: middle, 4: last) | data`; a block's tail shorter than a chunk header is zero padding. Each
whole record is a protobuf `wandb.proto.wandb_internal_pb2.Record`. Imported as `wandb_log`
(tests/ is on sys.path).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:8]
    out, pos, pending = [], HEADER, b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # padding at a block's end
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero-filled tail
            pos += room
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def read_run(path: Path) -> dict:
    """{"id", "config": {key: value}, "history": [{key: value}, ...]} of one run-ID.wandb file."""
    run = {"id": None, "config": {}, "history": []}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"] = record.run.run_id
            for item in record.run.config.update:
                run["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            row = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
            run["history"].append(row)
    return run
