"""Read the metrics an offline W&B run wrote, straight from its `run-*.wandb` transaction log.

The log is a LevelDB-style record stream (7-byte file header, 32 KiB blocks, each record chunk prefixed by a
crc32/length/type header) of `wandb_internal_pb2.Record` protobufs; history records hold the logged metrics.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

from wandb.proto import wandb_internal_pb2

_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(data: bytes) -> Iterator[bytes]:
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        pos += _HEADER
        chunk, pos = data[pos:pos + length], pos + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """Every history row (metric name → value) an offline run directory holds, in logging order."""
    (log,) = Path(run_dir).glob("run-*.wandb")
    rows = []
    for raw in _records(log.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def offline_runs(save_dir: Path) -> list[Path]:
    """Offline run directories under a WandbLogger save_dir, oldest first."""
    return sorted((Path(save_dir) / "wandb").glob("offline-run-*"))


def metric(rows: list[dict[str, Any]], key: str) -> dict[int, float]:
    """global step → value of `key` over the rows that logged it."""
    return {int(row["trainer/global_step"]): float(row[key]) for row in rows if key in row}
