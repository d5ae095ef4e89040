"""The rules behind SilentBugDetector: errors that raise nothing and produce no NaN.

Everything here is pure torch + stdlib (no Lightning): the check schedule, strided samples and fingerprints of
tensors and the two repeated-data rules, the rule for parameters no optimizer holds, the module-mode rule, the
checksums of replicas and their cross-rank comparison, the gradient-noise-scale estimator of McCandlish et al.
(2018, "An Empirical Model of Large-Batch Training", appendix A.1), a running estimate of it and its judgement,
and the consecutive-check counter that turns an observation into a finding. The words of the findings are in
:mod:`lightning_diag.core.silent.verdicts`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from lightning_diag.core.grad_stats import tensor_norms
from lightning_diag.core.layers import is_norm_layer

__all__ = [
    "NOISE_FLOOR",
    "NoiseSample",
    "NoiseScale",
    "Streak",
    "all_stale",
    "batch_over_noise_scale",
    "bn_batches_tracked",
    "bn_updates",
    "checksums",
    "divergent_entries",
    "diverging_tensors",
    "fingerprint",
    "flat_sample",
    "holds_dtensors",
    "is_check_step",
    "is_mode_sensitive",
    "mode_problems",
    "model_parallel",
    "no_op_seen",
    "noise_row",
    "noise_sample",
    "noise_scale_terms",
    "replica_checksums",
    "replicated_buffers",
    "same_batch",
    "same_on_every_rank",
    "unheld_names",
]

#: Batch tensors that enter a batch fingerprint (the rest of a batch is ignored).
MAX_FINGERPRINT_TENSORS = 8
#: Relative gap between the micro-batch and the mean squared gradient norm below which it is float32 rounding.
NOISE_FLOOR = 1e-5


def is_check_step(step: int, every_n_steps: int | None, log_every_n_steps: int) -> bool:
    """Whether optimizer step ``step`` is a check step: every ``every_n_steps`` steps, or (``None``) step 0 and the
    logging steps of ``log_every_n_steps`` (Lightning logs after the batch whose ``step + 1`` is a multiple).

    Example:
        >>> [s for s in range(12) if is_check_step(s, None, 5)], [s for s in range(12) if is_check_step(s, 4, 5)]
        ([0, 4, 9], [0, 4, 8])
    """
    if every_n_steps is not None:
        return step % every_n_steps == 0
    every = max(log_every_n_steps, 1)
    return step == 0 or (step + 1) % every == 0


def flat_sample(t: torch.Tensor, size: int) -> torch.Tensor:
    """Up to ``size`` elements of ``t`` at evenly spaced flat positions (the same positions for the same shape).

    A strided view of the flattened tensor (one view op for a contiguous tensor), no host synchronisation. A sparse
    tensor (``nn.Embedding(sparse=True)`` gradients) is sampled from its dense form: a copy, at check steps only.
    """
    if t.layout != torch.strided:
        t = t.to_dense()
    numel = t.numel()
    stride = max(1, numel // max(size, 1))
    count = min(size, -(-numel // stride)) if numel else 0
    if t.is_contiguous():
        return t.detach().as_strided((count,), (stride,), t.storage_offset())
    return t.detach().reshape(-1)[::stride][:size]


def fingerprint(tensors: Sequence[torch.Tensor], size: int = 64) -> torch.Tensor:
    """A fingerprint of a batch: a fixed-length float vector, equal for equal batches.

    The strided sample (:func:`flat_sample`) of each of the first ``MAX_FINGERPRINT_TENSORS`` tensors, zero-padded to
    ``size`` values each, then each tensor's sum and sum of squares (a sample alone can alias: with a stride that
    divides the row width it reads the same pixel of every image, and image borders are 0 everywhere), then each
    tensor's element count and the number of tensors: ``MAX_FINGERPRINT_TENSORS * (size + 3) + 1`` numbers. Two
    batches with the same values give bitwise the same vector; a batch holding NaN in its sample never compares
    equal, so it is never called a repeat.
    """
    device = tensors[0].device if tensors else torch.device("cpu")
    width = MAX_FINGERPRINT_TENSORS * size
    kept = tensors[:MAX_FINGERPRINT_TENSORS]
    samples = [flat_sample(t, size).to(device=device, dtype=torch.float32) for t in kept]
    values = torch.cat(samples) if samples else torch.zeros(0, device=device)
    moments = torch.zeros(2 * MAX_FINGERPRINT_TENSORS, device=device)
    for i, t in enumerate(kept):
        whole = t.detach().to_dense() if t.layout != torch.strided else t.detach()
        whole = whole.to(device=device, dtype=torch.float64)
        moments[2 * i] = whole.sum().float()
        moments[2 * i + 1] = whole.square().sum().float()
    # element counts (they also fix where one tensor's sample ends), then the number of tensors
    counts = (
        [float(t.numel()) for t in kept]
        + [0.0] * (MAX_FINGERPRINT_TENSORS - len(kept))
        + [float(len(tensors))]
    )
    padded = torch.nn.functional.pad(values, (0, width - values.numel()))
    return torch.cat([padded, moments, torch.tensor(counts, dtype=torch.float32, device=device)])


def same_batch(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """Whether two batch fingerprints are equal and the first saw a tensor (a 0-d bool device tensor, no sync)."""
    return (previous == current).all() & (previous[-1] > 0)


def same_on_every_rank(rows: torch.Tensor) -> bool:
    """Whether every rank's fingerprint (a ``[world_size, n]`` host table) equals rank 0's, which saw a tensor."""
    return bool(rows[0, -1] > 0) and all(torch.equal(rows[0], r) for r in rows[1:])


# -- parameters no optimizer holds -------------------------------------------------------------------------------
def unheld_names(with_grad: Sequence[tuple[str, torch.Tensor]], held: set[int]) -> tuple[list[str], int]:
    """The names of the parameters that received a gradient but no optimizer holds (``id`` not in ``held``), and
    how many of the others train.

    Example:
        >>> a, b = torch.zeros(1), torch.zeros(1)
        >>> unheld_names([("a", a), ("b", b)], {id(a)})
        (['b'], 1)
    """
    unheld = [n for n, p in with_grad if id(p) not in held]
    return unheld, len(with_grad) - len(unheld)


def no_op_seen(active: int, moved: int) -> bool | None:
    """The no-op rule at one check: ``True`` when none of the ``active`` sampled elements (those with a finite,
    non-zero gradient) moved, ``None`` when there was nothing to judge.
    """
    return None if active == 0 else moved == 0


def all_stale(stale: int, judged: int) -> bool:
    """The stale-gradient rule: every watched gradient that had something to apply was stale."""
    return judged > 0 and stale == judged


# -- replicas ----------------------------------------------------------------------------------------------------
def replicated_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Float buffers that must be equal on every rank: not the running statistics of norm layers, which each
    rank's forward updates with its own batch between DDP's buffer broadcasts.
    """
    found = []
    for prefix, sub in module.named_modules():
        if is_norm_layer(sub):
            continue
        for name, buffer in sub.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point():
                found.append((f"{prefix}.{name}" if prefix else name, buffer.detach()))
    return found


def checksums(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[norm_0, sum_0, norm_1, sum_1, ...]`` of ``tensors`` in float32: one foreach pass, no host read."""
    floats = [t.detach().float() for t in tensors]
    return torch.stack([tensor_norms(floats), torch.stack([t.sum() for t in floats])], dim=1).flatten()


def replica_checksums(module: nn.Module) -> tuple[list[str], int, torch.Tensor | None]:
    """What ranks compare of a replicated model: the names of its parameters then of its
    :func:`replicated_buffers`, how many of them are parameters, and their :func:`checksums` (``None``: no tensor).
    """
    named = [(n, p.detach()) for n, p in module.named_parameters()]
    parameters = len(named)
    named += replicated_buffers(module)
    values = checksums([t for _, t in named]) if named else None
    return [n for n, _ in named], parameters, values


def diverging_tensors(table: torch.Tensor, parameters: int, rtol: float) -> tuple[list[int], list[int]]:
    """The tensors whose :func:`checksums` differ across the rows of a ``[world_size, 2 * n]`` table, split into
    parameters (the first ``parameters`` tensors) and buffers, by index.
    """
    bad = sorted({i // 2 for i in divergent_entries(table, rtol)})
    return [i for i in bad if i < parameters], [i for i in bad if i >= parameters]


def holds_dtensors(params: Iterable[torch.Tensor]) -> bool:
    """Whether some parameter is a DTensor (FSDP2, tensor parallelism): ranks hold shards, not replicas."""
    return any(type(p).__name__ == "DTensor" for p in params)


def model_parallel(module: Any) -> bool:
    """Whether ``module.device_mesh`` has a dimension other than data parallelism (tensor/pipeline parallel ranks
    see the same batch on purpose).
    """
    mesh = getattr(module, "device_mesh", None)
    names = getattr(mesh, "mesh_dim_names", None) or ()
    return any(name != "data_parallel" and mesh[name].size() > 1 for name in names)  # type: ignore[index]


def divergent_entries(gathered: torch.Tensor, rtol: float) -> list[int]:
    """Columns of a ``[world_size, n]`` table whose values differ across rows by more than ``rtol`` (relative).

    A NaN anywhere in a column counts as a difference when not every row holds NaN there.
    """
    table = gathered.detach().double().cpu()
    if table.ndim != 2 or table.shape[0] < 2:
        return []
    nan = torch.isnan(table)
    clean = torch.where(nan, torch.zeros_like(table), table)
    high, low = clean.max(dim=0).values, clean.min(dim=0).values
    scale = torch.maximum(high.abs(), low.abs()).clamp(min=1e-30)
    differs = (high - low) > rtol * scale
    some_nan = nan.any(dim=0) & ~nan.all(dim=0)
    return [int(i) for i in torch.nonzero(differs | some_nan).flatten().tolist()]


# -- module modes ------------------------------------------------------------------------------------------------
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def is_mode_sensitive(module: nn.Module) -> bool:
    """Whether ``train()``/``eval()`` changes what ``module`` computes: dropout with ``p > 0``, or a norm layer
    that keeps running statistics (BatchNorm, InstanceNorm with ``track_running_stats``).
    """
    if isinstance(module, _DROPOUT):
        return float(getattr(module, "p", 0.0)) > 0.0
    if is_norm_layer(module):
        return bool(module.track_running_stats)
    return False


def mode_problems(
    root: nn.Module, training: bool, trained: Callable[[torch.Tensor], bool] | None = None
) -> list[tuple[str, int]]:
    """Sub-trees of ``root`` whose mode is wrong for the phase: ``(qualified name, mode-sensitive layers)`` each.

    In a training phase (``training=True``), the modules in eval mode are wrong when a ``.eval()`` evidently
    reached more than dropout/norm layers: some layer holding *trainable* parameters that is not itself
    mode-sensitive (a Linear, a Conv) is in eval mode too. Then each top-most eval-mode sub-tree that holds a
    mode-sensitive layer and still trains is reported. Not flagged, on purpose: a frozen sub-module in eval mode
    (no trainable parameter: a feature extractor), BatchNorm or dropout layers switched to eval one by one (a
    deliberate "frozen BN statistics" or "no dropout"), and models without a mode-sensitive layer (the mode changes
    nothing).

    In an evaluation phase (``training=False``), the mirror image: a ``.train()`` reached a layer that is neither
    dropout nor a norm layer, and a sub-tree in train mode holds a mode-sensitive layer. Dropout layers switched to
    train one by one (Monte-Carlo dropout) are not flagged.

    ``trained(parameter)`` says whether a parameter is trained (default: ``requires_grad``; the callback also asks
    that an optimizer holds it, so an eval-mode teacher whose flags were left on is not flagged).

    The name of the root module itself is ``""``.
    """
    is_trained = trained or (lambda p: p.requires_grad)

    def _has_trainable(module: nn.Module) -> bool:
        return any(is_trained(p) for p in module.parameters(recurse=False))

    wrong = not training  # the mode flag of a module in the wrong mode

    def plain(sub: nn.Module) -> bool:
        if training:
            return not is_mode_sensitive(sub) and _has_trainable(sub)
        norm_or_dropout = isinstance(sub, _DROPOUT) or is_norm_layer(sub)
        return not norm_or_dropout and next(sub.children(), None) is None

    if not any(sub.training == wrong and plain(sub) for sub in root.modules()):
        return []
    found: list[tuple[str, int]] = []

    def visit(name: str, module: nn.Module, parent: nn.Module | None) -> None:
        if module.training == wrong and (parent is None or parent.training != wrong):
            # the top of a sub-tree in the wrong mode; a parameter-free one (dropout) trains with its parent
            sensitive = sum(1 for sub in module.modules() if sub.training == wrong and is_mode_sensitive(sub))
            owner = module if next(module.parameters(), None) is not None or parent is None else parent
            trains = any(is_trained(p) for p in owner.parameters())
            if sensitive and (trains or not training):
                found.append((name, sensitive))
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child, module)

    visit("", root, None)
    return found


def bn_batches_tracked(modules: Iterable[nn.Module]) -> torch.Tensor | None:
    """The sum of ``num_batches_tracked`` over the norm layers that keep running statistics (a device tensor), or
    ``None`` when there is none. It grows by one per forward in train mode.
    """
    counts = [
        count
        for m in modules
        if is_norm_layer(m)
        and m.track_running_stats
        and isinstance(count := getattr(m, "num_batches_tracked", None), torch.Tensor)
    ]
    return torch.stack([c.detach().reshape(()) for c in counts]).sum() if counts else None


def bn_updates(before: torch.Tensor | None, modules: Iterable[nn.Module]) -> int:
    """How many times the norm layers of ``modules`` updated their running statistics since :func:`bn_batches_tracked`
    said ``before`` (one host read; ``0`` when there was nothing to count).
    """
    after = bn_batches_tracked(modules) if before is not None else None
    return int(after - before.to(after.device)) if after is not None and before is not None else 0


# -- the gradient noise scale ------------------------------------------------------------------------------------
def noise_scale_terms(
    small_sq: float, big_sq: float, batch_small: float, batch_big: float
) -> tuple[float, float]:
    """Unbiased estimates of ``tr(Sigma)`` and ``|G|^2`` from gradient norms at two batch sizes.

    ``small_sq`` is ``E|G_small|^2`` (the mean squared norm of gradients over batches of ``batch_small`` samples),
    ``big_sq`` is ``|G_big|^2`` (the gradient over ``batch_big`` samples). With ``E|G_B|^2 = |G|^2 + tr(Sigma)/B``
    (McCandlish et al. 2018, eq. A.1-A.3):

        |G|^2     = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
        tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

    and the simple noise scale is ``B_simple = tr(Sigma) / |G|^2``. Each estimate is noisy: average the two terms
    separately over steps (:class:`NoiseScale`) before dividing.
    """
    if not batch_big > batch_small > 0:
        raise ValueError(f"need batch_big > batch_small > 0, got {batch_big!r} and {batch_small!r}.")
    grad_sq = (batch_big * big_sq - batch_small * small_sq) / (batch_big - batch_small)
    trace = (small_sq - big_sq) / (1.0 / batch_small - 1.0 / batch_big)
    return trace, grad_sq


def noise_row(
    micro: Sequence[torch.Tensor],
    accumulate: int,
    total_norm: torch.Tensor | None,
    loss_scale: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """This rank's ``[mean |G_micro|^2, |G_step|^2, 1]`` on the device (no host read), or zeros when the step is
    not comparable (a partial accumulation window at the end of an epoch, no gradient norm).

    ``micro`` holds the squared norm of each micro-batch's incoming gradient, of a loss that Lightning divided by
    ``accumulate`` (hence the factor ``accumulate**2``) and, under a GradScaler, multiplied by ``loss_scale``.
    """
    if len(micro) != accumulate or total_norm is None:
        return torch.zeros(3, device=device)
    local = torch.stack(list(micro)).mean() * accumulate**2
    if loss_scale is not None:
        local = local / loss_scale.to(local.device) ** 2
    return torch.stack([local.to(device), total_norm.float().to(device) ** 2, torch.ones((), device=device)])


class NoiseSample(NamedTuple):
    """One measurement of the noise-scale terms (:func:`noise_sample`)."""

    trace: float
    grad_sq: float
    micro_batch: float
    global_batch: float
    micro_batches: int


def noise_sample(rows: torch.Tensor, micro_batch: int, accumulate: int) -> NoiseSample | None:
    """The noise-scale terms of one step from the gathered :func:`noise_row` of every rank (a host table), or
    ``None`` when a rank could not measure or the micro-batch gradients agree to rounding (identical batches: no
    noise to measure).
    """
    if not bool((rows[:, 2] > 0).all()) or not micro_batch:
        return None
    small_sq = float(rows[:, 0].mean())
    big_sq = float(rows[0, 1])
    if not small_sq - big_sq > NOISE_FLOOR * small_sq:
        return None
    micro = accumulate * rows.shape[0]
    batch_small = float(micro_batch)
    batch_big = batch_small * micro
    trace, grad_sq = noise_scale_terms(small_sq, big_sq, batch_small, batch_big)
    return NoiseSample(trace, grad_sq, batch_small, batch_big, micro)


def batch_over_noise_scale(global_batch: float, scale: float, ratio: float) -> float | None:
    """``global_batch / B_simple`` when it is more than ``ratio`` times below or above 1, else ``None``.

    Example:
        >>> batch_over_noise_scale(64.0, 1000.0, 10.0), batch_over_noise_scale(64.0, 100.0, 10.0)
        (0.064, None)
    """
    over = global_batch / scale
    return None if 1 / ratio <= over <= ratio else over


@dataclasses.dataclass
class NoiseScale:
    """Running (exponentially weighted) estimates of ``tr(Sigma)`` and ``|G|^2``, and their ratio ``B_simple``.

    Non-finite estimates never enter the averages.
    """

    decay: float = 0.9
    trace: float = 0.0
    grad_sq: float = 0.0
    count: int = 0

    def add(self, sample: NoiseSample | None) -> float | None:
        """Count one :func:`noise_sample` (``None``: nothing measured); the running ``B_simple`` when it is finite
        and positive (then it is worth logging), else ``None``.
        """
        if sample is None:
            return None
        self.update(sample.trace, sample.grad_sq)
        scale = self.scale
        return scale if math.isfinite(scale) and scale > 0 else None

    def update(self, trace: float, grad_sq: float) -> None:
        if not (math.isfinite(trace) and math.isfinite(grad_sq)):
            return
        if self.count == 0:
            self.trace, self.grad_sq = trace, grad_sq
        else:
            self.trace = self.decay * self.trace + (1 - self.decay) * trace
            self.grad_sq = self.decay * self.grad_sq + (1 - self.decay) * grad_sq
        self.count += 1

    @property
    def scale(self) -> float:
        """``B_simple`` in samples; NaN until both averaged terms are positive (a noise-free or a noise-dominated
        estimate has no scale yet).
        """
        return self.trace / self.grad_sq if self.count and self.grad_sq > 0 and self.trace > 0 else math.nan

    def state_dict(self) -> dict[str, Any]:
        return {"trace": self.trace, "grad_sq": self.grad_sq, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trace = float(state.get("trace", self.trace))
        self.grad_sq = float(state.get("grad_sq", self.grad_sq))
        self.count = int(state.get("count", self.count))


@dataclasses.dataclass
class Streak:
    """Consecutive checks at which a condition held; it is reported once it held ``patience`` checks in a row."""

    patience: int = 2
    count: int = 0

    def update(self, seen: bool) -> bool:
        """Count one check; ``True`` when the condition has now held ``patience`` checks in a row."""
        self.count = self.count + 1 if seen else 0
        return self.count >= self.patience
