"""The one deferred queue: device values judged later with one host read, and their checkpoint state."""

from __future__ import annotations

import math
import types

import torch

from lightning_diag.callbacks._deferred import DeferredQueue, pack, unpack
from lightning_diag.testing import HostSyncCounter

ALONE = types.SimpleNamespace(world_size=1)  # what the queue reads of a one-process Trainer


def test_pack_and_unpack_by_layout_round_trip_vectors_and_tables() -> None:
    parts = {"total": torch.tensor([3.0]), "groups": torch.arange(4.0), "empty": torch.zeros(0)}
    vector, layout = pack(parts)
    assert layout == [("total", 1), ("groups", 4), ("empty", 0)]
    assert unpack(vector.tolist(), layout) == {"total": [3.0], "groups": [0.0, 1.0, 2.0, 3.0], "empty": []}
    table = torch.stack([vector, vector * 2])  # one row per rank, as a gather returns it
    columns = unpack(table, layout)
    assert torch.equal(columns["groups"][1], torch.arange(4.0) * 2)


def test_queued_steps_cost_no_sync_and_come_back_in_order_with_one_read() -> None:
    queue = DeferredQueue(limit=3)
    counter = HostSyncCounter()
    with counter:
        assert not queue.add(0, torch.tensor([1.0, 2.0]), info={"epoch": 0})
        assert not queue.add(1, torch.tensor([float("nan")]), reduced=False, kept={"norms": torch.ones(2)})
        assert queue.add(2, torch.tensor([5.0]))  # full: the owner should take it now
    assert counter.count == 0
    with counter:
        entries, extra = queue.take(ALONE, extra={"scale": torch.tensor([8.0])})
    assert counter.count == 1  # everything, the extra part included, in one transfer
    assert [e.step for e in entries] == [0, 1, 2] and not queue
    assert entries[0].host == [1.0, 2.0] and entries[0].info == {"epoch": 0}
    assert len(entries[1].host) == 1 and math.isnan(entries[1].host[0])  # a NaN comes back as NaN
    assert torch.equal(entries[1].kept["norms"], torch.ones(2))
    assert entries[2].host == [5.0] and extra == {"scale": [8.0]}


def test_state_round_trip_keeps_values_flags_and_kept_tensors() -> None:
    queue = DeferredQueue()
    queue.add(
        7, torch.tensor([1.5, -2.0]), reduced=False, info={"batch_idx": "3,4"}, kept={"n": torch.ones(3)}
    )
    state = queue.state_dict()
    assert all(v.device.type == "cpu" for e in state for v in [e["values"], *e["kept"].values()])
    loaded = DeferredQueue()
    loaded.load_state_dict(state)
    (entry,), _ = loaded.take(ALONE)
    assert (entry.step, entry.reduced, entry.info, entry.host) == (
        7,
        False,
        {"batch_idx": "3,4"},
        [1.5, -2.0],
    )
    assert torch.equal(entry.kept["n"], torch.ones(3))


def test_an_empty_queue_reads_nothing() -> None:
    counter = HostSyncCounter()
    with counter:
        assert DeferredQueue().take(ALONE) == ([], {})
    assert counter.count == 0
