"""Forward/backward test helpers for your own pytest suite (plain torch: no Trainer needed).

Each helper raises ``AssertionError`` with a message that says what is wrong and where (parameter and module
names), so a failing test reads like a diagnosis::

    from lightning_diag.testing import assert_batch_independence, assert_forward_backward


    def test_model_trains():
        model = MyModel()
        x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
        assert_forward_backward(model, x, loss_fn=lambda out: F.cross_entropy(out, y))
        assert_batch_independence(model, x)

The checks leave the model as they found it (gradients, buffers, train/eval mode, RNG states), except
:func:`assert_can_overfit_batch`, which trains a copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_diag.core import sanity
from lightning_diag.core.batches import iter_tensors
from lightning_diag.core.nan_trace import trace_step
from lightning_diag.testing.syncs import HostSyncCounter, SyncAudit

__all__ = [
    "HostSyncCounter",
    "SyncAudit",
    "assert_batch_independence",
    "assert_can_overfit_batch",
    "assert_forward_backward",
    "assert_gradcheck",
    "assert_loss_at_init",
]


def _as_args(inputs: Any) -> tuple[Any, ...]:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _default_loss(out: Any) -> torch.Tensor:
    tensors = [t for _, t in iter_tensors(out, "output") if t.is_floating_point()]
    if not tensors:
        raise AssertionError(
            "the model returned no floating-point tensor to build a loss from; pass `loss_fn`."
        )
    return sum(t.float().mean() for t in tensors)  # type: ignore[return-value]


def assert_forward_backward(
    model: nn.Module, inputs: Any, loss_fn: Callable[[Any], torch.Tensor] | None = None
) -> None:
    """The forward output and the loss are finite, and every trainable parameter gets a finite gradient.

    Args:
        model: the module under test.
        inputs: its input (a tuple is unpacked into positional arguments).
        loss_fn: ``output -> loss``; default: the mean of every floating-point output.
    """
    loss_of = lambda: (loss_fn or _default_loss)(model(*_as_args(inputs)))  # noqa: E731
    trace = trace_step(model, inputs, loss_of)
    if trace is not None:
        raise AssertionError(f"non-finite values: {trace.describe()}.")
    issues = sanity.check_gradients(model, loss_of)
    if issues:
        raise AssertionError("; ".join(i.message for i in issues))


def assert_batch_independence(model: nn.Module, inputs: torch.Tensor, sample: int = 0) -> None:
    """The output for sample ``sample`` does not depend on any other sample of ``inputs`` (BatchNorm in eval)."""
    if not inputs.is_floating_point() or inputs.shape[0] < 2:
        raise AssertionError(
            "assert_batch_independence needs a floating-point input with a batch of at least 2."
        )
    issues = sanity.check_batch_independence(model, model, inputs, sample)
    if issues:
        raise AssertionError(issues[0].message + " " + issues[0].advice[0])


def assert_gradcheck(
    fn: Callable[..., Any], *inputs: torch.Tensor, eps: float = 1e-6, atol: float = 1e-5, rtol: float = 1e-3
) -> None:
    """``torch.autograd.gradcheck`` in float64 for a custom layer or loss, with a readable failure.

    The inputs (and, for a module, its parameters) are converted to float64 copies; floating inputs require grad.
    """
    if isinstance(fn, nn.Module):
        import copy

        fn = copy.deepcopy(fn).double()
    args = [
        t.detach().double().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t
        for t in inputs
    ]
    try:
        ok = torch.autograd.gradcheck(fn, tuple(args), eps=eps, atol=atol, rtol=rtol, raise_exception=True)
    except Exception as error:  # GradcheckError (a RuntimeError) carries both Jacobians: keep the gist
        first = str(error).strip().splitlines()
        summary = first[0] if first else type(error).__name__
        raise AssertionError(
            f"the analytical gradient of {getattr(fn, '__name__', type(fn).__name__)} does not match the numerical one: "
            f"{summary} (float64, eps={eps}, atol={atol}, rtol={rtol}). A custom backward, an in-place op or a "
            "non-differentiable point (abs/relu/max at 0) is the usual cause."
        ) from error
    assert ok


def assert_can_overfit_batch(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], torch.Tensor],
    steps: int = 100,
    lr: float = 1e-2,
    min_drop: float = 0.9,
    optimizer: Callable[[Sequence[nn.Parameter]], torch.optim.Optimizer] | None = None,
) -> None:
    """A copy of ``model`` trained on one batch (``loss_fn(copy) -> loss``) for ``steps`` steps cuts its loss by
    ``min_drop`` (90% by default).
    """
    issues = sanity.check_overfit_batch(
        model,
        loss_fn,
        optimizer or (lambda params: torch.optim.Adam(params, lr=lr)),
        steps=steps,
        min_drop=min_drop,
    )
    if issues:
        raise AssertionError(issues[0].message + " " + issues[0].advice[0])


def assert_loss_at_init(
    loss: torch.Tensor | float, num_classes: int, high: float = 1.5, low: float = 0.1
) -> None:
    """A cross-entropy loss at initialisation lies within ``[low, high] * ln(num_classes)``."""
    value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    if not math.isfinite(value):
        raise AssertionError(f"the loss at initialisation is {value}.")
    issues = sanity.check_loss_at_init(value, num_classes, high=high, low=low)
    if issues:
        raise AssertionError(issues[0].message + " " + issues[0].advice[0])
