"""The math and small state machines behind SilentBugDetector: errors that raise nothing and produce no NaN.

Everything here is pure torch + stdlib (no Lightning): strided samples and fingerprints of tensors, the module-mode
rule, the cross-rank comparison of checksums, the gradient-noise-scale estimator of McCandlish et al. (2018, "An
Empirical Model of Large-Batch Training", appendix A.1) and a running estimate of it, and the consecutive-check
counter that turns an observation into a finding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "NoiseScale",
    "Streak",
    "bn_batches_tracked",
    "divergent_entries",
    "fingerprint",
    "flat_sample",
    "is_mode_sensitive",
    "mode_problems",
    "noise_scale_terms",
]

#: Batch tensors that enter a batch fingerprint (the rest of a batch is ignored).
MAX_FINGERPRINT_TENSORS = 8


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
    if isinstance(module, nn.modules.batchnorm._NormBase):
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
    norm_or_dropout = (*_DROPOUT, nn.modules.batchnorm._NormBase)

    def plain(sub: nn.Module) -> bool:
        if training:
            return not is_mode_sensitive(sub) and _has_trainable(sub)
        return not isinstance(sub, norm_or_dropout) and next(sub.children(), None) is None

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
        m.num_batches_tracked
        for m in modules
        if isinstance(m, nn.modules.batchnorm._NormBase)
        and m.track_running_stats
        and m.num_batches_tracked is not None
    ]
    return torch.stack([c.detach().reshape(()) for c in counts]).sum() if counts else None


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


@dataclasses.dataclass
class NoiseScale:
    """Running (exponentially weighted) estimates of ``tr(Sigma)`` and ``|G|^2``, and their ratio ``B_simple``.

    Non-finite estimates never enter the averages.
    """

    decay: float = 0.9
    trace: float = 0.0
    grad_sq: float = 0.0
    count: int = 0

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
