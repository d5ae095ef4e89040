"""Pre-flight checks on a model and a batch, the ones practitioners run by hand before a long training run.

Each check returns :class:`~lightning_diag.core.verdict.Verdict` s (empty when all is well) and leaves the model as it
found it: parameter values
and gradients, buffers (BatchNorm statistics), train/eval mode and the RNG states are restored, no optimizer is
touched (the overfit check trains a deep copy).

* :func:`check_data`: NaN/Inf anywhere in the batch (the one data fault that cannot be by design).
* :func:`observe_step` runs the loss once and reads what the model really consumes, the way libraries build their
  batches (dicts of lengths, masks, category codes, time features...) notwithstanding: the float input of the first
  layer with parameters (:func:`check_input_scale`: far from unit scale), and the targets handed to a
  classification loss (:func:`check_labels`: one class, or heavily imbalanced; :func:`check_loss_at_init`: the
  loss at initialisation against ``ln(C)``; :func:`check_probabilities_as_logits`). Nothing is judged on a tensor
  whose role is a guess: a batch field that is not a loss's target is never called labels.
* :func:`check_gradients`: trainable parameters the loss does not reach (no gradient), and non-finite gradients.
* :func:`check_batch_independence`: the gradient of sample ``i``'s output with respect to the inputs must be zero
  for every other sample (a view/reshape that mixes the batch dimension breaks it). Modules that mix samples on
  purpose in training mode (BatchNorm) are put in eval mode for the test, and the issue says so.
* :func:`check_overfit_batch`: a copy of the model trained on one batch must drive its loss down.

:func:`run_checks` runs the enabled checks on a list of batches; SanityCheck and ``lightning-diag doctor`` both use
it, each with its own way of computing the loss of a module on a batch.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import nn

from lightning_diag.core.activations import check_activation_scale
from lightning_diag.core.batches import iter_tensors, model_input
from lightning_diag.core.grad_stats import local_tensor, strided
from lightning_diag.core.layers import BATCH_MIXING
from lightning_diag.core.nan_trace import first_non_finite, preserved_module, preserved_rng
from lightning_diag.core.verdict import Severity, Verdict

__all__ = [
    "CLASSIFICATION_LOSSES",
    "REGRESSION_LOSSES",
    "LossCall",
    "NoLoss",
    "StepView",
    "check_batch_independence",
    "check_data",
    "check_gradients",
    "check_input_scale",
    "check_labels",
    "check_loss_at_init",
    "check_loss_calls",
    "check_overfit_batch",
    "check_probabilities_as_logits",
    "check_sigmoid_as_logits",
    "check_target_scale",
    "observe_step",
    "overfit_optimizer",
    "pending",
    "preserved_module",
    "run_checks",
]


# -- data ----------------------------------------------------------------------------------------------------------
def check_data(batch: Any) -> list[Verdict]:
    """NaN/Inf anywhere in the batch (an error: no model is meant to train on it)."""
    bad = first_non_finite(batch)
    if bad is None:
        return []
    return [
        Verdict(
            "non_finite_input",
            "error",
            f"The batch holds {bad[1].upper()} in `{bad[0]}`.",
            {"phase": "input", "tensor": bad[0], "kind": bad[1]},
            ["Clean the data or drop such samples in the Dataset/collate_fn before training."],
        )
    ]


# -- what the first step consumes ---------------------------------------------------------------------------------
#: Losses whose target is a class index (or a 0/1 label): the tensors :func:`check_labels` may judge.
CLASSIFICATION_LOSSES: dict[Callable[..., Any], str] = {
    nn.functional.cross_entropy: "cross_entropy",
    nn.functional.nll_loss: "nll_loss",
    nn.functional.binary_cross_entropy: "binary_cross_entropy",
    nn.functional.binary_cross_entropy_with_logits: "binary_cross_entropy_with_logits",
}
#: Regression losses: their target's scale against the model's outputs (:func:`check_target_scale`).
REGRESSION_LOSSES: dict[Callable[..., Any], str] = {
    nn.functional.mse_loss: "mse_loss",
    nn.functional.l1_loss: "l1_loss",
    nn.functional.smooth_l1_loss: "smooth_l1_loss",
    nn.functional.huber_loss: "huber_loss",
}


@dataclasses.dataclass
class LossCall:
    """One call of a classification loss during the observed step."""

    name: str
    input: torch.Tensor
    target: torch.Tensor
    value: torch.Tensor
    #: the input is (a view of) the output of a ``sigmoid`` call of the same step
    from_sigmoid: bool = False


@dataclasses.dataclass
class StepView:
    """What one training step consumed: the first parameterised layer's float input and the classification and
    regression loss calls.
    """

    first_layer: tuple[str, torch.Tensor] | None = None
    losses: list[LossCall] = dataclasses.field(default_factory=list)
    #: the loss the step returned (a float; NaN when it returned none)
    loss: float = math.nan
    #: the storages of every ``sigmoid`` output of the step (a loss input that is a view of one came from it)
    sigmoid_storages: set[int] = dataclasses.field(default_factory=set)


class _LossCalls(torch.overrides.TorchFunctionMode):
    """Records the classification-loss calls (``nn.CrossEntropyLoss`` and the like end in these functions)."""

    def __init__(self, view: StepView) -> None:
        super().__init__()
        self.view = view
        self.held: list[torch.Tensor] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(func, "__name__", "") in _SIGMOIDS and isinstance(out, torch.Tensor):
            storage = _storage_of(out)
            if storage >= 0:
                self.view.sigmoid_storages.add(storage)
                self.held.append(
                    out
                )  # alive until the step ends: its memory cannot be reused by another tensor
        name = CLASSIFICATION_LOSSES.get(func) or REGRESSION_LOSSES.get(func)
        if name is not None and len(args) + len(kwargs) >= 2:
            given = dict(zip(("input", "target"), args, strict=False)) | kwargs
            x, target = given.get("input"), given.get("target")
            if isinstance(x, torch.Tensor) and isinstance(target, torch.Tensor):
                squashed = _storage_of(x) in self.view.sigmoid_storages
                self.view.losses.append(LossCall(name, x.detach(), target.detach(), out, squashed))
        return out


#: the names a sigmoid goes by (``torch.sigmoid``, ``Tensor.sigmoid``, ``nn.Sigmoid``, ``torch.special.expit``)
_SIGMOIDS = frozenset({"sigmoid", "sigmoid_", "expit"})


def _storage_of(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
        return -1


def observe_step(model: nn.Module, run: Callable[[], Any]) -> StepView:
    """Run ``run()`` (the training step's loss, under ``no_grad``) and record what the model consumed."""
    view = StepView()
    owners = [(n, m) for n, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]

    def pre_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: Any) -> None:
            if view.first_layer is not None:
                return
            x = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if x is not None and x.is_floating_point() and x.numel() >= 2:
                view.first_layer = (name or "(root)", x.detach())

        return hook

    handles = [m.register_forward_pre_hook(pre_hook(n)) for n, m in owners]
    try:
        with preserved_module(model), preserved_rng(), torch.no_grad(), _LossCalls(view):
            out = run()
        if isinstance(out, torch.Tensor) and out.numel() == 1:
            view.loss = float(out.detach().float())
    finally:
        for handle in handles:
            handle.remove()
    return view


def pending(verdict: Verdict) -> Verdict:
    """A symptom seen before any consequence can be: ``info`` now, a ``warning`` at the end of fit if a consequence
    followed (:mod:`lightning_diag.core.consequences`).
    """
    return dataclasses.replace(verdict, severity="info", evidence={**verdict.evidence, "pending": 1})


#: An input this far from unit scale, with a loss this large at initialisation, is a fact (the scale reaches the loss).
EXTREME_SCALE, EXTREME_LOSS = 1e3, 1e6
#: A regression target this many times the scale of the model's outputs at initialisation is a fact too.
EXTREME_GAP = 1e3
#: A cross-entropy at initialisation this many times ln(C) is a fact: the logits differ by hundreds or more. (At 100x,
#: inputs left at 1000x their scale in an ordinary MLP already get there, and some runs recover from that: a symptom.)
ABSURD_INIT = 1000.0


def check_input_scale(
    layer: str, x: torch.Tensor, *, limit: float = 20.0, loss: float = math.nan
) -> list[Verdict]:
    """The float input of the first layer with parameters, far from unit scale (root-mean-square above ``limit``).

    Judged on what the layer receives, not on the raw batch: a model that normalises inside its step is fine. A
    symptom (``pending``: a warning only if a consequence follows; models with scale-free losses train on raw
    inputs), except when the input is :data:`EXTREME_SCALE` or more off and the step's ``loss`` is
    :data:`EXTREME_LOSS` or more: then the scale dominates the loss, a fact.
    """
    x = x.detach().float()
    if x.numel() < 2 or not bool(torch.isfinite(x).all()):
        return []
    rms = float(x.pow(2).mean().sqrt())
    if rms <= limit:
        return []
    dominated = rms >= EXTREME_SCALE and math.isfinite(loss) and abs(loss) >= EXTREME_LOSS
    verdict = Verdict(
        "input_scale",
        "warning",
        f"The first layer with parameters, `{layer}`, receives inputs far from unit scale: root-mean-square "
        f"{rms:.3g} (mean {float(x.mean()):.3g}, std {float(x.std()):.3g})"
        + (
            f", and the loss at initialisation is {loss:.3g}: the scale reaches the loss."
            if dominated
            else "."
        ),
        {"layer": layer, "rms": rms, **({"loss": loss, "certain": 1} if dominated else {})},
        [
            "Standardise inputs (zero mean, unit variance) or scale them to [0, 1], in the Dataset or at the "
            "start of `forward`/`training_step`; large inputs slow and destabilise training."
        ],
    )
    return [verdict] if dominated else [pending(verdict)]


def check_labels(
    call: LossCall,
    *,
    shuffled: bool | None = None,
    imbalance: float = 0.9,
    min_label_samples: int = 16,
    ignore_index: int = -100,
) -> list[Verdict]:
    """The targets a classification loss received: all of one class, or one class above ``imbalance``.

    Needs ``min_label_samples`` labels: 8 samples of a balanced two-class task are all one class by chance once in
    128 batches, 16 once in 32,768. A symptom (a batch drawn from a data set dominated by one class), except for a
    single class from a loader that does not shuffle (``shuffled=False``): data ordered by label, every batch one
    class, a fact.
    """
    target = call.target
    if target.is_floating_point():
        if call.name.startswith("binary") and bool(((target == 0) | (target == 1)).all()):
            target = target.long()  # 0/1 labels given as floats
        else:
            return []  # soft targets (probabilities, label smoothing): not class labels
    y = target.reshape(-1)
    y = y[y != ignore_index]
    if y.numel() < max(min_label_samples, 2):
        return []
    values, counts = torch.unique(y, return_counts=True)
    top = float(counts.max()) / y.numel()
    where = f"the targets of `{call.name}`"
    if len(values) == 1:
        ordered = shuffled is False
        verdict = Verdict(
            "label_distribution",
            "warning",
            f"Every one of {where} in the first batch is {int(values[0])}: the batch has a single class"
            + (
                " and the training DataLoader does not shuffle: the data is ordered by label."
                if ordered
                else "."
            ),
            {
                "loss": call.name,
                "classes": 1,
                "batch_size": int(y.numel()),
                **({"certain": 1} if ordered else {}),
            },
            ["Shuffle the training data (DataLoader(shuffle=True)); check the labels were not overwritten."],
        )
        if ordered:
            return [verdict]
    elif top > imbalance:
        verdict = Verdict(
            "label_distribution",
            "warning",
            f"{where.capitalize()} are heavily imbalanced in the first batch: the most frequent class is {top:.0%}.",
            {"loss": call.name, "classes": len(values), "top_share": round(top, 4)},
            ["Rebalance (WeightedRandomSampler, class weights in the loss) or check the sampling."],
        )
    else:
        return []
    return [pending(verdict)]


# -- loss at init --------------------------------------------------------------------------------------------------
def check_probabilities_as_logits(out: torch.Tensor, labels: torch.Tensor, loss: float) -> list[Verdict]:
    """Softmax applied before a loss that applies log-softmax itself (``nn.CrossEntropyLoss`` on probabilities).

    Flagged when every row of the ``[batch, C]`` output is a probability vector (in ``[0, 1]``, summing to 1) and
    the training loss equals cross-entropy taken on those probabilities as if they were logits, not the negative
    log-likelihood of them (``F.nll_loss(p.log(), y)``, the correct use of probabilities).
    """
    classes = int(out.shape[1]) if out.dim() == 2 else 0
    if classes < 2 or not math.isfinite(loss) or labels.dtype not in (torch.int64, torch.int32):
        return []
    p = out.detach().float()
    if labels.min() < 0 or labels.max() >= classes:
        return []
    rows = p.sum(dim=1)
    if not (bool((p >= 0).all()) and bool((p <= 1).all()) and bool(((rows - 1).abs() < 1e-3).all())):
        return []
    y = labels.long().to(p.device)
    as_logits = float(nn.functional.cross_entropy(p, y))
    as_probs = float(nn.functional.nll_loss(p.clamp_min(1e-12).log(), y))
    off_logits, off_probs = abs(loss - as_logits), abs(loss - as_probs)
    # near-uniform outputs make both readings close to ln(C): the loss must match one far better than the other
    if off_logits > 1e-5 * max(1.0, abs(as_logits)) or off_probs < 10 * off_logits + 1e-5:
        return []
    floor = math.log(1 + (classes - 1) / math.e)
    return [
        Verdict(
            "loss_at_init",
            "warning",
            f"The model outputs probabilities (every row sums to 1) and the loss is cross-entropy on them as if they "
            f"were logits: softmax is applied twice. Gradients are squashed and the loss cannot go below "
            f"ln(1 + {classes - 1}/e) = {floor:.4g}.",
            {
                "loss": loss,
                "cross_entropy_of_outputs": round(as_logits, 6),
                "floor": round(floor, 6),
                "num_classes": classes,
                "certain": 1,
            },
            [
                "Remove the final softmax: nn.CrossEntropyLoss / F.cross_entropy take logits and apply log-softmax.",
                "If the model must output probabilities, train with F.nll_loss(torch.log(p), y) instead.",
            ],
        )
    ]


# -- loss at init --------------------------------------------------------------------------------------------------
def check_loss_at_init(
    loss: float, num_classes: int, *, high: float = 1.5, low: float = 0.1
) -> list[Verdict]:
    """A cross-entropy loss at initialisation should be near ``ln(num_classes)`` (uniform predictions).

    A loss :data:`ABSURD_INIT` times ``ln(num_classes)`` or more is marked ``certain``: no initialisation meant to
    train starts there (the logits differ by hundreds or more), whatever the run does next.
    """
    if num_classes < 2 or not math.isfinite(loss):
        return []
    expected = math.log(num_classes)
    evidence: dict[str, Any] = {"loss": loss, "expected": round(expected, 6), "num_classes": num_classes}
    if loss > high * expected:
        absurd = loss >= ABSURD_INIT * expected
        if absurd:
            evidence["certain"] = 1
        return [
            Verdict(
                "loss_at_init",
                "warning",
                f"The loss at initialisation is {loss:.4g}, {loss / expected:.1f}x ln({num_classes}) = {expected:.4g}: "
                "the untrained model is confidently wrong"
                + (" (no initialisation meant to train starts that far off)." if absurd else "."),
                evidence,
                [
                    "Initialise the last layer with small weights (and a zero or prior bias) so the first predictions "
                    "are close to uniform.",
                    "Check that the loss gets logits (not probabilities or log-probabilities twice).",
                ],
            )
        ]
    if loss < low * expected:
        return [
            Verdict(
                "loss_at_init",
                "warning",
                f"The loss at initialisation is {loss:.4g}, suspiciously close to 0 next to ln({num_classes}) = "
                f"{expected:.4g}.",
                evidence,
                ["Check for a label leaking into the inputs, or a loss that ignores most of the batch."],
            )
        ]
    return []


# -- gradients -----------------------------------------------------------------------------------------------------
def check_gradients(
    module: nn.Module,
    compute_loss: Callable[[], torch.Tensor],
    trained: Collection[int] | None = None,
    *,
    unused_fatal: bool = False,
) -> list[Verdict]:
    """Trainable parameters that get no gradient from the loss, and non-finite gradients (module restored).

    ``trained``: the ``id`` of every parameter an optimizer updates, when known; a parameter no optimizer holds
    (an EMA copy, a teacher) is not expected to get a gradient.

    Severity: a loss detached from every parameter, or no gradient for any parameter an optimizer steps, is an
    error (nothing can learn); so is any parameter without a gradient under ``unused_fatal`` (DDP without
    ``find_unused_parameters``, which stops at the next backward). Otherwise, in a single-process run, the parameters
    without a gradient are perturbed and the loss computed again with the same random state (in a multi-process run
    no extra forward is risked and the finding is info): when the loss moves, their values reach it
    through a cut graph (``.detach()``, ``torch.no_grad()``) and they can never learn what they affect, a certain
    fault and a warning; when it does not, they are simply unused by this loss (N-BEATS' last backcast, an
    auxiliary head, experts a router did not pick, a branch taken under another setting) and the model learns
    without them: info.
    """
    with preserved_module(module), torch.enable_grad():
        for p in module.parameters():
            p.grad = None
        loss = compute_loss()
        if not loss.requires_grad:
            return [
                Verdict(
                    "missing_gradients",
                    "error",
                    "The loss does not depend on any trainable parameter (it does not require grad): the graph is "
                    "detached (`.detach()`, `.item()`, `torch.no_grad()`, numpy round trip) or every parameter is "
                    "frozen.",
                    {"parameters": sum(1 for p in module.parameters() if p.requires_grad)},
                    ["Find where the output leaves autograd; keep the loss computation in torch tensors."],
                )
            ]
        loss.float().sum().backward()
        missing = [
            n
            for n, p in module.named_parameters()
            if p.requires_grad and p.grad is None and (trained is None or id(p) in trained)
        ]
        bad = [
            n
            for n, p in module.named_parameters()
            if p.grad is not None and not bool(torch.isfinite(strided(p.grad)).all())
        ]
        reached = sum(
            1
            for p in module.parameters()
            if p.requires_grad and p.grad is not None and (trained is None or id(p) in trained)
        )
    issues = []
    if missing:
        nothing = reached == 0
        cut = not nothing and not unused_fatal and _values_reach_loss(module, compute_loss, missing)
        severity: Severity = "error" if nothing or unused_fatal else "warning" if cut else "info"
        if nothing:
            what = "no parameter an optimizer steps gets a gradient: nothing can learn"
        elif cut:
            what = (
                f"yet the loss changes when they change, so the graph is cut between them and the loss and they "
                f"never learn what they affect (the {reached} other(s) do)"
            )
        else:
            what = f"the loss does not change when they change, so they are unused and the {reached} other(s) learn"
        ddp = (
            " Under DDP without `find_unused_parameters=True` this stops training at the next backward."
            if unused_fatal
            else ""
        )
        issues.append(
            Verdict(
                "missing_gradients",
                severity,
                f"{len(missing)} trainable parameter(s) get no gradient from the loss on this batch: "
                f"{', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else "") + f"; {what}.{ddp}",
                {"parameters": ",".join(missing), "count": len(missing), "reached": reached, "cut": int(cut)},
                [
                    "Find where their output leaves autograd (`.detach()`, `torch.no_grad()`, `.item()`, a numpy "
                    "round trip) and keep it in the graph, or freeze them on purpose (`requires_grad_(False)`).",
                    "Under DDP, parameters without a gradient need `DDPStrategy(find_unused_parameters=True)`.",
                ]
                if cut
                else [
                    "If they are used only under another setting or on other batches (an auxiliary encoder, a "
                    "conditional branch, experts), nothing is wrong; to save their memory and optimizer state, "
                    "freeze them (`requires_grad_(False)`) or do not build them.",
                    "Otherwise: an unused layer (defined but not called in forward), or a head the loss ignores.",
                    "Under DDP, parameters without a gradient need `DDPStrategy(find_unused_parameters=True)`.",
                ],
            )
        )
    if bad:
        issues.append(
            Verdict(
                "non_finite_gradients",
                "error",
                f"Non-finite gradients at initialisation in: {', '.join(bad[:8])}.",
                {"parameters": ",".join(bad), "phase": "backward"},
                ["Run NaNGuard (or lightning_diag.testing.assert_forward_backward) to find the operation."],
            )
        )
    return issues


# -- batch independence ----------------------------------------------------------------------------------------------
def _multi_process() -> bool:
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def _values_reach_loss(
    module: nn.Module, compute_loss: Callable[[], torch.Tensor], names: Sequence[str]
) -> bool:
    """Whether the loss moves when the parameters ``names`` move (same random state for both forwards, so dropout
    cancels out). A loss that cannot be computed again counts as unmoved, and so does every probe in a
    multi-process run (no extra forward there): the finding then stays info.
    """
    if _multi_process():
        # the extra forwards may run collectives (FSDP2's all-gathers, SyncBatchNorm), and another rank may have no
        # parameter to probe: never risk a rank waiting alone
        return False
    wanted = set(names)
    params = [local_tensor(p) for n, p in module.named_parameters() if n in wanted]
    saved = [p.detach().clone() for p in params]
    try:
        with preserved_module(module), torch.no_grad():
            with preserved_rng():
                before = compute_loss().detach().float().sum()
            for p in params:
                p.mul_(-1.5).add_(0.5)  # sign, scale and offset all change, zero-initialised ones too
            with preserved_rng():
                after = compute_loss().detach().float().sum()
        moved = float((after - before).abs())
        return bool(moved > 1e-6 * max(float(before.abs()), 1.0))
    except Exception:  # a second forward the model refuses is no evidence either way
        return False
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)  # the user's weights, exactly as they were


def check_batch_independence(
    forward: Callable[[torch.Tensor], Any], module: nn.Module, x: torch.Tensor, sample: int = 0
) -> list[Verdict]:
    """The output of sample ``sample`` must not depend on any other sample of ``x``: a gradient test for float
    inputs, a forward test (:func:`_swap_test`) for token ids and other discrete inputs.
    """
    if x.dim() < 1 or x.shape[0] < 2:
        return []
    if not x.is_floating_point():
        return _swap_test(forward, module, x, sample)
    mixing = [n for n, m in module.named_modules() if isinstance(m, BATCH_MIXING)]
    with preserved_module(module), torch.enable_grad():
        if mixing:
            for m in module.modules():
                if isinstance(m, BATCH_MIXING):
                    m.eval()  # BatchNorm mixes samples by design in training mode
        inputs = x.detach().clone().requires_grad_(True)
        out = forward(inputs)
        outputs = [
            t
            for _, t in iter_tensors(out)
            if t.is_floating_point() and t.dim() >= 1 and t.shape[0] == x.shape[0]
        ]
        if not outputs:
            return []
        target = sum(o[sample].float().sum() for o in outputs)
        if not isinstance(target, torch.Tensor) or not target.requires_grad:
            return []
        (grad,) = torch.autograd.grad(target, inputs, allow_unused=True)
    if grad is None:
        return []
    per_sample = grad.reshape(grad.shape[0], -1).abs().amax(dim=1)
    others = [i for i in range(x.shape[0]) if i != sample and float(per_sample[i]) > 0]
    if not others:
        return []
    note = f" (BatchNorm layers {', '.join(mixing[:3])} were put in eval mode for the test)" if mixing else ""
    return [
        Verdict(
            "batch_dependence",
            "warning",
            f"The output of sample {sample} depends on {len(others)} other sample(s) of the batch (e.g. sample "
            f"{others[0]}){note}: something mixes the batch dimension.",
            {
                "sample": sample,
                "dependent_samples": len(others),
                "first": others[0],
                "batchnorm_eval": int(bool(mixing)),
            },
            [
                "Look for a view/reshape/transpose that moves the batch dimension (e.g. x.view(-1, batch) instead of "
                "x.view(batch, -1)), or a reduction over dim 0 (mean/softmax over the batch).",
            ],
        )
    ]


def _swap_test(
    forward: Callable[[torch.Tensor], Any], module: nn.Module, x: torch.Tensor, sample: int
) -> list[Verdict]:
    """Discrete inputs have no gradient: run the model (eval mode, no dropout) on the batch, then on a batch whose
    other samples are all copies of sample ``sample``; its own output must not change.
    """
    with preserved_module(module), preserved_rng(), torch.no_grad():
        module.eval()
        first = [t for _, t in iter_tensors(forward(x)) if t.is_floating_point() and t.dim() >= 1]
        copies = x[sample : sample + 1].expand_as(x).clone()
        second = [t for _, t in iter_tensors(forward(copies)) if t.is_floating_point() and t.dim() >= 1]
    pairs = [
        (a[sample].float(), b[sample].float())
        for a, b in zip(first, second, strict=False)
        if a.shape == b.shape and a.shape[0] == x.shape[0]
    ]
    if not pairs:
        return []
    moved = max(float((a - b).abs().max()) for a, b in pairs)
    scale = max(float(a.abs().max()) for a, _ in pairs)
    if moved <= 1e-4 * max(scale, 1.0):
        return []
    return [
        Verdict(
            "batch_dependence",
            "warning",
            f"The output of sample {sample} changes by up to {moved:.3g} (outputs up to {scale:.3g}) when the other "
            "samples of the batch are replaced (eval mode, no dropout): something mixes the batch dimension.",
            {"sample": sample, "max_change": moved, "output_scale": scale, "test": "swap"},
            [
                "Look for a softmax, mean, sum or normalisation over dim 0 (the batch) where the sequence or "
                "feature dimension was meant, or a view/reshape that moves the batch dimension.",
            ],
        )
    ]


# -- overfit one batch -------------------------------------------------------------------------------------------------
class _Optimizers:
    """Adam for the dense parameters and SparseAdam for those with sparse gradients, stepped as one."""

    def __init__(self, parts: list[torch.optim.Optimizer]) -> None:
        self.parts = parts

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for part in self.parts:
            part.step()


def overfit_optimizer(module: nn.Module, params: Sequence[nn.Parameter], lr: float) -> Any:
    """Adam over ``params``; the weights of sparse embeddings (whose gradients Adam refuses) get SparseAdam."""
    sparse_ids = {
        id(m.weight)
        for m in module.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and getattr(m, "sparse", False)
    }
    sparse = [p for p in params if id(p) in sparse_ids]
    if not sparse:
        return torch.optim.Adam(params, lr=lr)
    dense = [p for p in params if id(p) not in sparse_ids]
    parts: list[torch.optim.Optimizer] = [torch.optim.SparseAdam(sparse, lr=lr)]
    if dense:
        parts.append(torch.optim.Adam(dense, lr=lr))
    return _Optimizers(parts)


def check_overfit_batch(
    module: nn.Module,
    compute_loss: Callable[[nn.Module], torch.Tensor],
    make_optimizer: Callable[[Sequence[nn.Parameter]], Any] | None = None,
    steps: int = 50,
    min_drop: float = 0.5,
    lr: float = 1e-3,
) -> list[Verdict]:
    """Train a deep copy of ``module`` on one batch for ``steps`` steps: its loss must fall by ``min_drop``.

    The optimizer is ``make_optimizer(params)``, by default Adam at ``lr`` (SparseAdam for sparse embeddings).
    """
    clone = copy.deepcopy(module)
    clone.train()
    params = [p for p in clone.parameters() if p.requires_grad]
    if not params:
        return [
            Verdict(
                "cannot_overfit_batch",
                "error",
                "The model has no trainable parameter: it cannot learn anything.",
                {},
                ["Check `requires_grad` and what `configure_optimizers` returns."],
            )
        ]
    optimizer = make_optimizer(params) if make_optimizer else overfit_optimizer(clone, params, lr)
    losses: list[float] = []
    with preserved_rng(), torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = compute_loss(clone).float().sum()
            losses.append(float(loss.detach()))
            if not loss.requires_grad:
                break
            loss.backward()
            optimizer.step()
        losses.append(float(compute_loss(clone).float().sum().detach()))
    first, last = losses[0], losses[-1]
    if math.isfinite(first) and math.isfinite(last) and (first <= 0 or last <= (1 - min_drop) * first):
        return []
    return [
        Verdict(
            "cannot_overfit_batch",
            "error" if not math.isfinite(last) else "warning",
            f"Trained on a single batch for {len(losses) - 1} steps, the loss went from {first:.4g} to {last:.4g} "
            f"(less than the {min_drop:.0%} drop a working model achieves).",
            {"first_loss": first, "last_loss": last, "steps": len(losses) - 1},
            [
                "A model that cannot memorise one batch has a bug: detached graph, frozen layers, wrong loss input "
                "(probabilities vs logits), labels misaligned with inputs, or a learning rate far off.",
            ],
        )
    ]


# -- all of them ---------------------------------------------------------------------------------------------------
class NoLoss(RuntimeError):
    """``training_step`` returned no loss for the batch the model checks need (Lightning skips such a batch)."""


#: ``loss_fn(module, batch)``: the module's training loss on the batch (``None`` when it returns none)
LossFn = Callable[[nn.Module, Any], "torch.Tensor | None"]


def check_sigmoid_as_logits(call: LossCall) -> list[Verdict]:
    """Probabilities given to ``binary_cross_entropy_with_logits`` (a ``sigmoid`` before ``BCEWithLogitsLoss``): the
    loss's input is the output of a ``sigmoid`` of the same step (seen, not guessed: a fresh model's logits can all
    fall in ``[0, 1]`` by chance) and every value is in ``[0, 1]``, not all equal.
    """
    x = call.input.detach().float()
    if call.name != "binary_cross_entropy_with_logits" or not call.from_sigmoid or x.numel() < 2:
        return []
    if not (bool((x >= 0).all()) and bool((x <= 1).all())) or float(x.max() - x.min()) == 0:
        return []
    floor = -math.log(1 / (1 + math.exp(-1)))  # a positive label's loss at the largest probability, 1
    return [
        Verdict(
            "loss_at_init",
            "warning",
            "The model outputs probabilities (every output is in [0, 1]) and the loss is binary cross-entropy with "
            "logits: sigmoid is applied twice. Gradients are squashed and a positive label's loss cannot go below "
            f"-ln(sigmoid(1)) = {floor:.4g}.",
            {"floor": round(floor, 6), "outputs": int(x.numel()), "certain": 1},
            [
                "Remove the final sigmoid: BCEWithLogitsLoss / F.binary_cross_entropy_with_logits take logits.",
                "If the model must output probabilities, train with BCELoss / F.binary_cross_entropy instead.",
            ],
        )
    ]


def check_target_scale(call: LossCall, *, limit: float = 100.0, gap: float = 30.0) -> list[Verdict]:
    """A regression target far from unit scale (root-mean-square above ``limit``) that the model's outputs at
    initialisation are ``gap`` times or more below: the first steps spend themselves on the scale, and a model that
    never bridges it ends no better than predicting the target's mean (``expected``: the loss of that constant
    prediction, which the end-of-fit gate compares the run's loss with).
    """
    if call.name not in REGRESSION_LOSSES.values() or not call.target.is_floating_point():
        return []
    y, out = call.target.detach().float(), call.input.detach().float()
    if y.numel() < 2 or not bool(torch.isfinite(y).all()) or not bool(torch.isfinite(out).all()):
        return []
    y_rms, out_rms = float(y.pow(2).mean().sqrt()), float(out.pow(2).mean().sqrt())
    if y_rms <= limit or y_rms < gap * out_rms:
        return []
    centred = y - y.mean()
    mean_loss = float(centred.pow(2).mean() if call.name == "mse_loss" else centred.abs().mean())
    extreme = y_rms >= EXTREME_GAP * max(
        out_rms, 1e-12
    )  # orders of magnitude: a preprocessing slip, not a design
    wrap = (lambda v: v) if extreme else pending
    return [
        wrap(
            Verdict(
                "loss_at_init",
                "warning",
                f"The regression target of `{call.name}` has a root-mean-square of {y_rms:.3g} while the model's "
                f"outputs at initialisation have {out_rms:.3g}: the loss at initialisation measures the scale gap, "
                "not the task.",
                {
                    "loss": call.name,
                    "target_rms": y_rms,
                    "output_rms": out_rms,
                    "expected": mean_loss,
                    "expected_is": "the loss of predicting the target's mean",
                    **({"certain": 1} if extreme else {}),
                },
                [
                    "Standardise the target (subtract its mean, divide by its std) and invert the transform at "
                    "prediction time; or scale the loss.",
                    "Initialise the output layer's bias at the target's mean.",
                ],
            )
        )
    ]


def check_loss_calls(calls: Sequence[LossCall]) -> list[Verdict]:
    """The loss at initialisation of the first cross-entropy / NLL call with ``[batch, C]`` inputs and class-index
    targets (against ``ln(C)``), and probabilities fed to a loss that takes logits (softmax or sigmoid twice).
    """
    for call in calls:
        if call.name in REGRESSION_LOSSES.values():
            return check_target_scale(call)
        if call.name == "binary_cross_entropy_with_logits":
            return check_sigmoid_as_logits(call)
        if call.name not in ("cross_entropy", "nll_loss") or call.input.dim() != 2 or call.target.dim() != 1:
            continue
        if call.target.is_floating_point() or call.input.shape[0] != call.target.shape[0]:
            continue
        loss = float(call.value.detach().float().sum()) if call.value.numel() == 1 else math.nan
        if call.name != "cross_entropy":
            return []
        found = [
            v if v.evidence.get("certain") else pending(v)
            for v in check_loss_at_init(loss, int(call.input.shape[1]))
        ]
        # softmax applied twice is a fact, not a symptom: the loss cannot go below its floor
        return found + check_probabilities_as_logits(call.input, call.target, loss)
    return []


def chance_loss(calls: Sequence[LossCall]) -> float | None:
    """The loss of a uniform guess, ``ln(C)``, for the first C-class cross-entropy (logits ``(N, C)``, class-index
    targets) among ``calls``.

    Not the targets' entropy (the best constant prediction): a language model sits at the unigram entropy for a
    while on its way down (the "unigram plateau" of small transformers), and a healthy run there must stay quiet.
    """
    for call in calls:
        classes = int(call.input.shape[1]) if call.input.dim() == 2 else 0
        integer_targets = call.target.dim() == 1 and not call.target.is_floating_point()
        if call.name == "cross_entropy" and integer_targets and classes >= 2:
            return math.log(classes)
    return None


def run_checks(
    model: nn.Module,
    batches: list[Any],
    loss_fn: LossFn,
    *,
    copyable: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    data: bool = True,
    inputs: bool = True,
    loss_at_init: bool = True,
    gradients: bool = True,
    batch_independence: bool = True,
    overfit_batch_steps: int = 0,
    overfit_lr: float = 1e-3,
    min_drop: float = 0.5,
    trained: Collection[int] | None = None,
    unused_fatal: bool = False,
    shuffled: bool | None = None,
    activation_scale: bool = True,
    facts: dict[str, float] | None = None,
) -> list[Verdict]:
    """All enabled checks on ``batches`` (the NaN/Inf check on each, the model checks on the first), the model
    left untouched.

    Args:
        model: the model (a LightningModule).
        batches: batches already on the model's device.
        loss_fn: ``loss_fn(module, batch)``, the training loss of ``module`` (the model or a copy) on ``batch``.
        copyable: a context inside which ``copy.deepcopy(model)`` copies the model only (the overfit check).
        data: run :func:`check_data` (NaN/Inf) on every batch.
        inputs: observe the first batch's step (:func:`observe_step`) and judge what the model consumed: the first
            layer's input scale and the targets of a classification loss.
        loss_at_init: run :func:`check_loss_calls` on that step's classification losses.
        gradients: run :func:`check_gradients`.
        batch_independence: run :func:`check_batch_independence` (float inputs only).
        overfit_batch_steps: steps of :func:`check_overfit_batch` (``0``: off).
        overfit_lr: the learning rate of the overfit check (Adam).
        min_drop: the loss drop the overfit check requires.
        trained: ids of the parameters the optimizers update (see :func:`check_gradients`), when known.
        unused_fatal: parameters without a gradient stop the run (DDP without ``find_unused_parameters``).
        shuffled: whether the training loader shuffles (``None``: unknown), for :func:`check_labels`.
        activation_scale: run :func:`~lightning_diag.core.activations.check_activation_scale` (forward only).
        facts: filled with what the observed step showed about the task: ``chance_loss``, the loss of a uniform
            guess (:func:`chance_loss`) when the step's loss is a C-class cross-entropy.
    """
    results: list[Verdict] = []
    if data:
        seen: set[tuple[str, str]] = set()
        for batch in batches:
            for result in check_data(batch):
                key = (result.code, result.message)
                if key not in seen:
                    seen.add(key)
                    results.append(result)
    if not batches:
        return results
    batch = batches[0]

    def loss_of(module: nn.Module) -> torch.Tensor:
        loss = loss_fn(module, batch)
        if loss is None:
            raise NoLoss("training_step returned no loss on this batch")
        return loss

    if inputs or loss_at_init:
        try:
            view = observe_step(model, lambda: loss_of(model))
        except NoLoss:
            raise
        except Exception:  # the step cannot run outside the loop: nothing to observe (training will tell)
            view = StepView()
        if inputs and view.first_layer is not None:
            results += check_input_scale(*view.first_layer, loss=view.loss)
        classification = [c for c in view.losses if c.name in CLASSIFICATION_LOSSES.values()]
        chance = chance_loss(view.losses)
        if facts is not None and chance is not None:
            facts["chance_loss"] = chance
        if inputs and classification:
            results += check_labels(classification[0], shuffled=shuffled)
        if loss_at_init:
            results += check_loss_calls(view.losses)
    if gradients:
        results += check_gradients(model, lambda: loss_of(model), trained, unused_fatal=unused_fatal)
    x = model_input(batch)
    if batch_independence and x is not None:
        # forward may need more than one input: then the check does not apply
        with contextlib.suppress(Exception):
            results += check_batch_independence(model, model, x)
    if activation_scale and x is not None:
        # forward may need more than one input: then the check does not apply; a symptom, pending a consequence
        with preserved_module(model), contextlib.suppress(Exception):
            scale = check_activation_scale(model, model, x)
            results += [pending(v) if v.severity == "warning" else v for v in scale]
    if overfit_batch_steps > 0:
        with copyable():
            results += check_overfit_batch(
                model,
                loss_of,
                None,
                steps=overfit_batch_steps,
                min_drop=min_drop,
                lr=overfit_lr,
            )
    return results
