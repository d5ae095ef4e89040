"""The words of SilentBugDetector's findings: one function per finding, each returning a :class:`Verdict`.

The rules that decide when to call them are in :mod:`lightning_diag.core.silent.checks`; the callback records what
these return (``DiagCallback.record(trainer, verdict, key=...)``). Messages carry the numbers that triggered them;
``checks`` is the callback's ``patience`` (the consecutive checks the condition held).
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning_diag.core.verdict import Severity, Verdict

__all__ = [
    "BUFFER_ADVICE",
    "MODE_ADVICE",
    "NO_OP_ADVICE",
    "RANK_REPEAT_ADVICE",
    "REPEAT_ADVICE",
    "REPLICA_ADVICE",
    "STALE_ADVICE",
    "UNHELD_ADVICE",
    "VAL_MODE_ADVICE",
    "buffer_divergence",
    "grad_noise_scale",
    "no_op_step",
    "parameter_divergence",
    "repeated_ranks",
    "repeated_steps",
    "stale_gradients",
    "train_mode",
    "unheld_parameters",
    "validation_bn_updates",
    "validation_mode",
]

NO_OP_ADVICE = [
    "Check the learning rate of every param group at this step (a schedule or warmup at 0, `lr=0` in a config).",
    "Build the optimizer in `configure_optimizers` from `self.parameters()` of the module that is trained (not a "
    "copy, not another module), after every layer is created or replaced.",
    "Under pure bf16/fp16 weights, updates smaller than the weights' precision are lost: keep fp32 master weights "
    "(`precision='bf16-mixed'`).",
]
UNHELD_ADVICE = [
    "Create the optimizer over the parameters of the module that computes the loss (`self.parameters()`), not over "
    "a copy (`copy.deepcopy`) or another module.",
    "If layers are replaced or added after `configure_optimizers` (in `setup`, `on_fit_start`, ...), create them in "
    "`__init__`/`configure_model` instead, or rebuild the optimizer.",
    "If these parameters are frozen on purpose, call `requires_grad_(False)` on them so no gradient is computed.",
]
STALE_ADVICE = [
    "With manual optimization, call `optimizer.zero_grad()` once per step (before `manual_backward` or after "
    "`optimizer.step()`).",
    "If `optimizer_zero_grad` is overridden, make it call `optimizer.zero_grad()`; use `accumulate_grad_batches` "
    "for gradient accumulation instead of skipping the zeroing.",
]
MODE_ADVICE = [
    "Something called `.eval()` on these modules and nothing switched them back: Lightning puts the model in train "
    "mode once when training starts, and after each validation restores the modes it saw before it.",
    "Look for `.eval()` in `setup`, `on_train_start`, `on_fit_start` or inside `training_step` (a metric or a "
    "teacher forward), and switch back with `.train()`.",
    "To freeze a sub-module on purpose, also call `requires_grad_(False)` on it (then it is not flagged); to keep "
    "only BatchNorm statistics fixed, switch the BatchNorm layers alone to eval.",
]
VAL_MODE_ADVICE = [
    "Something called `.train()` during validation: dropout makes the validation loss noisy and BatchNorm updates "
    "its running statistics with validation data.",
    "Remove the `.train()` from `validation_step`/`on_validation_*`, or run it under `torch.no_grad()` with the "
    "modules in eval mode.",
]
REPLICA_ADVICE = [
    "Change weights identically on every rank: no `if self.global_rank == 0:` around an in-place weight update, "
    "a checkpoint load or a re-initialisation after the model is wrapped.",
    "Create and initialise every parameter before training starts (DDP copies rank 0's weights only when it wraps "
    "the model) and register tensors as parameters or buffers so they are synchronised.",
]
BUFFER_ADVICE = [
    "A buffer written on one rank only (in a hook under `if self.global_rank == 0:`, or computed from rank-local "
    "data) is not synchronised by DDP after the forward: write it identically on every rank, or broadcast it.",
    "Keep DDP's `broadcast_buffers=True` so rank 0's buffers are copied to every rank at each forward.",
]
REPEAT_ADVICE = [
    "The DataLoader yields the same batch again: check the Dataset's `__getitem__` (ignoring its index, caching "
    "one item) and any custom sampler or iterator (re-created every step, a fixed seed per call).",
]
RANK_REPEAT_ADVICE = [
    "Every rank trains on the same samples, so the effective batch is one rank's batch: give the DataLoader a "
    "`DistributedSampler` (Lightning adds one unless `use_distributed_sampler=False` or the sampler is custom), "
    "or shard an IterableDataset by rank.",
]


# -- optimizer_no_op ---------------------------------------------------------------------------------------------
def unheld_parameters(unheld: Sequence[str], trained: int, optimizers: int) -> Verdict:
    """Parameters receive gradients that no optimizer holds: an error when nothing else trains, else a warning.

    Example:
        >>> v = unheld_parameters(["head.weight"], 0, 1)
        >>> v.code, v.severity, v.evidence["first_unheld"]
        ('optimizer_no_op', 'error', 'head.weight')
    """
    severity: Severity = "error" if trained == 0 else "warning"
    listed = ", ".join(unheld[:5]) + (f" and {len(unheld) - 5} more" if len(unheld) > 5 else "")
    what = (
        "no parameter the optimizer holds receives a gradient: nothing trains"
        if trained == 0
        else f"{trained} other parameter tensor(s) train"
    )
    return Verdict(
        "optimizer_no_op",
        severity,
        f"{len(unheld)} parameter tensor(s) receive gradients but no optimizer holds them ({listed}); {what}.",
        evidence={
            "unheld_tensors": len(unheld),
            "held_tensors_with_grad": trained,
            "first_unheld": unheld[0],
            "optimizers": optimizers,
        },
        advice=UNHELD_ADVICE,
    )


def no_op_step(step: int, active: int, tensors: int, lrs: Sequence[float], checks: int) -> Verdict:
    """The optimizer step moved none of the ``active`` sampled elements (those with a non-zero gradient)."""
    lr = ", ".join(f"{v:g}" for v in lrs)
    return Verdict(
        "optimizer_no_op",
        "error",
        f"The optimizer step changed no parameter at {checks} consecutive checks (last at step "
        f"{step}): {active} sampled elements of {tensors} tensor(s) had a non-zero "
        f"gradient and none moved. Learning rate per group: {lr}.",
        evidence={"step": step, "sampled_elements": active, "tensors": tensors, "lr": lr, "checks": checks},
        advice=NO_OP_ADVICE,
    )


# -- stale_gradients ---------------------------------------------------------------------------------------------
def stale_gradients(step: int, next_step: int, count: int, checks: int) -> Verdict:
    """Every watched gradient still held the previous step's gradient when the next one was added."""
    return Verdict(
        "stale_gradients",
        "error",
        f"Gradients were not cleared between optimizer steps at {checks} consecutive checks (last: steps "
        f"{step} and {next_step}): all {count} watched gradient tensors still held the previous step's "
        "gradient when the next one was added, so every step re-applies all earlier gradients.",
        evidence={"watched_tensors": count, "step": step, "checks": checks},
        advice=STALE_ADVICE,
    )


# -- wrong_mode --------------------------------------------------------------------------------------------------
def _listed(problems: Sequence[tuple[str, int]]) -> str:
    return ", ".join(f"{n or '<the whole model>'} ({k} layer(s))" for n, k in problems[:5])


def _mode_evidence(phase: str, problems: Sequence[tuple[str, int]]) -> dict[str, str | int]:
    return {
        "phase": phase,
        "modules": ", ".join(n or "<root>" for n, _ in problems),
        "mode_sensitive_layers": sum(k for _, k in problems),
    }


def train_mode(problems: Sequence[tuple[str, int]], checks: int) -> Verdict:
    """Trained sub-trees in eval mode with dropout/BatchNorm inside (``checks.mode_problems(training=True)``)."""
    return Verdict(
        "wrong_mode",
        "warning",
        f"During training, {len(problems)} trained sub-module(s) are in eval mode with dropout/BatchNorm "
        f"inside at {checks} consecutive checks: {_listed(problems)}. Dropout is off and BatchNorm uses frozen "
        "running statistics there.",
        evidence=_mode_evidence("train", problems),
        advice=MODE_ADVICE,
    )


def validation_mode(problems: Sequence[tuple[str, int]]) -> Verdict:
    """Sub-trees with dropout/BatchNorm in train mode during validation."""
    return Verdict(
        "wrong_mode",
        "warning",
        f"During validation, {len(problems)} sub-module(s) with dropout/BatchNorm are in train mode: "
        f"{_listed(problems)}.",
        evidence=_mode_evidence("validation", problems),
        advice=VAL_MODE_ADVICE,
    )


def validation_bn_updates(grown: int) -> Verdict:
    """BatchNorm running statistics updated ``grown`` times during one validation."""
    return Verdict(
        "wrong_mode",
        "warning",
        f"BatchNorm running statistics were updated {grown} time(s) during validation: validation data "
        "leaked into the statistics the model evaluates with.",
        evidence={"phase": "validation", "bn_updates": grown},
        advice=VAL_MODE_ADVICE,
    )


# -- replica_divergence ------------------------------------------------------------------------------------------
def parameter_divergence(first: str, count: int, norms: Sequence[float], step: int) -> Verdict:
    """``count`` parameter tensors differ across ranks; ``norms`` is the first one's norm on each rank."""
    world = len(norms)
    return Verdict(
        "replica_divergence",
        "error",
        f"{count} parameter tensor(s) differ across the {world} ranks at step {step}; "
        f"the first is {first} (norm per rank: {', '.join(f'{v:.6g}' for v in norms)}). Each rank now "
        "trains a different model and the checkpoint keeps rank 0's.",
        evidence={
            "first_tensor": first,
            "diverging_parameters": count,
            "norms_per_rank": ", ".join(f"{v:.9g}" for v in norms),
            "world_size": world,
        },
        advice=REPLICA_ADVICE,
    )


def buffer_divergence(first: str, count: int, world: int, step: int) -> Verdict:
    """``count`` float buffers (not norm-layer running statistics) differ across ranks."""
    return Verdict(
        "replica_divergence",
        "warning",
        f"{count} buffer(s) differ across the {world} ranks at step {step} (first: "
        f"{first}): each rank computes with different constants.",
        evidence={"first_tensor": first, "diverging_buffers": count, "world_size": world},
        advice=BUFFER_ADVICE,
    )


# -- repeated_data -----------------------------------------------------------------------------------------------
def repeated_steps(batch_idx: int, epoch: int, checks: int) -> Verdict:
    """The batch after a check's batch was the same batch."""
    return Verdict(
        "repeated_data",
        "error",
        f"Consecutive training batches were identical at {checks} consecutive checks (last: batches "
        f"{batch_idx - 1} and {batch_idx} of epoch {epoch}): the model sees the same data again and again.",
        evidence={"batch_idx": batch_idx, "epoch": epoch, "checks": checks},
        advice=REPEAT_ADVICE,
    )


def repeated_ranks(world: int, step: int, checks: int) -> Verdict:
    """Every rank trained on the same batch."""
    return Verdict(
        "repeated_data",
        "warning",
        f"All {world} ranks trained on the same batch at {checks} consecutive checks (last at step "
        f"{step}): data parallelism brings no new samples.",
        evidence={"world_size": world, "checks": checks},
        advice=RANK_REPEAT_ADVICE,
    )


# -- grad_noise_scale --------------------------------------------------------------------------------------------
def grad_noise_scale(
    scale: float, ratio: float, global_batch: float, micro_batch: float, micro_batches: int, checks: int
) -> Verdict:
    """The global batch is far from ``B_simple``: ``ratio`` is ``global_batch / scale`` (info: no measured harm).

    Example:
        >>> v = grad_noise_scale(1000.0, 0.064, 64.0, 16.0, 4, 5)
        >>> v.severity, v.message
        ('info', 'The global batch (64 samples) is 15.6x below the gradient noise scale B_simple = 1000 (averaged over 5 checks).')
    """
    below = ratio < 1
    return Verdict(
        "grad_noise_scale",
        "info",
        f"The global batch ({global_batch:g} samples) is {1 / ratio if below else ratio:.1f}x "
        f"{'below' if below else 'above'} the gradient noise scale B_simple = {scale:.4g} (averaged over "
        f"{checks} checks).",
        evidence={
            "noise_scale": scale,
            "global_batch": global_batch,
            "batch_over_noise_scale": ratio,
            "micro_batch": micro_batch,
            "micro_batches": micro_batches,
            "checks": checks,
        },
        advice=[
            "Larger batches (up to about B_simple, with the learning rate scaled up) would reach the same loss "
            "in fewer steps at nearly the same number of samples."
            if below
            else "Beyond B_simple, larger batches bring little: a smaller batch (more steps) would reach the "
            "same loss with less compute.",
            "B_simple grows as training progresses: judge it late in training, not at the start.",
        ],
    )
