"""Where MemoryMonitor's numbers come from: the CUDA caching allocator's host-side counters, or the process RSS.

Every read here is host-side: ``torch.cuda.memory_stats`` and ``reset_peak_memory_stats`` read and reset the
allocator's counters kept on the host (no device synchronisation), and ``/proc/self/statm`` is one small read of a
kernel file (a few microseconds). Nothing here is called on a quiet step.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

__all__ = ["CudaReader", "ProcessReader", "Reading", "children_rss", "host_capacity", "reader_for"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclasses.dataclass
class Reading:
    """One interval's numbers, in bytes (``None``: the device has no such counter)."""

    current: float
    peak: float
    reserved: float | None = None
    reserved_peak: float | None = None
    retries: int | None = None
    ooms: int | None = None


def _statm_rss(path: str = "/proc/self/statm") -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        return float(int(os.pread(fd, 128, 0).split()[1]) * _PAGE)
    finally:
        os.close(fd)


def children_rss() -> float | None:
    """The summed RSS of this process's child processes (DataLoader workers, compile workers), ``None`` without any
    or without ``/proc``. Shared copy-on-write pages are counted in every child that touched them.
    """
    try:
        with open(f"/proc/self/task/{os.getpid()}/children", encoding="ascii") as handle:
            pids = handle.read().split()
    except OSError:
        return None
    total = 0.0
    for pid in pids:
        try:
            total += _statm_rss(f"/proc/{pid}/statm")
        except (OSError, ValueError, IndexError):  # the worker just exited
            continue
    return total if pids else None


def host_capacity() -> float:
    """The memory this process may use: the physical memory, or the cgroup's limit when lower (v2 ``memory.max``
    of the process's own cgroup, or v1 ``memory.limit_in_bytes``).
    """
    capacity = float(os.sysconf("SC_PHYS_PAGES") * _PAGE)
    paths = ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
    try:
        with open("/proc/self/cgroup", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("0::"):
                    paths.insert(0, f"/sys/fs/cgroup{line[3:].strip()}/memory.max")
    except OSError:
        pass
    for path in paths:
        try:
            with open(path, encoding="ascii") as handle:
                text = handle.read().strip()
        except OSError:
            continue
        if text.isdigit():
            capacity = min(capacity, float(text))
    return capacity


class ProcessReader:
    """The process RSS (``/proc/self/statm``). ``peak`` is the largest RSS seen by any read since the last interval:
    RSS keeps most of what a step freed (the C allocator holds on to it), so it is close to the step's peak.
    """

    device = "cpu"

    def __init__(self, capacity: float | None = None) -> None:
        self.capacity = float(capacity) if capacity is not None else host_capacity()
        self._high = 0.0

    def current(self) -> float:
        value = _statm_rss()
        self._high = max(self._high, value)
        return value

    def interval(self) -> Reading:
        value = self.current()
        peak, self._high = self._high, value
        return Reading(current=value, peak=peak)

    def expandable(self) -> bool:
        return False


class CudaReader:
    """The CUDA caching allocator of one device: ``allocated`` is the baseline, peaks are reset at every interval
    (``torch.cuda.reset_peak_memory_stats``) so that each interval's peak is its own.
    """

    device = "cuda"

    def __init__(self, device: torch.device, capacity: float | None = None) -> None:
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        if capacity is None:
            total = float(torch.cuda.get_device_properties(self.index).total_memory)
            capacity = total * float(torch.cuda.get_per_process_memory_fraction(self.index))
        self.capacity = float(capacity)

    def current(self) -> float:
        return float(torch.cuda.memory_allocated(self.index))

    def interval(self) -> Reading:
        stats: dict[str, Any] = torch.cuda.memory_stats(self.index)
        torch.cuda.reset_peak_memory_stats(self.index)
        return Reading(
            current=float(stats.get("allocated_bytes.all.current", 0)),
            peak=float(stats.get("allocated_bytes.all.peak", 0)),
            reserved=float(stats.get("reserved_bytes.all.current", 0)),
            reserved_peak=float(stats.get("reserved_bytes.all.peak", 0)),
            retries=int(stats.get("num_alloc_retries", 0)),
            ooms=int(stats.get("num_ooms", 0)),
        )

    def expandable(self) -> bool:
        conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + "," + os.environ.get("PYTORCH_ALLOC_CONF", "")
        return "expandable_segments:true" in conf.replace(" ", "").lower()


def reader_for(device: torch.device, capacity: float | None = None) -> CudaReader | ProcessReader | None:
    """The reader for the device a LightningModule is on; ``None`` where there is none (MPS, XLA, no ``/proc``)."""
    if device.type == "cuda":
        return CudaReader(device, capacity)
    if device.type == "cpu" and os.path.exists("/proc/self/statm"):
        return ProcessReader(capacity)
    return None
