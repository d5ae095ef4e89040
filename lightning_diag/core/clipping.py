"""Gradient clipping strategies: device-only math, stateful where adaptive, checkpointable.

Every strategy works on *unscaled* gradient norms and never synchronises with the host: a clip is a multiply by
a coefficient clamped to ``<= 1`` (``torch._foreach_mul_``), and a non-finite norm leaves the gradients alone
(the GradScaler or NaNGuard deals with those steps) and never enters a running statistic.

* ``norm``: fixed threshold on the total norm (``torch.nn.utils.clip_grad_norm_``).
* ``value``: clamp every element to ``[-clip_value, clip_value]``.
* ``agc``: unit-wise adaptive clipping (Brock et al., 2021): each output unit's gradient norm is kept under
  ``factor * max(|W_unit|, eps)``.
* ``autoclip``: threshold = the ``percentile`` of the history of finite total norms, the current one included
  (Seetharaman et al., 2020), over a bounded history.
* ``zscore``: threshold = ``mean + z * std`` of an EMA of the total norm (ZClip, Kumar et al., 2025), after a
  warm-up that seeds the mean and variance; the EMA is fed the clipped norm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "AutoClip",
    "ZScoreClip",
    "agc_",
    "apply_coefficient_",
    "clip_coefficient",
    "clip_value_",
    "unitwise_norm",
]

EPS = 1e-6


def clip_coefficient(total_norm: torch.Tensor, max_norm: torch.Tensor | float) -> torch.Tensor:
    """``min(1, max_norm / total_norm)``; exactly 1 where the norm or the threshold is not finite."""
    coef = (max_norm / (total_norm + EPS)).clamp(max=1.0)  # NaN threshold or norm: NaN; Inf norm: 0
    return torch.where(torch.isfinite(total_norm), coef, 1.0).nan_to_num(nan=1.0)


def apply_coefficient_(
    grads: Sequence[torch.Tensor], coef: torch.Tensor, device: torch.device | None = None
) -> None:
    """Multiply every gradient by ``coef`` in place, on device (one foreach kernel per device/dtype).

    ``device``: the caller knows every gradient is on it (no per-tensor device check).
    """
    if not grads:
        return
    if device is not None:
        torch._foreach_mul_(list(grads), coef.to(device))
        return
    devices = {g.device for g in grads}
    if len(devices) == 1:
        torch._foreach_mul_(list(grads), coef.to(next(iter(devices))))  # a 0-d tensor multiplies any dtype
        return
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    for device, group in by_device.items():
        torch._foreach_mul_(group, coef.to(device))


def clip_value_(grads: Sequence[torch.Tensor], bound: float | torch.Tensor) -> None:
    """Clamp every gradient element to ``[-bound, bound]`` in place (a tensor ``bound`` of ``inf`` is a no-op).

    Sparse gradients have their (coalesced) values clamped; complex ones their real and imaginary parts.
    """
    if not grads:
        return
    plain = [g for g in grads if g.layout == torch.strided and not g.is_complex()]
    if len(plain) < len(grads):
        for g in grads:
            if g.layout != torch.strided or g.is_complex():
                _clamp_special_(g, bound)
    if not plain:
        return
    if isinstance(bound, torch.Tensor):
        for g in plain:
            b = bound.to(g.device, g.dtype)
            torch.clamp(g, min=-b, max=b, out=g)
        return
    torch._foreach_clamp_min_(plain, -bound)
    torch._foreach_clamp_max_(plain, bound)


def _clamp_special_(g: torch.Tensor, bound: float | torch.Tensor) -> None:
    target = g.coalesce() if g.layout == torch.sparse_coo else g
    values = target.values() if target.layout != torch.strided else target
    real = torch.view_as_real(values) if values.is_complex() else values
    b = bound.to(real.device, real.dtype) if isinstance(bound, torch.Tensor) else bound
    real.clamp_(-b, b)  # type: ignore[arg-type]
    if target is not g:
        g.copy_(target)


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """Norm per output unit: over all dims but the first for matrices/filters, the whole tensor for vectors."""
    x = x if x.is_complex() else x.float()  # the norm of a complex tensor is real (its modulus)
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


def agc_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    factor: float,
    eps: float = 1e-3,
    inv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adaptive gradient clipping in place; returns a 0-d bool tensor: whether any unit was clipped.

    ``g_unit <- g_unit * min(1, factor * max(|w_unit|, eps) / |g_unit|)``. With ``inv_scale`` the gradients are
    still loss-scaled: the ratio uses the unscaled norm and the (linear) clip applies to the scaled values.
    Sparse gradients (embedding rows) are left alone: their units are rows that most steps do not touch.
    """
    clipped = torch.zeros((), dtype=torch.bool, device=grads[0].device if grads else "cpu")
    for p, g in zip(params, grads, strict=True):
        if g.layout != torch.strided:
            continue
        g_norm = unitwise_norm(g)
        if inv_scale is not None:
            g_norm = g_norm * inv_scale.to(g_norm.device)
        max_norm = unitwise_norm(p.detach()).clamp(min=eps) * factor
        coef = (max_norm / g_norm.clamp(min=EPS)).clamp(max=1.0)
        coef = torch.where(torch.isfinite(coef), coef, torch.ones_like(coef))
        clipped = clipped | (coef < 1).any().to(clipped.device)
        g.mul_(coef.to(g.dtype))
    return clipped


class AutoClip:
    """Percentile of the (bounded) history of finite total norms, the current one included.

    Args:
        percentile: in ``(0, 100]``; the threshold is this percentile of the history.
        history_size: how many recent finite norms are kept (a ring buffer).
    """

    def __init__(self, percentile: float = 10.0, history_size: int = 1000) -> None:
        self.percentile = percentile
        self.history_size = history_size
        self.history = torch.full((history_size,), math.nan)
        self.count = torch.zeros((), dtype=torch.long)

    def _to(self, device: torch.device) -> None:
        if self.history.device != device:
            self.history = self.history.to(device)
            self.count = self.count.to(device)

    def update(self, total_norm: torch.Tensor) -> torch.Tensor:
        """Add the norm (if finite) and return the threshold for this step (NaN before any finite norm)."""
        self._to(total_norm.device)
        finite = torch.isfinite(total_norm)
        slot = self.count % self.history_size
        kept = self.history.index_select(0, slot.view(1)).squeeze(0)
        self.history.index_copy_(0, slot.view(1), torch.where(finite, total_norm.float(), kept).view(1))
        self.count = self.count + finite.long()
        return torch.nanquantile(self.history, self.percentile / 100.0)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.cpu(), "count": self.count.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "history" in state:
            history = torch.as_tensor(state["history"], dtype=torch.float32)
            size = min(len(history), self.history_size)
            self.history = torch.full((self.history_size,), math.nan)
            self.history[:size] = history[:size]
        if "count" in state:
            self.count = torch.as_tensor(state["count"], dtype=torch.long).clone()


class ZScoreClip:
    """EMA mean/variance of the total norm; threshold ``mean + z_thresh * std`` once warmed up.

    During the first ``warmup_steps`` finite norms nothing is clipped and the mean/variance are seeded
    (population statistics); afterwards each finite norm is clipped to the threshold and the *clipped* norm
    updates the EMA (``mean <- a*mean + (1-a)*x``, ``var <- a*var + (1-a)*(x - mean)^2`` with the new mean,
    as ZClip does).

    Args:
        z_thresh: how many standard deviations above the mean a norm may go.
        alpha: the EMA decay.
        warmup_steps: finite norms observed before clipping starts.
    """

    def __init__(self, z_thresh: float = 2.5, alpha: float = 0.97, warmup_steps: int = 25) -> None:
        self.z_thresh = z_thresh
        self.alpha = alpha
        self.warmup_steps = warmup_steps
        self.count = torch.zeros((), dtype=torch.long)
        self.mean = torch.zeros(())
        self.var = torch.zeros(())

    def _to(self, device: torch.device) -> None:
        if self.mean.device != device:
            self.count, self.mean, self.var = self.count.to(device), self.mean.to(device), self.var.to(device)

    def threshold(self) -> torch.Tensor:
        """The current threshold (``inf`` during warm-up)."""
        ready = self.count >= self.warmup_steps
        value = self.mean + self.z_thresh * self.var.clamp(min=0).sqrt()
        return torch.where(ready, value, torch.full_like(value, math.inf))

    def update(self, total_norm: torch.Tensor) -> torch.Tensor:
        """Return the threshold for this step, then feed the (clipped) norm to the statistics if finite."""
        self._to(total_norm.device)
        x = total_norm.float()
        finite = torch.isfinite(x)
        thr = self.threshold()
        warming = self.count < self.warmup_steps
        clipped = torch.minimum(x, thr)
        n = (self.count + 1).float()
        # Welford during warm-up (population variance), EMA afterwards.
        delta = x - self.mean
        w_mean = self.mean + delta / n
        w_var = (self.var * (n - 1) + delta * (x - w_mean)) / n
        e_mean = self.alpha * self.mean + (1 - self.alpha) * clipped
        e_var = self.alpha * self.var + (1 - self.alpha) * (clipped - e_mean) ** 2
        new_mean = torch.where(warming, w_mean, e_mean)
        new_var = torch.where(warming, w_var, e_var)
        self.mean = torch.where(finite, new_mean, self.mean)
        self.var = torch.where(finite, new_var, self.var)
        self.count = self.count + finite.long()
        return thr

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count.cpu(), "mean": self.mean.cpu(), "var": self.var.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("count", "mean", "var"):
            if key in state:
                dtype = torch.long if key == "count" else torch.float32
                setattr(self, key, torch.as_tensor(state[key], dtype=dtype).clone())
