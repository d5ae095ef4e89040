"""Read logged values back from disk: TensorBoard event files, metrics.csv, offline W&B runs, MLflow stores."""

from __future__ import annotations

import csv
import glob
import json
import os
import struct
import time
from collections import defaultdict
from typing import Any

Series = dict[str, list[tuple[int, float]]]


def tb_scalars(log_dir: str) -> Series:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tb_tags(log_dir: str) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc.Tags()


def csv_scalars(path: str) -> Series:
    out: Series = defaultdict(list)
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    out[key].append((int(row["step"]), float(value)))
    return dict(out)


def _wandb_records(path: str) -> list[Any]:
    """Parse a ``run-*.wandb`` file: a LevelDB-style log (7-byte ``:W&B`` file header, 32 KiB blocks, records with
    a 7-byte header ``<checksum:u32, length:u16, type:u8>`` of type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    block = 32768
    with open(path, "rb") as handle:
        data = handle.read()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", ident
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left_in_block = block - pos % block
        if left_in_block < 7:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += block - pos % block if pos % block else 0
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(run_root: str) -> Series:
    """Scalars of the offline W&B run(s) under ``run_root``, keyed by name, at ``trainer/global_step``."""
    files = glob.glob(os.path.join(run_root, "**", "offline-run-*", "run-*.wandb"), recursive=True)
    assert files, f"no offline W&B run under {run_root}"
    out: Series = defaultdict(list)
    for path in files:
        records = _wandb_records(path)
        deadline = time.monotonic() + 30
        # W&B's service writes the run file asynchronously: `wandb.finish()` can return before its last records land.
        while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
            time.sleep(0.2)
            records = _wandb_records(path)
        for record in records:
            if record.WhichOneof("record_type") != "history":
                continue
            items = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                items[key] = json.loads(item.value_json)
            step = items.get("trainer/global_step")
            for key, value in items.items():
                if key.startswith("_") or key == "trainer/global_step" or not isinstance(value, (int, float)):
                    continue
                out[key].append((int(step), float(value)))
    return dict(out)


def mlflow_metrics(tracking_uri: str, run_id: str) -> Series:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    out: Series = {}
    for key in run.data.metrics:
        history = client.get_metric_history(run_id, key)
        out[key] = sorted((m.step, m.value) for m in history)
    return out
