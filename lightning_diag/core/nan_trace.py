"""Locate where a non-finite value first appeared: the input, a module's forward, the loss, or the backward.

:func:`trace_step` replays one batch through ``compute_loss`` with hooks on every submodule:

* **input**: the first batch tensor holding NaN/Inf (by its path, e.g. ``batch[0]`` or ``batch['image']``);
* **forward**: the first module, in execution order, whose output is non-finite although its inputs were finite
  (the innermost one: a child finishes before its parent). When a module *receives* a non-finite input that no
  hooked module produced, the culprit is functional code (``torch.log``, a division...) in the module that was
  running at the time: that module is named, with the input it passed on;
* **loss**: every module output finite, the loss not;
* **backward**: the first gradient in backward order that is non-finite: a parameter's gradient (the module and
  parameter are named) or the gradient arriving at a module's output (the code after that module produced it).

The replay leaves no trace: gradients, buffers (BatchNorm statistics) and the RNG states are put back as they
were, and the optimizer is never touched. :func:`non_finite_tensors` names the non-finite entries of a list of
tensors (parameters after an update, gradients that were not reproduced by a replay).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lightning_diag.core.batches import iter_tensors
from lightning_diag.core.grad_stats import local_tensor

__all__ = [
    "Trace",
    "choose_origin",
    "deferred_origin",
    "first_non_finite",
    "locate",
    "non_finite_kind",
    "non_finite_tensors",
    "observed_origin",
    "origin_advice",
    "owner_module",
    "parameter_origin",
    "preserved_module",
    "preserved_rng",
    "trace_step",
]


@dataclasses.dataclass
class Trace:
    """Where a non-finite value first appeared.

    Attributes:
        phase: ``"input"``, ``"forward"``, ``"loss"``, ``"backward"`` or ``"optimizer"``.
        module: qualified module name (``"(root)"`` for the top module, ``""`` when no module applies).
        module_type: the module's class name.
        tensor: which tensor: a batch path, ``"output"``, ``"input of <module>"``, ``"loss"`` or a parameter name.
        kind: ``"nan"``, ``"inf"`` or ``"nan+inf"``.
    """

    phase: str
    module: str = ""
    module_type: str = ""
    tensor: str = ""
    kind: str = ""

    def describe(self) -> str:
        where = {
            "input": f"in the input batch, `{self.tensor}`",
            "forward": f"in the forward pass of `{self.module}` ({self.module_type})"
            + (f", {self.tensor}" if self.tensor and self.tensor != "output" else ", its output"),
            "loss": "in the loss computation (every module output was finite)",
            "backward": f"in the backward pass at `{self.module}` ({self.module_type})"
            + (f", the gradient of {self.tensor}" if self.tensor else ""),
            "optimizer": f"in the optimizer update: parameter `{self.tensor}` of `{self.module}` ({self.module_type})",
        }[self.phase]
        names = {"nan": "NaN", "inf": "Inf", "nan+inf": "NaN and Inf"}
        return f"{names.get(self.kind, 'a non-finite value')} first appeared {where}"


def non_finite_kind(t: torch.Tensor) -> str:
    """``"nan"``, ``"inf"``, ``"nan+inf"`` or ``""`` for a finite tensor (synchronises: call on detection only)."""
    t = local_tensor(t).detach()
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return ""
    has_nan, has_inf = bool(torch.isnan(t).any()), bool(torch.isinf(t).any())
    return "+".join(k for k, v in (("nan", has_nan), ("inf", has_inf)) if v)


def first_non_finite(obj: Any, path: str = "batch") -> tuple[str, str] | None:
    """``(path, kind)`` of the first tensor in a nested structure that holds NaN/Inf, else ``None``.

    For a tensor with a batch dimension the path ends with the first bad sample, as ``(sample i)``.

    Example:
        >>> first_non_finite({"x": torch.ones(2), "y": (torch.zeros(3), torch.tensor([1.0, float("nan")]))})
        ("batch['y'][1] (sample 1)", 'nan')
    """
    for name, tensor in iter_tensors(obj, path):
        kind = non_finite_kind(tensor)
        if kind:
            local = local_tensor(tensor).detach()
            if local.dim() >= 1 and local.shape[0] > 1:
                bad_rows = (~torch.isfinite(local.reshape(local.shape[0], -1))).any(dim=1)
                name += f" (sample {int(bad_rows.nonzero()[0, 0])})"
            return name, kind
    return None


def non_finite_tensors(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> list[tuple[str, str]]:
    """``(name, kind)`` for each tensor holding NaN/Inf, in the given order."""
    found = []
    for name, t in zip(names, tensors, strict=True):
        kind = non_finite_kind(t)
        if kind:
            found.append((name, kind))
    return found


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the Python, NumPy, torch CPU and current CUDA device RNG states on exit."""
    py_state = random.getstate()
    cpu_state = torch.get_rng_state()
    cuda_state = (
        torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    try:
        import numpy as np

        np_state: Any = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        np, np_state = None, None  # type: ignore[assignment]
    try:
        yield
    finally:
        random.setstate(py_state)
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state)
        if np_state is not None:
            np.random.set_state(np_state)


@contextlib.contextmanager
def preserved_module(module: nn.Module) -> Iterator[None]:
    """Restore the gradients, buffers (BatchNorm statistics), train/eval modes and RNG states of ``module`` on exit."""
    grads = {p: p.grad for p in module.parameters()}
    buffers = [(b, local_tensor(b).detach().clone()) for b in module.buffers()]
    modes = {m: m.training for m in module.modules()}
    try:
        with preserved_rng():
            yield
    finally:
        for p, g in grads.items():
            p.grad = g
        with torch.no_grad():
            for b, saved in buffers:
                local_tensor(b).copy_(saved)
        for m, training in modes.items():
            m.train(training)


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [t for _, t in iter_tensors(obj, "")]


def _first_bad(obj: Any) -> str:
    for t in _tensors(obj):
        kind = non_finite_kind(t)
        if kind:
            return kind
    return ""


class _Recorder:
    """Forward/backward hooks on every submodule, recording the first non-finite event of each pass."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.names = {m: (n or "(root)") for n, m in root.named_modules()}
        self.stack: list[nn.Module] = []
        self.forward: Trace | None = None
        self.backward: Trace | None = None
        self.handles: list[Any] = []
        # id(tensor) -> the innermost module that took it as input; the tensors are kept alive so ids stay unique
        self.consumers: dict[int, nn.Module] = {}
        self.alive: list[torch.Tensor] = []

    def _trace(self, phase: str, module: nn.Module, tensor: str, kind: str) -> Trace:
        return Trace(phase, self.names.get(module, "(root)"), type(module).__name__, tensor, kind)

    def __enter__(self) -> _Recorder:
        for module in self.names:
            self.handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._post, always_call=True))
        for name, param in self.root.named_parameters():
            if param.requires_grad:
                self.handles.append(param.register_hook(self._param_grad_hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _pre(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if self.forward is None:
            kind = _first_bad((args, kwargs))
            if kind:
                # A non-finite value reached this module without any hooked module producing it: functional code
                # in the module running now (or the caller of the top module) made it.
                caller = self.stack[-1] if self.stack else self.root
                self.forward = self._trace("forward", caller, f"input of `{self.names[module]}`", kind)
        for t in _tensors((args, kwargs)):
            if t.requires_grad:
                self.consumers[id(t)] = module
                self.alive.append(t)
        self.stack.append(module)

    def _post(self, module: nn.Module, _args: Any, output: Any) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()
        if self.forward is None:
            kind = _first_bad(output)
            if kind:
                self.forward = self._trace("forward", module, "output", kind)
        if torch.is_grad_enabled():
            for t in _tensors(output):
                if t.requires_grad:
                    t.register_hook(self._output_grad_hook(module, t))
                    self.alive.append(t)

    def _output_grad_hook(self, module: nn.Module, tensor: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if self.backward is None:
                kind = non_finite_kind(grad)
                if not kind:
                    return
                consumer = self.consumers.get(id(tensor))
                if consumer is not None and consumer is not module:
                    # The module that took this output as its input made the gradient in its backward.
                    self.backward = self._trace("backward", consumer, "its input", kind)
                else:
                    self.backward = self._trace(
                        "backward", module, "its output (made by the code after it)", kind
                    )

        return hook

    def _param_grad_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        owner_name = name.rsplit(".", 1)[0] if "." in name else ""
        owner = self.root.get_submodule(owner_name) if owner_name else self.root

        def hook(grad: torch.Tensor) -> None:
            if self.backward is None:
                kind = non_finite_kind(grad)
                if kind:
                    self.backward = self._trace("backward", owner, f"parameter `{name}`", kind)

        return hook


def trace_step(
    module: nn.Module,
    batch: Any,
    compute_loss: Callable[[], torch.Tensor | None],
    *,
    backward: bool = True,
) -> Trace | None:
    """Replay one batch and return where a non-finite value first appeared (``None``: the replay stayed finite).

    Args:
        module: the model (hooks go on it and every submodule).
        batch: the batch ``compute_loss`` consumes (checked first, as the ``input`` phase).
        compute_loss: runs the forward pass and returns the loss (or ``None``).
        backward: also replay the backward pass (always done when a loss exists, even a non-finite one, so that
            every rank of a sharded model runs the same collectives).
    """
    found = first_non_finite(batch)
    input_trace = Trace("input", "", "", found[0], found[1]) if found else None
    with preserved_module(module), torch.enable_grad(), _Recorder(module) as recorder:
        for p in module.parameters():
            p.grad = None
        loss = compute_loss()
        loss_kind = non_finite_kind(loss) if isinstance(loss, torch.Tensor) else ""
        if backward and isinstance(loss, torch.Tensor) and loss.requires_grad:
            loss.float().sum().backward()
    if input_trace is not None:
        return input_trace
    if recorder.forward is not None:
        return recorder.forward
    if loss_kind:
        return Trace("loss", "", "", "loss", loss_kind)
    return recorder.backward


# -- origin of a detection that was not (or could not be) replayed ----------------------------------------------
def owner_module(model: nn.Module, param_name: str) -> tuple[str, str]:
    """``(qualified name, class name)`` of the module that owns parameter ``param_name`` (``"(root)"`` on top)."""
    owner = param_name.rsplit(".", 1)[0] if "." in param_name else ""
    try:
        module = model.get_submodule(owner) if owner else model
    except AttributeError:
        return owner or "(root)", ""
    return owner or "(root)", type(module).__name__


def parameter_origin(model: nn.Module, names: Sequence[str], params: Sequence[torch.Tensor]) -> Trace | None:
    """The first non-finite parameter, as an ``optimizer``-phase trace (the update made it), or ``None``."""
    bad = non_finite_tensors(names, params)
    if not bad:
        return None
    name, kind = bad[0]
    module, module_type = owner_module(model, name)
    return Trace("optimizer", module, module_type, name, kind)


def observed_origin(
    model: nn.Module,
    batches: Sequence[Any],
    grad_names: Sequence[str],
    grads: Sequence[torch.Tensor],
    *,
    input_bad: bool,
    loss_bad: bool,
    grad_bad: bool,
) -> Trace | None:
    """Where this step's own values (not a replay) show the problem: the input, the loss, or the gradient of the
    last layer whose gradient is non-finite (backward runs from the last layer, so its gradient went bad first).
    """
    if input_bad:
        for batch in batches:
            found = first_non_finite(batch)
            if found:
                return Trace("input", "", "", found[0], found[1])
    if loss_bad:
        return Trace("loss", "", "", "loss", "")
    if grad_bad:
        bad = non_finite_tensors(grad_names, grads)
        if bad:
            name, kind = bad[-1]
            module, module_type = owner_module(model, name)
            return Trace("backward", module, module_type, f"parameter `{name}`", kind)
    return None


def locate(
    model: nn.Module,
    names: Sequence[str],
    params: Sequence[torch.Tensor],
    batches: Sequence[Any],
    replay: Callable[[Any, int], Callable[[], Any]] | None,
    grads: tuple[Sequence[str], Sequence[torch.Tensor]],
    *,
    input_bad: bool,
    loss_bad: bool,
    grad_bad: bool,
) -> tuple[dict[str, str] | None, bool]:
    """This rank's answer to "where did the first non-finite value of this step appear": ``(vars(trace) or None,
    reproduced)``, to be combined across ranks with :func:`choose_origin`.

    A non-finite parameter is the answer (reproduced: it is non-finite now); otherwise every micro-batch of the
    step (``batches``: ``(batch, batch_idx)`` pairs) is replayed with hooks (``replay(batch, batch_idx)`` returns
    the zero-argument function that runs the training step; ``None``: no replay, manual optimization); otherwise
    what the step's own values show (:func:`observed_origin` on ``grads``: ``(names, gradients)``), not
    reproduced.
    """
    found = parameter_origin(model, names, params)
    if found is None and replay is not None:
        for batch, batch_idx in batches:  # every micro-batch, on every rank: sharded models stay in step
            found = found or trace_step(model, batch, replay(batch, batch_idx))
    if found is not None:
        return vars(found), True
    observed = observed_origin(
        model,
        [b for b, _ in batches],
        grads[0],
        grads[1],
        input_bad=input_bad,
        loss_bad=loss_bad,
        grad_bad=grad_bad,
    )
    return (vars(observed) if observed is not None else None), False


def deferred_origin(
    model: nn.Module,
    grad_names: Sequence[str],
    grad_norms: Sequence[float],
    input_bad: bool,
    loss_bad: bool,
    grad_bad: bool,
    params_bad: bool = False,
) -> Trace | None:
    """The origin a step judged later can still name: the input, the loss, the last layer whose gradient norm is
    non-finite (from the per-tensor norms kept for the step), or the parameters.
    """
    if input_bad:
        return Trace("input", "", "", "batch", "")
    if loss_bad:
        return Trace("loss", "", "", "loss", "")
    if grad_bad:
        bad = [name for name, value in zip(grad_names, grad_norms, strict=False) if not math.isfinite(value)]
        if bad:
            module, module_type = owner_module(model, bad[-1])
            return Trace("backward", module, module_type, f"parameter `{bad[-1]}`", "")
    if params_bad:
        return Trace("optimizer", "", "", "parameters", "")
    return None


def choose_origin(
    answers: Sequence[tuple[dict[str, str] | None, bool]],
) -> tuple[Trace | None, bool, int]:
    """The first informative answer of all ranks: ``(trace, reproduced, rank)``.

    Each rank answers ``(vars(trace) or None, reproduced)``; a reproduced origin (seen again on replay, or a
    parameter that is non-finite now) wins over one only observed in the step's values.
    """
    for reproduced in (True, False):
        for rank, (trace, was_reproduced) in enumerate(answers):
            if trace is not None and was_reproduced == reproduced:
                return Trace(**trace), reproduced, rank
    return None, False, 0


# -- advice by origin ---------------------------------------------------------------------------------------------
_FUNCTIONAL = (
    "Functional code in or around this module (log, sqrt, division, exp, pow) met an out-of-domain value: add an "
    "epsilon or clamp its input (e.g. log(x.clamp_min(1e-8)))."
)
_FP16 = "In float16 anything above 65504 is Inf: prefer bf16-mixed, or add normalisation before this module."
_WEIGHTS = (
    "Weights grown too large: lower the learning rate, clip gradients (GradClip), add warmup (WarmupCosine)."
)
_ADVICE: dict[str, list[str]] = {
    "input": [
        "The data holds NaN/Inf: find the sample (batch and sample index are in the evidence), clean the dataset or "
        "drop such samples in the Dataset/collate_fn.",
        "Check preprocessing that divides by a per-sample statistic (std, max) that can be 0.",
    ],
    "loss": [
        "The loss took a log of 0 or divided by 0: use the fused, stable forms (cross_entropy on logits, "
        "binary_cross_entropy_with_logits) or add an epsilon.",
        "The predictions are huge and their squared error overflowed: the weights are blowing up (learning rate too "
        "high: lower it, clip gradients, add warmup).",
        "Targets out of the loss's domain (class index out of range, labels outside [0, 1]), or an empty mask "
        "averaged over zero elements.",
    ],
    "backward": [
        "The derivative of sqrt/log/pow/norm at 0 is infinite: add an epsilon inside the function "
        "(e.g. sqrt(x + eps), norm with eps).",
        "A custom autograd Function's backward can produce it: check it with torch.autograd.gradcheck.",
    ],
    "optimizer": [
        "The update itself made the parameters non-finite: the learning rate is too high for this step; lower it, "
        "add warmup (WarmupCosine) or clip gradients (GradClip).",
        "With Adam/AdamW in low precision, a tiny `eps` can divide by ~0: raise `eps` (e.g. 1e-6) or keep optimizer "
        "state in float32.",
    ],
}


def origin_advice(trace: Trace, model: nn.Module, *, half_precision: bool) -> list[str]:
    """Advice for where the value appeared, narrowed by what the module is and the run's precision."""
    if trace.phase != "forward":
        advice = list(_ADVICE.get(trace.phase, []))
        if trace.phase == "backward" and half_precision:
            advice.append("Under float16, gradients overflow easily: prefer bf16-mixed.")
        return advice
    try:
        module = model.get_submodule("" if trace.module == "(root)" else trace.module)
        has_weights = any(True for _ in module.parameters(recurse=False))
    except AttributeError:
        has_weights = False
    advice = (
        [_WEIGHTS, _FUNCTIONAL] if has_weights and not trace.tensor.startswith("input of") else [_FUNCTIONAL]
    )
    if half_precision:
        advice.append(_FP16)
    return advice
