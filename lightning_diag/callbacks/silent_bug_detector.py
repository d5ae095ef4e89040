"""SilentBugDetector: the training bugs that raise nothing and produce no NaN, checked at sampled steps."""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy
from typing_extensions import override

from lightning_diag import _lightning, _logging
from lightning_diag._distributed import is_distributed
from lightning_diag._validation import (
    Unused,
    check_bool,
    check_fraction,
    check_int,
    check_range,
    check_unused,
)
from lightning_diag.callbacks._base import DiagCallback
from lightning_diag.callbacks._context import step_context
from lightning_diag.core.batches import batch_size, tensors
from lightning_diag.core.grad_stats import local_tensor
from lightning_diag.core.silent import (
    NoiseScale,
    Streak,
    bn_batches_tracked,
    divergent_entries,
    fingerprint,
    flat_sample,
    mode_problems,
    noise_scale_terms,
)
from lightning_diag.core.verdict import Severity, Verdict

__all__ = ["SilentBugDetector"]

#: Relative gap between the micro-batch and the mean squared gradient norm below which it is float32 rounding.
NOISE_FLOOR = 1e-5
#: Gradient tensors watched per check by the stale-gradient probe.
STALE_TENSORS = 8
#: Parameter tensors sampled per check by the no-op probe (spread over the optimizer's param groups).
PROBE_TENSORS = 8


def _per_group(optimizer: Any, with_grad: list[torch.Tensor]) -> list[torch.Tensor]:
    """Up to ``PROBE_TENSORS`` of the parameters that have a gradient, spread over every param group (so a group
    frozen with ``lr=0`` on purpose never stands for the whole optimizer).
    """
    has_grad = {id(p) for p in with_grad}
    groups = [[p for p in g["params"] if id(p) in has_grad] for g in optimizer.param_groups]
    groups = [g for g in groups if g]
    share = max(1, PROBE_TENSORS // max(len(groups), 1))
    return [p for g in groups for p in _spread(g, share)]


def _spread(items: list[Any], most: int) -> list[Any]:
    """At most ``most`` of ``items``, evenly spread (first and last included)."""
    if len(items) <= most:
        return items
    if most == 1:
        return [items[-1]]
    step = (len(items) - 1) / (most - 1)
    return [items[round(i * step)] for i in range(most)]


_NO_OP_ADVICE = [
    "Check the learning rate of every param group at this step (a schedule or warmup at 0, `lr=0` in a config).",
    "Build the optimizer in `configure_optimizers` from `self.parameters()` of the module that is trained (not a "
    "copy, not another module), after every layer is created or replaced.",
    "Under pure bf16/fp16 weights, updates smaller than the weights' precision are lost: keep fp32 master weights "
    "(`precision='bf16-mixed'`).",
]
_UNHELD_ADVICE = [
    "Create the optimizer over the parameters of the module that computes the loss (`self.parameters()`), not over "
    "a copy (`copy.deepcopy`) or another module.",
    "If layers are replaced or added after `configure_optimizers` (in `setup`, `on_fit_start`, ...), create them in "
    "`__init__`/`configure_model` instead, or rebuild the optimizer.",
    "If these parameters are frozen on purpose, call `requires_grad_(False)` on them so no gradient is computed.",
]
_STALE_ADVICE = [
    "With manual optimization, call `optimizer.zero_grad()` once per step (before `manual_backward` or after "
    "`optimizer.step()`).",
    "If `optimizer_zero_grad` is overridden, make it call `optimizer.zero_grad()`; use `accumulate_grad_batches` "
    "for gradient accumulation instead of skipping the zeroing.",
]
_MODE_ADVICE = [
    "Something called `.eval()` on these modules and nothing switched them back: Lightning puts the model in train "
    "mode once when training starts, and after each validation restores the modes it saw before it.",
    "Look for `.eval()` in `setup`, `on_train_start`, `on_fit_start` or inside `training_step` (a metric or a "
    "teacher forward), and switch back with `.train()`.",
    "To freeze a sub-module on purpose, also call `requires_grad_(False)` on it (then it is not flagged); to keep "
    "only BatchNorm statistics fixed, switch the BatchNorm layers alone to eval.",
]
_VAL_MODE_ADVICE = [
    "Something called `.train()` during validation: dropout makes the validation loss noisy and BatchNorm updates "
    "its running statistics with validation data.",
    "Remove the `.train()` from `validation_step`/`on_validation_*`, or run it under `torch.no_grad()` with the "
    "modules in eval mode.",
]
_REPLICA_ADVICE = [
    "Change weights identically on every rank: no `if self.global_rank == 0:` around an in-place weight update, "
    "a checkpoint load or a re-initialisation after the model is wrapped.",
    "Create and initialise every parameter before training starts (DDP copies rank 0's weights only when it wraps "
    "the model) and register tensors as parameters or buffers so they are synchronised.",
]
_BUFFER_ADVICE = [
    "A buffer written on one rank only (in a hook under `if self.global_rank == 0:`, or computed from rank-local "
    "data) is not synchronised by DDP after the forward: write it identically on every rank, or broadcast it.",
    "Keep DDP's `broadcast_buffers=True` so rank 0's buffers are copied to every rank at each forward.",
]
_REPEAT_ADVICE = [
    "The DataLoader yields the same batch again: check the Dataset's `__getitem__` (ignoring its index, caching "
    "one item) and any custom sampler or iterator (re-created every step, a fixed seed per call).",
]
_RANK_REPEAT_ADVICE = [
    "Every rank trains on the same samples, so the effective batch is one rank's batch: give the DataLoader a "
    "`DistributedSampler` (Lightning adds one unless `use_distributed_sampler=False` or the sampler is custom), "
    "or shard an IterableDataset by rank.",
]


def _replicated_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Float buffers that must be equal on every rank: not the running statistics of norm layers, which each
    rank's forward updates with its own batch between DDP's buffer broadcasts.
    """
    found = []
    for prefix, sub in module.named_modules():
        if isinstance(sub, torch.nn.modules.batchnorm._NormBase):
            continue
        for name, buffer in sub.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point():
                found.append((f"{prefix}.{name}" if prefix else name, buffer.detach()))
    return found


def _model_parallel(pl_module: Any) -> bool:
    """Whether the device mesh has a dimension other than data parallelism (tensor/pipeline parallel ranks see
    the same batch on purpose).
    """
    mesh = getattr(pl_module, "device_mesh", None)
    names = getattr(mesh, "mesh_dim_names", None) or ()
    return any(name != "data_parallel" and mesh[name].size() > 1 for name in names)  # type: ignore[index]


def _replicated(trainer: Any, pl_module: Any) -> bool:
    """Whether every rank holds the whole model (one process, or DDP): not FSDP, DeepSpeed or tensor parallelism,
    whose ranks hold shards, so their checksums differ and their parameter hooks do not see whole gradients.
    """
    if int(getattr(trainer, "world_size", 1)) > 1 and not isinstance(trainer.strategy, DDPStrategy):
        return False
    return not any(_is_dtensor(p) for p in pl_module.parameters())


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


class _SquareProbe:
    """Tensor hooks that add up ``|g|^2`` of each parameter's *incoming* gradient, per backward call.

    The hook of a leaf tensor sees the gradient of one backward before it is accumulated into ``.grad`` and before
    DDP averages it across ranks: exactly the micro-batch, per-rank gradient the noise scale needs.
    """

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.micro: list[list[torch.Tensor]] = []
        self.handles = [p.register_hook(self._hook) for p in params]

    def open(self) -> None:
        self.micro.append([])

    def _hook(self, grad: torch.Tensor) -> None:
        if not self.micro:
            self.open()
        g = grad.detach()
        if g.is_sparse:
            g = g.coalesce().values()
        self.micro[-1].append(g.float().pow(2).sum())

    def close(self) -> list[torch.Tensor]:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        return [torch.stack(m).sum() for m in self.micro if m]


class _StaleProbe:
    """What happened to a few gradients between an optimizer step and the next step of the same optimizer.

    After step ``t`` it keeps a sample of each watched ``.grad`` (and a weak reference to the tensor). A hook on the
    parameter notes, at every later backward, whether ``.grad`` had been cleared (``None`` or zero) before the new
    gradient was added. At the next step a gradient is stale when backward reached it and never found it cleared,
    or when it is the very same tensor with the same values (re-applied untouched).
    """

    def __init__(self, optimizer: Any, step: int, params: list[torch.Tensor], size: int) -> None:
        self.optimizer = optimizer
        self.step = step
        self.params = params
        self.base = [flat_sample(local_tensor(p.grad), size).clone() for p in params]  # type: ignore[arg-type]
        self.grads = [weakref.ref(p.grad) for p in params]
        self.touched = [False] * len(params)
        self.cleared_host = [False] * len(params)
        self.cleared = [torch.zeros((), dtype=torch.bool, device=b.device) for b in self.base]
        self.size = size
        self.handles = [p.register_hook(self._make_hook(i)) for i, p in enumerate(params)]

    def _make_hook(self, i: int) -> Any:
        def hook(_grad: torch.Tensor) -> None:
            self.touched[i] = True
            current = self.params[i].grad
            if current is None:
                self.cleared_host[i] = True
            elif not self.cleared_host[i]:
                sample = flat_sample(local_tensor(current), self.size)
                self.cleared[i] = self.cleared[i] | (sample == 0).all()

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def verdict(self) -> torch.Tensor:
        """``[stale, judged]`` as a device tensor (no host read): how many watched gradients are stale, out of
        those that have a gradient at this step.
        """
        self.close()
        device = self.cleared[0].device
        flags: list[torch.Tensor] = []
        for i, p in enumerate(self.params):
            grad = p.grad
            if grad is None:
                continue  # no gradient to apply: nothing to judge
            if self.cleared_host[i]:
                flags.append(torch.zeros((), dtype=torch.bool, device=device))
                continue  # cleared since the last step, then filled again: healthy
            if self.touched[i]:
                flags.append(~self.cleared[i])
                continue
            # backward never reached it (or its hooks do not run, FSDP2): stale only if re-applied untouched
            if self.grads[i]() is grad:
                sample = flat_sample(local_tensor(grad), self.size)
                flags.append((sample == self.base[i]).all() & self.base[i].any())
            else:
                flags.append(torch.zeros((), dtype=torch.bool, device=device))
        if not flags:
            return torch.zeros(2, device=device)
        return torch.stack([torch.stack(flags).sum().float(), torch.tensor(float(len(flags)), device=device)])


class _NoOpProbe:
    """Samples of the parameters and gradients of one optimizer just before its step, compared right after it."""

    def __init__(self, optimizer: Any, params: list[torch.Tensor], size: int, finite: torch.Tensor) -> None:
        self.params = params
        self.size = size
        self.before = self._sample(params)
        grads = self._sample([p.grad for p in params])  # type: ignore[misc]
        # only finite steps are judged: a step with a NaN/Inf gradient anywhere may be withheld on purpose
        # (GradScaler, a guard's device-side found_inf), which leaves the weights as they were
        self.live = (grads != 0) & torch.isfinite(grads) & finite.to(grads.device)
        self.result: tuple[torch.Tensor, torch.Tensor] | None = None
        self.cancelled = False
        self.lrs = [float(g.get("lr", math.nan)) for g in optimizer.param_groups]
        self.handle = optimizer.register_step_post_hook(self._after_step)

    def _sample(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([flat_sample(local_tensor(t), self.size).float() for t in tensors])  # a copy

    def _after_step(self, _optimizer: Any, _args: Any, _kwargs: Any) -> None:
        # (removed later, in on_train_batch_end: torch iterates over the hooks while calling this one)
        if self.result is not None or self.cancelled:
            return
        if all(p.grad is None for p in self.params):
            self.cancelled = True  # the step was cancelled (gradients dropped before it): nothing to judge
            return
        with torch.no_grad():
            moved = (self._sample([p.detach() for p in self.params]) != self.before) & self.live
            self.result = (self.live.sum(), moved.sum())

    def close(self) -> None:
        self.handle.remove()


#: Settings that have no effect (``_validation.check_unused``).
_UNUSED = (
    Unused(
        ("noise_scale_ratio", "noise_scale_min_checks", "noise_scale_decay"),
        lambda a: not a["log_noise_scale"],
        "`log_noise_scale=False`",
        "set it to True",
    ),
    Unused(
        ("replica_tolerance",), lambda a: not a["check_replicas"], "`check_replicas=False`", "set it to True"
    ),
)


class SilentBugDetector(DiagCallback):
    """Catch the training bugs that crash nothing: the loss just ends up worse and nobody knows why.

    At check steps it samples a few numbers and checks six invariants of healthy runs. By default the check steps
    are step 0 and Lightning's logging steps (``Trainer(log_every_n_steps)``), where the other callbacks read
    their values anyway; ``check_every_n_steps`` samples every n steps instead. Other steps cost a few integer
    comparisons and no host sync: what a check must see on the step after it (whether gradients were cleared,
    whether the next batch is the same) is judged on the device there and read at the next check. A check makes
    a few small host reads and, under DDP, gathers one vector across ranks (every rank calls it, at the same
    steps).

    1. ``optimizer_no_op``: the step changed none of the sampled parameter elements that had a non-zero gradient
       (LR 0 in every group, updates below the weights' precision), or, at the first step, parameters receive
       gradients that no optimizer holds (the optimizer was built over a copy of the model or another module, or
       layers were replaced after ``configure_optimizers``). A step cancelled on purpose (GradScaler overflow,
       NaNGuard skip) is not judged.
    2. ``stale_gradients``: a gradient was never cleared between two steps of its optimizer (manual optimization
       without ``zero_grad``, an overridden ``optimizer_zero_grad``): each step re-applies the previous gradients.
       Gradient accumulation (``accumulate_grad_batches``) and zeroing before or after the step are healthy.
    3. ``wrong_mode``: a sub-tree with dropout/BatchNorm that a ``.eval()`` reached is still trained (an
       optimizer holds parameters of it that require grad); in validation, a sub-tree switched with ``.train()``,
       or BatchNorm running statistics that grew during validation. Frozen sub-modules and teachers in eval mode,
       BatchNorm layers put in eval one by one and Monte-Carlo dropout are not flagged.
    4. ``replica_divergence`` (DDP): a checksum (norm and sum) of every parameter and float buffer, compared across
       ranks; names the first diverging tensor. BatchNorm running statistics are left out: each rank's forward
       updates them with its own batch between DDP's buffer broadcasts, so they differ in healthy runs. Skipped
       under FSDP, FSDP2, DeepSpeed and tensor parallelism (sharded parameters are not replicas).
    5. ``repeated_data``: a fingerprint of a few values of every batch tensor, compared between the check step's
       batch and the next one (same epoch), and across ranks (DDP, FSDP2 data parallelism; not across the ranks of
       a tensor-parallel mesh, which share their batch on purpose).
    6. ``grad_noise_scale``: the simple gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` of McCandlish et al.
       (2018), from what the step computes anyway: the squared norms of the per-micro-batch, per-rank gradients
       (read by tensor hooks before accumulation and before DDP's averaging) against the norm of their mean (the
       step's gradient). Needs more than one micro-batch per step: ``accumulate_grad_batches > 1`` or DDP. An
       ``info`` finding when the global batch is ``noise_scale_ratio`` times below or above it.

    Why one callback: the six checks share the sampling schedule, the per-check bookkeeping (the probes of the
    optimizer step, the one cross-rank gather) and one cost budget; none fits an existing callback's job
    (GradNormMonitor logs gradient norms, NaNGuard guards non-finite values, SanityCheck runs once before
    training), and each can be switched off alone.

    Args:
        check_every_n_steps: optimizer steps between two checks (``>= 1``; step 0 is always checked), or
            ``None``: check at step 0 and at Lightning's logging steps.
        patience: consecutive checks a condition must hold before it is reported (``>= 1``); replica divergence
            and validation-mode problems are reported at the first check that sees them.
        check_optimizer: run check 1.
        check_stale_gradients: run check 2.
        check_mode: run check 3.
        check_replicas: run check 4 (DDP only).
        check_repeated_data: run check 5.
        log_noise_scale: measure and log the gradient noise scale (check 6).
        replica_tolerance: relative difference of a checksum across ranks that counts as divergence, in
            ``(0, 1)``; DDP replicas are bitwise identical, so the default is tight.
        noise_scale_ratio: the global batch this many times below or above ``B_simple`` is reported (``> 1``).
        noise_scale_min_checks: measurements averaged before the noise scale is judged (``>= 1``).
        noise_scale_decay: decay of the running averages of ``tr(Sigma)`` and ``|G|^2`` across checks, in
            ``[0, 1)``.
        sample_size: elements sampled per tensor by the parameter, gradient and batch fingerprints (``>= 1``).

    Logged metrics:
        ============================  ====================================================================
        key                           value
        ============================  ====================================================================
        ``diag/grad_noise/scale``     running ``B_simple`` in samples, written to the loggers at check steps
        ============================  ====================================================================

        Check steps are rarely Lightning's ``log_every_n_steps`` flushes, so the value goes straight to the
        loggers (global rank 0) rather than through ``self.log``; it is not in ``trainer.callback_metrics``.

    Findings:
        ``optimizer_no_op`` (error: nothing trains; warning: some parameters with gradients are held by no
        optimizer), ``stale_gradients`` (error), ``wrong_mode`` (warning), ``replica_divergence`` (error for
        parameters; warning for float buffers other than norm-layer running statistics), ``repeated_data``
        (error across steps, warning across ranks), ``grad_noise_scale`` (info).

    Raises:
        ValueError: at construction for an interval, patience, sample size or minimum below 1, a tolerance outside
            ``(0, 1)``, a decay outside ``[0, 1)`` or a ratio ``<= 1``.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_diag import SilentBugDetector
        >>> trainer = pl.Trainer(callbacks=[SilentBugDetector(check_every_n_steps=50)])

    Note:
        Checks look at samples, so they are exact about what they see and silent about the rest: a bug that
        toggles within one step, or a batch repeated only across epochs, is not seen. The stale-gradient probe
        relies on hooks of the parameters, which FSDP2's sharded parameters do not run; it still catches a
        gradient re-applied untouched there. The noise scale assumes equal micro-batches and Lightning's division
        of the loss by ``accumulate_grad_batches`` (automatic optimization only); under a GradScaler the incoming
        gradients are divided by the scale.

    """

    def __init__(
        self,
        check_every_n_steps: int | None = None,
        patience: int = 2,
        check_optimizer: bool = True,
        check_stale_gradients: bool = True,
        check_mode: bool = True,
        check_replicas: bool = True,
        check_repeated_data: bool = True,
        log_noise_scale: bool = True,
        replica_tolerance: float = 1e-6,
        noise_scale_ratio: float = 10.0,
        noise_scale_min_checks: int = 5,
        noise_scale_decay: float = 0.9,
        sample_size: int = 64,
    ) -> None:
        super().__init__()
        if check_every_n_steps is not None:
            check_int("check_every_n_steps", check_every_n_steps, minimum=1)
        check_int("patience", patience, minimum=1)
        check_fraction("replica_tolerance", replica_tolerance, low_open=True, high_open=True)
        check_range("noise_scale_ratio", noise_scale_ratio, 1.0, low_open=True)
        check_int("noise_scale_min_checks", noise_scale_min_checks, minimum=1)
        check_fraction("noise_scale_decay", noise_scale_decay, high_open=True)
        check_int("sample_size", sample_size, minimum=1)
        for name, flag in (
            ("check_optimizer", check_optimizer),
            ("check_stale_gradients", check_stale_gradients),
            ("check_mode", check_mode),
            ("check_replicas", check_replicas),
            ("check_repeated_data", check_repeated_data),
            ("log_noise_scale", log_noise_scale),
        ):
            check_bool(name, flag)
        check_unused(SilentBugDetector.__init__, locals(), _UNUSED)
        self.check_every_n_steps = check_every_n_steps
        self.patience = patience
        self.check_optimizer = check_optimizer
        self.check_stale_gradients = check_stale_gradients
        self.check_mode = check_mode
        self.check_replicas = check_replicas
        self.check_repeated_data = check_repeated_data
        self.log_noise_scale = log_noise_scale
        self.replica_tolerance = float(replica_tolerance)
        self.noise_scale_ratio = float(noise_scale_ratio)
        self.noise_scale_min_checks = noise_scale_min_checks
        self.noise_scale_decay = float(noise_scale_decay)
        self.sample_size = sample_size
        self._reset_state()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(check_every_n_steps=self.check_every_n_steps, patience=self.patience)

    def _reset_state(self) -> None:
        self._streaks = {k: Streak(self.patience) for k in ("no_op", "stale", "mode", "repeat", "ranks")}
        self._noise = NoiseScale(self.noise_scale_decay)
        self._held_checked = False
        self._drop_probes()

    def _drop_probes(self) -> None:
        for probe in (getattr(self, n, None) for n in ("_square", "_stale", "_noop")):
            if probe is not None:
                probe.close()
        if getattr(self, "_stale_start", None) is not None:
            self._stale_start.remove()
        self._cycle_step = -1  # the check step in progress
        self._opt_checked = -1  # the check step whose first optimizer step was examined
        self._square: _SquareProbe | None = None
        self._stale_start: Any = None  # the optimizer post-hook that starts the stale-gradient probe
        self._stale: _StaleProbe | None = None
        self._noop: _NoOpProbe | None = None
        self._fp: torch.Tensor | None = None  # this check's batch fingerprint
        # (fingerprint, batch_idx, epoch) of the check's batch, to compare with the batch that follows it
        self._fp_next: tuple[torch.Tensor, int, int] | None = None
        self._micro_batch: int | None = None
        self._bn_before: torch.Tensor | None = None
        # (kind, device tensor, context) judged on the device after a check, read at the next one
        self._deferred: list[tuple[str, torch.Tensor, dict[str, int]]] = []

    def noise_scale(self) -> float:
        """The current running estimate of ``B_simple`` (NaN until measured)."""
        return self._noise.scale

    # -- training batches -------------------------------------------------------------------------------------
    def _is_check_step(self, trainer: Any, step: int) -> bool:
        if self.check_every_n_steps is not None:
            return step % self.check_every_n_steps == 0
        every = max(int(getattr(trainer, "log_every_n_steps", 50) or 1), 1)
        return step == 0 or (step + 1) % every == 0  # Lightning's logging steps (and the first step)

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # A quiet step: two integer comparisons. The work of a check runs under no_grad in the helpers.
        step = trainer.global_step
        if self._fp_next is not None:
            with torch.no_grad():
                self._compare_next_batch(trainer, batch, batch_idx)
        if step == self._cycle_step or not self._is_check_step(trainer, step):
            return
        self._cycle_step = step
        with torch.no_grad():
            self._read_deferred(trainer)
            self._start_check(trainer, pl_module, batch, batch_idx)

    def _compare_next_batch(self, trainer: Any, batch: Any, batch_idx: int) -> None:
        """The batch after a check's batch: compared on the device, read at the next check (no sync here)."""
        if self._fp_next is None:
            return
        previous, previous_idx, epoch = self._fp_next
        self._fp_next = None
        if batch_idx == previous_idx + 1 and epoch == trainer.current_epoch:
            current = fingerprint(tensors(batch, limit=16), self.sample_size).to(previous.device)
            same = (previous == current).all() & (previous[-1] > 0)
            where = {"batch_idx": batch_idx, "epoch": int(epoch)}
            self._deferred.append(("repeat", same.float().reshape(1), where))

    def _read_deferred(self, trainer: Any) -> None:
        """Judge what the steps after the last check left on the device: one host read, at a check step."""
        deferred, self._deferred = self._deferred, []
        if not deferred:
            return
        values = torch.cat([v.detach().float().reshape(-1).cpu() for _, v, _ in deferred]).tolist()
        offset = 0
        for kind, tensor, where in deferred:
            part, offset = values[offset : offset + tensor.numel()], offset + tensor.numel()
            if kind == "repeat":
                if self._streaks["repeat"].update(part[0] > 0):
                    self._report_repeat(trainer, int(where["batch_idx"]), int(where["epoch"]))
            elif kind == "stale":
                count, judged = int(part[0]), int(part[1])
                if self._streaks["stale"].update(judged > 0 and count == judged):
                    self._report_stale(trainer, int(where["step"]), int(where["next_step"]), count)

    def _start_check(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.check_repeated_data:
            found = tensors(batch, limit=16)
            self._fp = fingerprint(found, self.sample_size) if found else None
            if self._fp is not None:
                self._fp_next = (self._fp, batch_idx, int(trainer.current_epoch))
        if self.check_mode:
            held = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
            problems = mode_problems(pl_module, True, lambda p: p.requires_grad and id(p) in held)
            if self._streaks["mode"].update(bool(problems)):
                self._report_train_mode(trainer, problems)
        if self.log_noise_scale and self._square is None and self._noise_measurable(trainer, pl_module):
            self._micro_batch = batch_size(batch) or None  # no batch size to be found: no measurement
            if self._micro_batch:
                params = [p for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]]
                self._square = _SquareProbe([p for p in params if p.requires_grad])

    def _noise_measurable(self, trainer: Any, pl_module: Any) -> bool:
        if not getattr(pl_module, "automatic_optimization", True) or len(trainer.optimizers) != 1:
            return False
        micro = int(getattr(trainer, "accumulate_grad_batches", 1) or 1) * int(
            getattr(trainer, "world_size", 1)
        )
        if micro < 2:
            return False
        return _replicated(trainer, pl_module)

    @override
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if self._square is not None:
            self._square.open()

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        step = trainer.global_step
        stale = self._stale
        if stale is not None and stale.optimizer is optimizer and step > stale.step:
            self._stale = None
            with torch.no_grad():  # judged on the device now, read at the next check
                self._deferred.append(("stale", stale.verdict(), {"step": stale.step, "next_step": step}))
        if not self._held_checked and self.check_optimizer:
            self._held_checked = True
            self._check_held(trainer, pl_module)
        if step != self._cycle_step or step == self._opt_checked:
            return
        self._opt_checked = step
        with torch.no_grad():
            self._probe_step(trainer, pl_module, optimizer, step)

    def _probe_step(self, trainer: Any, pl_module: Any, optimizer: Any, step: int) -> None:
        # (the shared list was built by the first asker: a skip since then may have dropped some gradients)
        params = [p for p in step_context(trainer, pl_module, optimizer).params if p.grad is not None]
        self._gather_and_judge(trainer, pl_module, optimizer)
        if not callable(getattr(optimizer, "register_step_post_hook", None)):
            return  # not a torch optimizer: its step cannot be observed
        if self.check_optimizer and params:
            if self._noop is not None:
                self._noop.close()
            finite = torch.isfinite(step_context(trainer, pl_module, optimizer).grad_stats().total_norm)
            self._noop = _NoOpProbe(optimizer, _per_group(optimizer, params), self.sample_size, finite)
        if self.check_stale_gradients and params:
            if self._stale is not None:
                self._stale.close()
            watched = _spread(list(params), STALE_TENSORS)

            def start_stale(opt: Any, _args: Any, _kwargs: Any) -> None:
                if self._stale is not None and self._stale.step == step:
                    return  # once per check (removed in on_train_batch_end)
                live = [p for p in watched if p.grad is not None and p.requires_grad]  # (hooks need both)
                if live:  # gradients dropped before the step (a cancelled step): nothing to watch
                    self._stale = _StaleProbe(opt, step, live, self.sample_size)

            self._stale_start = optimizer.register_step_post_hook(start_stale)

    def _drop_stale_start(self) -> None:
        if self._stale_start is not None:
            self._stale_start.remove()
            self._stale_start = None

    def _gather_and_judge(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """One vector per rank (checksums, batch fingerprint, noise terms), gathered once, judged on every rank."""
        distributed = is_distributed(trainer)
        device = pl_module.device
        parts: dict[str, torch.Tensor] = {}
        tensor_names: list[str] = []
        replicas = distributed and self.check_replicas and _replicated(trainer, pl_module)
        if replicas:
            named = [(n, p.detach()) for n, p in pl_module.named_parameters()]
            named += _replicated_buffers(pl_module)
            tensor_names = [n for n, _ in named]
            tensors = [t.float() for _, t in named]
            if tensors:
                norms = torch.stack(list(torch._foreach_norm(tensors)))
                sums = torch.stack([t.sum() for t in tensors])
                parts["replicas"] = torch.stack([norms, sums], dim=1).flatten().to(device)
        if distributed and self.check_repeated_data and not _model_parallel(pl_module):
            fp = self._fp if self._fp is not None else fingerprint([], self.sample_size)
            parts["data"] = fp.to(device)
        if self._square is not None:
            micro = self._square.close()
            self._square = None
            accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
            stats = step_context(trainer, pl_module, optimizer).grad_stats()
            if len(micro) == accumulate and stats.norms.numel():
                local = torch.stack(micro).mean() * accumulate**2
                scaler = _lightning.amp_scaler(trainer)
                if scaler is not None:
                    local = local / _lightning.loss_scale(scaler).to(local.device) ** 2
                parts["noise"] = torch.stack(
                    [
                        local.to(device),
                        stats.total_norm.float().to(device) ** 2,
                        torch.ones((), device=device),
                    ]
                )
            else:  # a partial accumulation window (end of epoch): not comparable, every rank says so
                parts["noise"] = torch.zeros(3, device=device)
        if not parts:
            return
        layout = [(k, v.numel()) for k, v in parts.items()]
        vector = torch.cat([v.float().reshape(-1) for v in parts.values()])
        table = trainer.strategy.all_gather(vector) if distributed else vector.unsqueeze(0)
        table = table.reshape(-1, vector.numel()).detach().cpu()  # the one host read of this check
        offset = 0
        columns: dict[str, torch.Tensor] = {}
        for key, size in layout:
            columns[key], offset = table[:, offset : offset + size], offset + size
        if "replicas" in columns:
            self._judge_replicas(trainer, columns["replicas"], tensor_names)
        if "data" in columns:
            rows = columns["data"]
            same = bool(rows[0, -1] > 0) and all(torch.equal(rows[0], r) for r in rows[1:])
            if self._streaks["ranks"].update(same):
                self._report_rank_repeat(trainer, rows.shape[0])
        if "noise" in columns:
            self._judge_noise(trainer, columns["noise"])

    # -- judgements ------------------------------------------------------------------------------------------
    def _note(
        self,
        trainer: Any,
        code: str,
        severity: Severity,
        message: str,
        *,
        evidence: dict[str, Any],
        advice: list[str],
        key: str = "",
    ) -> None:
        """Record one finding (the one place that calls :meth:`DiagCallback.record`)."""
        self.record(trainer, Verdict(code, severity, message, evidence=evidence, advice=advice), key=key)

    def _check_held(self, trainer: Any, pl_module: Any) -> None:
        held = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        with_grad = [
            (n, p) for n, p in pl_module.named_parameters() if p.requires_grad and p.grad is not None
        ]
        unheld = [n for n, p in with_grad if id(p) not in held]
        if not unheld:
            return
        trained = len(with_grad) - len(unheld)
        severity: Severity = "error" if trained == 0 else "warning"
        listed = ", ".join(unheld[:5]) + (f" and {len(unheld) - 5} more" if len(unheld) > 5 else "")
        what = (
            "no parameter the optimizer holds receives a gradient: nothing trains"
            if trained == 0
            else f"{trained} other parameter tensor(s) train"
        )
        self._note(
            trainer,
            "optimizer_no_op",
            severity,
            f"{len(unheld)} parameter tensor(s) receive gradients but no optimizer holds them ({listed}); {what}.",
            evidence={
                "unheld_tensors": len(unheld),
                "held_tensors_with_grad": trained,
                "first_unheld": unheld[0],
                "optimizers": len(trainer.optimizers),
            },
            advice=_UNHELD_ADVICE,
            key="unheld",
        )

    @override
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        probe = self._noop
        if probe is None or int(trainer.global_step) <= self._cycle_step:
            return  # accumulating: the optimizer has not stepped yet
        self._drop_stale_start()  # a step skipped by the GradScaler never ran its post-hooks
        self._noop = None
        probe.close()
        if probe.cancelled or probe.result is None:
            return  # the step was skipped or cancelled: not judged
        active, moved = (int(v) for v in torch.stack(probe.result).tolist())
        if active == 0:
            return  # no sampled element had a gradient to apply
        if self._streaks["no_op"].update(moved == 0):
            lrs = ", ".join(f"{lr:g}" for lr in probe.lrs)
            self._note(
                trainer,
                "optimizer_no_op",
                "error",
                f"The optimizer step changed no parameter at {self.patience} consecutive checks (last at step "
                f"{self._cycle_step}): {active} sampled elements of {len(probe.params)} tensor(s) had a non-zero "
                f"gradient and none moved. Learning rate per group: {lrs}.",
                evidence={
                    "step": self._cycle_step,
                    "sampled_elements": active,
                    "tensors": len(probe.params),
                    "lr": lrs,
                    "checks": self.patience,
                },
                advice=_NO_OP_ADVICE,
                key="no_op",
            )

    def _judge_replicas(self, trainer: Any, table: torch.Tensor, names: list[str]) -> None:
        bad = sorted({i // 2 for i in divergent_entries(table, self.replica_tolerance)})
        if not bad:
            return
        n_params = sum(1 for _ in trainer.lightning_module.parameters())
        params = [i for i in bad if i < n_params]
        buffers = [i for i in bad if i >= n_params]
        world = table.shape[0]
        if params:
            first = names[params[0]]
            values = table[:, 2 * params[0]].tolist()
            self._note(
                trainer,
                "replica_divergence",
                "error",
                f"{len(params)} parameter tensor(s) differ across the {world} ranks at step {trainer.global_step}; "
                f"the first is {first} (norm per rank: {', '.join(f'{v:.6g}' for v in values)}). Each rank now "
                "trains a different model and the checkpoint keeps rank 0's.",
                evidence={
                    "first_tensor": first,
                    "diverging_parameters": len(params),
                    "norms_per_rank": ", ".join(f"{v:.9g}" for v in values),
                    "world_size": world,
                },
                advice=_REPLICA_ADVICE,
                key="parameters",
            )
        if buffers:
            first = names[buffers[0]]
            self._note(
                trainer,
                "replica_divergence",
                "warning",
                f"{len(buffers)} buffer(s) differ across the {world} ranks at step {trainer.global_step} (first: "
                f"{first}): each rank computes with different constants.",
                evidence={"first_tensor": first, "diverging_buffers": len(buffers), "world_size": world},
                advice=_BUFFER_ADVICE,
                key="buffers",
            )

    def _judge_noise(self, trainer: Any, rows: torch.Tensor) -> None:
        if not bool((rows[:, 2] > 0).all()) or not self._micro_batch:
            return
        small_sq = float(rows[:, 0].mean())
        big_sq = float(rows[0, 1])
        if not small_sq - big_sq > NOISE_FLOOR * small_sq:
            return  # the micro-batch gradients agree to rounding (identical batches): no noise to measure
        micro = int(getattr(trainer, "accumulate_grad_batches", 1) or 1) * rows.shape[0]
        batch_small = float(self._micro_batch)
        batch_big = batch_small * micro
        trace, grad_sq = noise_scale_terms(small_sq, big_sq, batch_small, batch_big)
        self._noise.update(trace, grad_sq)
        scale = self._noise.scale
        if not math.isfinite(scale) or scale <= 0:
            return
        # straight to the loggers: a check step is rarely one of Lightning's `log_every_n_steps` flushes
        _logging.log_direct(trainer, {"diag/grad_noise/scale": scale}, step=trainer.global_step)
        if self._noise.count < self.noise_scale_min_checks:
            return
        ratio = batch_big / scale
        if 1 / self.noise_scale_ratio <= ratio <= self.noise_scale_ratio:
            return
        below = ratio < 1
        self._note(
            trainer,
            "grad_noise_scale",
            "info",
            f"The global batch ({batch_big:g} samples) is {1 / ratio if below else ratio:.1f}x "
            f"{'below' if below else 'above'} the gradient noise scale B_simple = {scale:.4g} (averaged over "
            f"{self._noise.count} checks).",
            evidence={
                "noise_scale": scale,
                "global_batch": batch_big,
                "batch_over_noise_scale": ratio,
                "micro_batch": batch_small,
                "micro_batches": micro,
                "checks": self._noise.count,
            },
            advice=[
                "Larger batches (up to about B_simple, with the learning rate scaled up) would reach the same loss "
                "in fewer steps at nearly the same number of samples."
                if below
                else "Beyond B_simple, larger batches bring little: a smaller batch (more steps) would reach the "
                "same loss with less compute.",
                "B_simple grows as training progresses: judge it late in training, not at the start.",
            ],
            key="below" if below else "above",
        )

    def _report_repeat(self, trainer: Any, batch_idx: int, epoch: int) -> None:
        self._note(
            trainer,
            "repeated_data",
            "error",
            f"Consecutive training batches were identical at {self.patience} consecutive checks (last: batches "
            f"{batch_idx - 1} and {batch_idx} of epoch {epoch}): the model sees the same data again and again.",
            evidence={"batch_idx": batch_idx, "epoch": epoch, "checks": self.patience},
            advice=_REPEAT_ADVICE,
            key="steps",
        )

    def _report_rank_repeat(self, trainer: Any, world: int) -> None:
        self._note(
            trainer,
            "repeated_data",
            "warning",
            f"All {world} ranks trained on the same batch at {self.patience} consecutive checks (last at step "
            f"{trainer.global_step}): data parallelism brings no new samples.",
            evidence={"world_size": world, "checks": self.patience},
            advice=_RANK_REPEAT_ADVICE,
            key="ranks",
        )

    def _report_stale(self, trainer: Any, step: int, next_step: int, count: int) -> None:
        self._note(
            trainer,
            "stale_gradients",
            "error",
            f"Gradients were not cleared between optimizer steps at {self.patience} consecutive checks (last: steps "
            f"{step} and {next_step}): all {count} watched gradient tensors still held the previous step's "
            "gradient when the next one was added, so every step re-applies all earlier gradients.",
            evidence={"watched_tensors": count, "step": step, "checks": self.patience},
            advice=_STALE_ADVICE,
        )

    def _report_train_mode(self, trainer: Any, problems: list[tuple[str, int]]) -> None:
        listed = ", ".join(f"{n or '<the whole model>'} ({k} layer(s))" for n, k in problems[:5])
        self._note(
            trainer,
            "wrong_mode",
            "warning",
            f"During training, {len(problems)} trained sub-module(s) are in eval mode with dropout/BatchNorm "
            f"inside at {self.patience} consecutive checks: {listed}. Dropout is off and BatchNorm uses frozen "
            "running statistics there.",
            evidence={
                "phase": "train",
                "modules": ", ".join(n or "<root>" for n, _ in problems),
                "mode_sensitive_layers": sum(k for _, k in problems),
            },
            advice=_MODE_ADVICE,
            key="train",
        )

    # -- validation -----------------------------------------------------------------------------------------
    @override
    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.check_mode:
            counts = bn_batches_tracked(pl_module.modules())
            self._bn_before = counts.clone() if counts is not None else None

    @override
    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self.check_mode or batch_idx != 0 or dataloader_idx != 0:
            return
        problems = mode_problems(pl_module, training=False)
        if problems:
            listed = ", ".join(f"{n or '<the whole model>'} ({k} layer(s))" for n, k in problems[:5])
            self._note(
                trainer,
                "wrong_mode",
                "warning",
                f"During validation, {len(problems)} sub-module(s) with dropout/BatchNorm are in train mode: "
                f"{listed}.",
                evidence={
                    "phase": "validation",
                    "modules": ", ".join(n or "<root>" for n, _ in problems),
                    "mode_sensitive_layers": sum(k for _, k in problems),
                },
                advice=_VAL_MODE_ADVICE,
                key="validation",
            )

    @override
    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        before, self._bn_before = self._bn_before, None
        if before is None:
            return
        after = bn_batches_tracked(pl_module.modules())
        if after is None:
            return
        grown = int(after - before.to(after.device))
        if grown > 0:
            self._note(
                trainer,
                "wrong_mode",
                "warning",
                f"BatchNorm running statistics were updated {grown} time(s) during validation: validation data "
                "leaked into the statistics the model evaluates with.",
                evidence={"phase": "validation", "bn_updates": grown},
                advice=_VAL_MODE_ADVICE,
                key="bn_validation",
            )

    # -- end and state --------------------------------------------------------------------------------------
    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        with torch.no_grad():
            self._read_deferred(trainer)  # the last check's follow-ups get their say
        self._drop_probes()

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._drop_probes()
        super().on_exception(trainer, pl_module, exception)

    @override
    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        # A check still waiting for the next step (stale gradients, the next batch) cannot travel in a checkpoint:
        # drop it here, so a run resumed from this checkpoint and the run that went on decide alike. Results
        # already judged on the device travel in `state_dict`.
        if self._stale is not None:
            self._stale.close()
            self._stale = None
        self._drop_stale_start()
        self._fp_next = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "streaks": {k: s.count for k, s in self._streaks.items()},
            "noise": self._noise.state_dict(),
            "held_checked": self._held_checked,
            # results judged on the device, not read yet (read here: saving a checkpoint is not a quiet step)
            "deferred": [
                {"kind": kind, "values": value.detach().float().reshape(-1).cpu().tolist(), **where}
                for kind, value, where in self._deferred
            ],
            "findings": self._findings_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, count in state_dict.get("streaks", {}).items():
            if key in self._streaks:
                self._streaks[key].count = int(count)
        self._noise.load_state_dict(state_dict.get("noise", {}))
        self._held_checked = bool(state_dict.get("held_checked", self._held_checked))
        self._deferred = [
            (
                str(entry["kind"]),
                torch.tensor([float(v) for v in entry["values"]]),
                {k: int(v) for k, v in entry.items() if k not in ("kind", "values")},
            )
            for entry in state_dict.get("deferred", [])
        ]
        self._load_findings_state(state_dict)
