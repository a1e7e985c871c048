"""Read the records of an offline W&B run file (``run-<id>.wandb``) back, for tests.

wandb 0.31 writes its transaction log in LevelDB's log format after a 7-byte header
(":W&B", magic 0xBEE1, version); each record's payload is a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7  # crc32c (4), length (2), chunk type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos = [], b"", 7
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def summarise(path: str | Path) -> dict:
    """Group, run id and the logged history keys and values of one offline run."""
    import json

    out: dict = {"group": None, "run_id": None, "history": {}}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["group"], out["run_id"] = record.run.run_group, record.run.run_id
        elif kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                out["history"][key] = json.loads(item.value_json)
    return out
