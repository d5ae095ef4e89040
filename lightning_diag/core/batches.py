"""The one way lightning_diag reads a batch: the tensors inside it, its size, the model's input.

Libraries build batches as tensors, tuples and lists (namedtuples too), mappings (``dict``, ``OrderedDict``,
``BatchEncoding``...) and dataclasses, nested. :func:`iter_tensors` walks all of them in a stable order (the order
of the structure: positions, then mapping keys as inserted, then dataclass fields) and names each tensor with its
path (``batch['x'][0]``), so NaNGuard, SanityCheck, SilentBugDetector, SpeedMonitor and the gradient monitors read
the same tensors from the same batch. Everything here is host-side: shapes and references, never values (no host
synchronisation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = ["INPUT_KEYS", "MAX_DEPTH", "batch_size", "floating", "iter_tensors", "model_input", "tensors"]

#: How deep nested containers are walked (deeper tensors are not seen).
MAX_DEPTH = 8
#: Keys tried, in order, to find the model input in a mapping batch.
INPUT_KEYS = ("x", "input", "inputs", "image", "images", "features", "input_ids")


def iter_tensors(
    obj: Any, path: str = "batch", *, limit: int | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` for every tensor in a nested batch, in the structure's order; at most ``limit``.

    Example:
        >>> [p for p, _ in iter_tensors({"x": torch.ones(2), "y": (torch.zeros(3), 1)})]
        ["batch['x']", "batch['y'][0]"]
    """
    count = 0
    stack: list[tuple[Any, str, int]] = [(obj, path, 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, torch.Tensor):
            yield where, item
            count += 1
            if limit is not None and count >= limit:
                return
            continue
        if depth >= MAX_DEPTH:
            continue
        children: list[tuple[Any, str]]
        if isinstance(item, Mapping):
            children = [(value, f"{where}[{key!r}]") for key, value in item.items()]
        elif isinstance(item, (list, tuple)):
            children = [(value, f"{where}[{i}]") for i, value in enumerate(item)]
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            children = [(getattr(item, f.name), f"{where}.{f.name}") for f in dataclasses.fields(item)]
        else:
            continue
        stack.extend((child, name, depth + 1) for child, name in reversed(children))


def tensors(batch: Any, *, limit: int | None = None) -> list[torch.Tensor]:
    """The tensors of a batch, in the order of :func:`iter_tensors`."""
    return [t for _, t in iter_tensors(batch, limit=limit)]


def floating(batch: Any) -> list[torch.Tensor]:
    """The non-empty floating-point tensors of a batch (the ones that can hold NaN/Inf)."""
    return [t for _, t in iter_tensors(batch) if t.is_floating_point() and t.numel()]


def batch_size(batch: Any) -> int:
    """The leading dimension of the first non-empty tensor of the batch (``1`` for a 0-d tensor, ``0`` when there
    is none).
    """
    for _, t in iter_tensors(batch):
        size = int(t.shape[0]) if t.ndim else 1
        if size:
            return size
    return 0


def model_input(batch: Any) -> torch.Tensor | None:
    """The tensor a model's ``forward`` takes, by convention: ``batch[0]`` of a tuple/list, a known key of a
    mapping (``x``, ``input``, ``image``...), else the first tensor; the batch itself if it is a tensor.
    """
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        for key in INPUT_KEYS:
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    return next((t for _, t in iter_tensors(batch)), None)
