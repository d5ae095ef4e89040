"""Device values that wait for the next logging step, and the one packed read that brings them to the host.

Quiet steps cost no host synchronisation (DESIGN.md section 8): a callback that must judge every step keeps that
step's numbers on the device in a :class:`DeferredQueue` and judges them, in order, when it reads anyway (a logging
step, a check step, the end of fit). :meth:`DeferredQueue.take` empties the queue with **one collective** (a sum
over ranks of the rows not yet reduced) and **one host read** (every row, plus whatever the caller reads at the
same step, packed into one vector). :func:`pack`/:func:`unpack` are that packing, by a layout of named parts, for
the callbacks that gather one vector per rank.

The queue is part of its owner's ``state_dict``: pending values travel in checkpoints as CPU tensors, so a resumed
run judges them as the uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch

from lightning_diag import _distributed

__all__ = ["Deferred", "DeferredQueue", "Layout", "pack", "unpack"]

#: Entries kept before the owner must judge them even without a logging step (bounds memory and latency).
MAX_PENDING = 256

#: ``(name, size)`` of each part of a packed vector, in order.
Layout = list[tuple[str, int]]
_Row = TypeVar("_Row", list[float], torch.Tensor)


def pack(
    parts: Mapping[str, torch.Tensor], device: torch.device | None = None
) -> tuple[torch.Tensor, Layout]:
    """One float vector of every part (flattened, in order) and the layout that :func:`unpack` reads it with."""
    layout = [(name, int(t.numel())) for name, t in parts.items()]
    if device is None and parts:
        device = next(iter(parts.values())).device
    if not parts:
        return torch.zeros(0, device=device), layout
    return torch.cat([t.detach().float().reshape(-1).to(device) for t in parts.values()]), layout


def unpack(values: _Row, layout: Layout) -> dict[str, _Row]:
    """The parts of a packed vector (or of a table of them: the last dimension is sliced), by name.

    Example:
        >>> vector, layout = pack({"a": torch.ones(2), "b": torch.zeros(1)})
        >>> unpack(vector.tolist(), layout)
        {'a': [1.0, 1.0], 'b': [0.0]}
    """
    out: dict[str, Any] = {}
    offset = 0
    for name, size in layout:
        out[name] = (
            values[..., offset : offset + size]
            if isinstance(values, torch.Tensor)
            else values[offset : offset + size]
        )
        offset += size
    return out


@dataclasses.dataclass
class Deferred:
    """One deferred step: its device values and what judging it later needs."""

    step: int
    #: the numbers the judgement reads, a 1-d device tensor
    values: torch.Tensor
    #: already summed over ranks (``False``: :meth:`DeferredQueue.take` sums it with the other such rows)
    reduced: bool = True
    #: plain Python facts about the step (its epoch, batch indices...), saved in checkpoints as they are
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: device tensors kept for a closer look on detection only (never part of the packed read)
    kept: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    #: ``values`` on the host, filled by :meth:`DeferredQueue.take`
    host: list[float] = dataclasses.field(default_factory=list)


class DeferredQueue:
    """The steps a callback judges later, in order; read with one collective and one host transfer."""

    def __init__(self, limit: int = MAX_PENDING) -> None:
        self.limit = limit
        self.entries: list[Deferred] = []

    def __len__(self) -> int:
        return len(self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def add(
        self,
        step: int,
        values: torch.Tensor,
        *,
        reduced: bool = True,
        info: Mapping[str, Any] | None = None,
        kept: Mapping[str, torch.Tensor] | None = None,
    ) -> bool:
        """Queue a step's device values (no sync); returns whether the queue is full (the owner should take it)."""
        self.entries.append(
            Deferred(int(step), values.detach().reshape(-1), reduced, dict(info or {}), dict(kept or {}))
        )
        return len(self.entries) >= self.limit

    def clear(self) -> None:
        self.entries = []

    def take(
        self, trainer: Any, extra: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[list[Deferred], dict[str, list[float]]]:
        """Empty the queue: every entry with ``host`` filled, and the ``extra`` parts read in the same transfer.

        Rows not reduced yet are summed over ranks with one collective (every rank holds the same entries: the
        steps are the same everywhere, so every rank calls it at the same point).
        """
        entries, self.entries = self.entries, []
        parts = dict(extra or {})
        if not entries and not parts:
            return [], {}
        device = entries[-1].values.device if entries else next(iter(parts.values())).device
        local = [e.values.to(device) for e in entries if not e.reduced]
        if local:
            summed = _distributed.reduce(trainer, torch.cat(local), "sum")
            parts = {"__local__": summed, **parts}
        reduced = [e.values.to(device) for e in entries if e.reduced]
        if reduced:
            parts = {"__reduced__": torch.cat(reduced), **parts}
        vector, layout = pack(parts, device)
        read = unpack(vector.tolist(), layout)  # the one host read
        rows = {True: iter(read.pop("__reduced__", [])), False: iter(read.pop("__local__", []))}
        for entry in entries:
            source = rows[entry.reduced]
            entry.host = [next(source) for _ in range(entry.values.numel())]
        return entries, read

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> list[dict[str, Any]]:
        """The pending entries as plain types and CPU tensors (checkpoints load with ``weights_only=True``)."""
        return [
            {
                "step": e.step,
                "values": e.values.detach().cpu(),
                "reduced": e.reduced,
                "info": dict(e.info),
                "kept": {k: v.detach().cpu() for k, v in e.kept.items()},
            }
            for e in self.entries
        ]

    def load_state_dict(self, state: Sequence[Mapping[str, Any]]) -> None:
        self.entries = [
            Deferred(
                int(s["step"]),
                torch.as_tensor(s["values"]).float().reshape(-1),
                bool(s.get("reduced", True)),
                dict(s.get("info", {})),
                {k: torch.as_tensor(v) for k, v in dict(s.get("kept", {})).items()},
            )
            for s in state
        ]
