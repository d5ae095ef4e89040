"""SpeedMonitor's rules and the words of their findings: a step starved by its data, DataLoader settings that waste
time on the device, host-device synchronisations inside the step.

The callback measures (host clocks around the data fetch and the step, the DataLoader's settings, the call sites
of synchronising CUDA calls) and these functions decide. Medians, not means: a loaded machine deschedules the
process now and then (a few long "waits"); a slow loader is slow at every step.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence

from lightning_diag.core.verdict import Severity, Verdict

__all__ = [
    "MATERIAL_SECONDS",
    "STARVED",
    "LoaderFacts",
    "dataloader_bound",
    "host_sync_verdict",
    "pin_memory_verdict",
]


@dataclasses.dataclass(frozen=True)
class LoaderFacts:
    """What the advice needs to know about the training DataLoader and the machine."""

    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    batch_size: int | None
    on_cuda: bool
    cpus: int


#: A step that waits this share of its time or more for its data is starved (a warning at any run length).
STARVED = 0.6
#: Below that share, the wait is a warning only when the whole run would save this many seconds.
MATERIAL_SECONDS = 60.0


def dataloader_bound(
    waits: Sequence[float],
    computes: Sequence[float],
    *,
    data_share: float,
    min_wait_ms: float,
    steps_so_far: int,
    loader: LoaderFacts | None,
    steps_total: int | None = None,
) -> Verdict | None:
    """``dataloader_bound`` when the median wait for data (seconds) is more than ``data_share`` of the median
    step and at least ``min_wait_ms``; advice from the loader's settings.

    Severity by how much it costs: a warning when the step is starved (waiting :data:`STARVED` of its time or
    more) or when the run (``steps_total`` steps, else the steps so far) would save :data:`MATERIAL_SECONDS` with
    the loading overlapped; ``info`` for a bottleneck that costs a short run a few seconds (a library's quickstart
    with ``num_workers=0``).

    Example:
        >>> found = dataloader_bound([0.02] * 10, [0.01] * 10, data_share=0.3, min_wait_ms=10.0, steps_so_far=10,
        ...                          loader=None)
        >>> found.code, round(found.evidence["data_share"], 3)
        ('dataloader_bound', 0.667)
    """
    wait, compute = statistics.median(waits), statistics.median(computes)
    step = wait + compute
    share = wait / step if step > 0 else 0.0
    if not (share > data_share and wait * 1e3 >= min_wait_ms):
        return None
    evidence: dict[str, float | int | str] = {
        "data_share": share,
        "data_wait_ms": wait * 1e3,
        "expected_speedup": round((wait + compute) / max(compute, 1e-9), 3),
        "compute_ms": compute * 1e3,
        "steps_averaged": len(waits),
    }
    advice: list[str] = []
    if loader is not None:
        evidence.update(
            {
                "num_workers": loader.num_workers,
                "pin_memory": int(loader.pin_memory),
                "persistent_workers": int(loader.persistent_workers),
                "batch_size": loader.batch_size if loader.batch_size is not None else -1,
            }
        )
        advice += _loader_advice(loader)
    advice.append("Check the storage: reading many small files from a network disk is a common cause.")
    run_steps = steps_total if steps_total and steps_total > steps_so_far else steps_so_far
    run_saving = wait * max(run_steps, 1)
    evidence["run_saving_s"] = round(run_saving, 3)
    severity: Severity = "warning" if share >= STARVED or run_saving >= MATERIAL_SECONDS else "info"
    return Verdict(
        "dataloader_bound",
        severity,
        f"Waiting for data takes {share:.0%} of each training step ({wait * 1e3:.1f} ms waiting, "
        f"{compute * 1e3:.1f} ms computing, medians over {len(waits)} steps): the model is starved. "
        f"With the loading overlapped with compute, steps would be up to "
        f"{(wait + compute) / max(compute, 1e-9):.1f}x faster (about {wait * max(steps_so_far, 1):.1f} s "
        f"saved over the {steps_so_far} steps so far).",
        evidence,
        advice,
    )


def _loader_advice(loader: LoaderFacts) -> list[str]:
    advice = []
    if loader.num_workers == 0:
        advice.append(
            f"`num_workers=0` loads every batch in the training process, between steps: use "
            f"`DataLoader(num_workers=N)` (this machine has {loader.cpus} CPUs) so batches are prepared while the "
            "model computes."
        )
    else:
        advice.append(
            f"The {loader.num_workers} worker(s) cannot keep up: raise `num_workers` or `prefetch_factor`, or make "
            "`__getitem__` cheaper (decode/resize once and cache, move augmentation to the GPU)."
        )
        if not loader.persistent_workers:
            advice.append("`persistent_workers=True` avoids restarting the workers at every epoch.")
    if loader.on_cuda and not loader.pin_memory:
        advice.append("`pin_memory=True` speeds up and overlaps the host-to-device copy.")
    return advice


def pin_memory_verdict(num_workers: int) -> Verdict:
    """Training on CUDA from a DataLoader without pinned memory."""
    return Verdict(
        "dataloader_config",
        "warning",
        "Training on CUDA with `DataLoader(pin_memory=False)`: host-to-device copies of each batch are slower "
        "and cannot overlap with compute.",
        {"pin_memory": 0, "num_workers": num_workers},
        ["Pass `pin_memory=True` to the training DataLoader."],
    )


def host_sync_verdict(call_sites: Sequence[str], syncs: int, steps: int) -> Verdict:
    """Synchronising CUDA calls seen in the watched steps, with where they were made."""
    sites = sorted(set(call_sites))
    return Verdict(
        "host_sync",
        "warning",
        f"{syncs} synchronising CUDA call(s) in {steps} watched steps; the host waits for the device at: "
        f"{', '.join(sites[:6])}.",
        {"syncs": syncs, "steps": steps, "call_sites": ", ".join(sites[:12])},
        [
            "Avoid `.item()`, `.cpu()`, `print(tensor)` and Python `if tensor:` in the training step; log tensors "
            "with `self.log` (Lightning converts them at the logging interval).",
            "Avoid data-dependent shapes (`nonzero`, boolean masks) in the hot path.",
        ],
    )
