"""State formats of earlier releases, turned into today's so their checkpoints still load (DESIGN.md section 6).

Each function takes the part of a callback's saved state that changed shape and returns today's form. They go
away one release after the format they read (``tests/test_checkpoint_compat.py`` resumes from a 0.1.0 checkpoint).
"""

from __future__ import annotations

from typing import Any

__all__ = ["grad_norm_queue_0_1", "nan_guard_queue_0_1"]


def nan_guard_queue_0_1(state: dict[str, Any]) -> list[dict[str, Any]]:
    """NaNGuard 0.1.0 kept its deferred steps under ``"pending"``, one dict per step."""
    return [
        {
            "step": p["step"],
            "values": p["values"],
            "reduced": p["reduced"],
            "info": {
                "epoch": int(p["epoch"]),
                "has_loss": bool(p["has_loss"]),
                "samples": None if p.get("samples") is None else int(p["samples"]),
                "names": list(p["names"]),
                "batch_idx": str(p["batch_idx"]),
            },
            "kept": {"norms": p["norms"]},
        }
        for p in state.get("pending", [])
    ]


def grad_norm_queue_0_1(state: dict[str, Any]) -> list[dict[str, Any]]:
    """GradNormMonitor 0.1.0 kept its pending steps as parallel lists (``pending_steps``, ``pending_totals``,
    ``pending_norms``, ``pending_samples``).
    """
    steps = state.get("pending_steps", [])
    samples = list(state.get("pending_samples", [])) + [0] * len(steps)
    return [
        {
            "step": int(step),
            "values": state["pending_totals"][i].reshape(1),
            "info": {"samples": int(samples[i])},
            "kept": {"norms": state["pending_norms"][i]},
        }
        for i, step in enumerate(steps)
    ]
