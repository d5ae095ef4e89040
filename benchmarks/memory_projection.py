"""How early MemoryMonitor finds a leak, and how close its projected exhaustion step is to the step that really runs
out, on the corpus' leak scenarios (``benchmarks/diagnosis/scenarios/memory.py``).

    python benchmarks/memory_projection.py [--seeds 0 1 2] [--cases NAME ...]

Each case starts its leak at a known step (``keep_from``), sets MemoryMonitor's ``capacity_mib`` to the process RSS
at the start of the fit plus a margin the leak uses up within the run, and trains on past that point (on CPU nothing
stops at the capacity: the RSS just goes on). A probe reads the RSS at the start and end of every step; the *real*
exhaustion step is the first step whose RSS reaches the capacity. Printed per case and seed: the leak's start,
the step MemoryMonitor reported ``memory_growth`` (and the pattern it named), its projected exhaustion step, the real
one, and the error (projected - real), also as a share of the steps between the report and the real exhaustion.
For the saw-tooth (whose memory is given back at every epoch end) the capacity is out of reach: the comparison is
the growth of one epoch it names against the RSS the first epoch really added (from its first step to its end).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import warnings
from typing import Any

import lightning.pytorch as pl

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.diagnosis.scenarios import memory
from lightning_diag import MemoryMonitor

warnings.filterwarnings("ignore")

#: name -> (what the model keeps, keep_from, epochs, margin MiB above the starting RSS, extra Wide arguments)
CASES: dict[str, tuple[str, int, int, float, dict[str, Any]]] = {
    "hidden activations per step": ("hidden", 20, 5, 300.0, {}),
    "loss per step": ("loss", 20, 8, 150.0, {}),
    "outputs per epoch (saw-tooth)": ("epoch", 0, 3, 2000.0, {"hidden": 24576}),
    "metric never reset": ("validation", 0, 9, 500.0, {}),
}


class Probe(pl.Callback):
    """The RSS at the start and end of every step."""

    def __init__(self) -> None:
        self.rss: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        self.rss.append((trainer.global_step, memory.rss_mib()))

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self.rss.append((trainer.global_step - 1, memory.rss_mib()))


def run_case(name: str, seed: int) -> dict[str, Any]:
    keep, keep_from, epochs, margin, extra = CASES[name]
    pl.seed_everything(seed, verbose=False)
    run = memory._wide(seed, keep=keep, keep_from=keep_from, epochs=epochs, **extra)
    capacity = memory.rss_mib() + margin
    monitor, probe = MemoryMonitor(capacity_mib=capacity), Probe()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=[monitor, probe],
        **run.trainer_kwargs,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(run.model, run.train_dataloaders, run.val_dataloaders)
    growth = next((f for f in monitor.findings if f.code == "memory_growth"), None)
    real = next((step for step, rss in probe.rss if rss >= capacity), None)
    out: dict[str, Any] = {"case": name, "seed": seed, "leak_from": keep_from, "real": real}
    if growth is None:
        return out
    projected = int(growth.evidence["projected_exhaustion_step"])
    out.update(found=growth.step, pattern=growth.evidence["pattern"], projected=projected)
    if growth.evidence["pattern"] == "per_epoch":
        steps = len(run.train_dataloaders)
        first = [rss for step, rss in probe.rss if step < steps]
        out.update(per_epoch=growth.evidence["mib_per_epoch"], real_epoch=first[-1] - first[0])
    elif projected >= 0 and real is not None:
        out["error"] = projected - real
        ahead = real - growth.step
        out["relative"] = (projected - real) / ahead if ahead > 0 else None
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args(argv)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rows = []
    print(
        "| case | seed | leak from step | reported at step (pattern) | projected exhaustion | real | error |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.cases:
        for seed in args.seeds:
            r = run_case(name, seed)
            rows.append(r)
            found = f"{r['found']} ({r['pattern']})" if "found" in r else "not reported"
            if "per_epoch" in r:
                projected = f"{r['per_epoch']:.0f} MiB per epoch"
                real = f"{r['real_epoch']:.0f} MiB in epoch 0"
            else:
                projected, real = str(r.get("projected", "-")), str(r["real"])
            error = "-" if "error" not in r else f"{r['error']:+d} steps"
            if r.get("relative") is not None:
                error += f" ({r['relative']:+.0%} of the steps left)"
            print(
                f"| {name} | {seed} | {r['leak_from']} | {found} | {projected} | {real} | {error} |",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
