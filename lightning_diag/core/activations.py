"""Activation health: dead units, saturated units and the activation scale across depth, and their words.

Three mechanisms, all on the device until one packed read:

* :class:`DeadRows`: per output unit (row) of every ``Linear``/``ConvNd`` weight, whether its gradient row (and its
  bias entry) was exactly zero on every optimizer step since the last check. A ReLU unit that is off for every
  sample of a batch gets an exactly-zero row, so a unit whose row stays zero for a whole check interval never fired
  on any of those batches (keras-contrib's ``DeadReluDetector`` definition, measured on the training batches). The
  rows of a step are reduced by a few kernels per group of weights that share their row length (a concatenation,
  an absolute value, a row sum and an add), never by a Python loop of kernels per tensor.
* :class:`ActivationProbe`: forward hooks, attached for one batch and removed, that reduce on the device, per
  ``Linear``/``ConvNd`` layer and per activation module: the RMS of the layer's input and output, the ReLU-family
  on-rate per unit, the GELU/SiLU mean ``|a|`` per unit (dormant score), the share of tanh/sigmoid inputs in the
  saturated range. An activation is attributed to the weight layer that produced its input (the last
  ``Linear``/``ConvNd`` that ran, when its output has the activation input's shape: ``Linear -> BatchNorm -> ReLU``
  links too).
* :func:`check_activation_scale`: the RMS of the pre-activations across depth on one batch, and whether it follows
  a geometric trend over the stack (the pre-flight check of ``SanityCheck``).

Rules and thresholds (:class:`ActivationRules`; anchors: SageMaker Debugger ``DeadRelu``/``SaturatedActivation``/
``PoorWeightInitialization``, DeepDiagnosis, AutoTrainer, Sokar et al. 2023):

* a unit is **dead** when its gradient row was exactly 0 on every step of the check interval; a GELU/SiLU/Mish
  unit is **dormant** (counted as dead) when its mean ``|a|`` is at most :data:`DORMANT_SCORE` (0.025) of its
  layer's average; without gradient rows (sharded or non-dense gradients) a ReLU unit with an on-rate below
  :data:`DEAD_ON_RATE` (1%) on the check batch is dead;
* a pre-activation is **saturated** when ``|z| >=`` :data:`SATURATION` (tanh 5, sigmoid 10: the derivative is below
  2e-4 of its peak there);
* ``dead_units`` / ``saturated_activations``: at least ``layer_share`` (50%) of a layer's units dead / of its
  pre-activations saturated at ``patience`` consecutive checks. They are symptoms (the severity policy of
  :mod:`lightning_diag.core.consequences`): recorded as ``info`` pending a consequence, made warnings at the end of
  fit when one followed (a plateau or underfitting they explain, gradients that vanished to exactly 0 behind them, a
  training loss that got worse after them or never moved); AutoTrainer reports dying ReLUs only when the model also
  fails to converge, for the same reason: sparse ReLU layers that still learn are healthy;
* ``activation_scale``: over at least three depth ratios, the pre-activation RMS changes by more than
  :data:`SCALE_FACTOR` (10x) over the stack at the typical per-layer rate (the median ratio), and the second half
  of the stack still shrinks/grows (below 0.8x / above 1.25x per layer: a geometric trend, not a transient that
  settles at a bias-driven level as PyTorch's default init does). After a bounded activation (tanh/sigmoid) the
  next layer's gain counts, since the activation hides the growth by saturating. **Warning** from
  :data:`SCALE_WARNING` (1000x), info between.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_diag.core.verdict import Severity, Verdict

__all__ = [
    "DEAD_ON_RATE",
    "DORMANT_SCORE",
    "SATURATION",
    "SCALE_FACTOR",
    "SCALE_WARNING",
    "ActivationProbe",
    "ActivationRules",
    "DeadRows",
    "LayerReading",
    "activation_kind",
    "check_activation_scale",
    "scale_trend",
    "weight_layers",
]

#: A ReLU unit on for fewer than this share of the check batch's samples is off (smdebug ``threshold_inactivity``).
DEAD_ON_RATE = 0.01
#: A GELU/SiLU/Mish unit whose mean ``|a|`` is at most this share of its layer's average is dormant (ReDo).
DORMANT_SCORE = 0.025
#: ``|z|`` from which a bounded activation is saturated: its derivative is below ~2e-4 of its peak.
SATURATION: dict[str, float] = {"tanh": 5.0, "sigmoid": 10.0}
#: The change of the pre-activation RMS over the stack that ``activation_scale`` reports (info)...
SCALE_FACTOR = 10.0
#: ...and the change from which it is a warning.
SCALE_WARNING = 1000.0
#: Per-layer factors a stack needs before its trend is judged (three: at least three activation layers).
MIN_RATIOS = 3
#: Per-layer ratios the second half of the stack must stay beyond for the trend to count as geometric.
_PERSIST = (0.8, 1.25)

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_KINDS: tuple[tuple[tuple[type[nn.Module], ...], str], ...] = (
    ((nn.ReLU, nn.ReLU6), "relu"),
    ((nn.GELU, nn.SiLU, nn.Mish), "smooth"),
    ((nn.Tanh,), "tanh"),
    ((nn.Sigmoid,), "sigmoid"),
)
_BOUNDED = ("tanh", "sigmoid")
_NAMES = {"relu": "ReLU", "smooth": "GELU/SiLU", "tanh": "tanh", "sigmoid": "sigmoid"}


def activation_kind(module: nn.Module) -> str | None:
    """``"relu"``, ``"smooth"`` (GELU/SiLU/Mish), ``"tanh"``, ``"sigmoid"``, or ``None`` for other modules."""
    for types, kind in _KINDS:
        if isinstance(module, types):
            return kind
    return None


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``Linear``/``ConvNd`` modules of ``model`` (qualified names), those whose weight is trainable."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, WEIGHT_LAYERS) and isinstance(m.weight, torch.Tensor) and m.weight.requires_grad
    ]


# -- always on: gradient rows ------------------------------------------------------------------------------------
@dataclasses.dataclass
class _RowGroup:
    positions: list[int]  # indices of the weights in the step's gradient list
    flat: bool  # the weights are 2-d already (no reshape)
    quiet: torch.Tensor  # per row: consecutive steps, up to the last one, on which the row was exactly 0


class DeadRows:
    """Per output unit of each weight layer: whether its gradient row and bias entry have stayed exactly zero.

    Built for one list of parameters (the step context's): ``layers`` maps a weight layer's name to the position of
    its weight and of its bias (or ``None``) in that list. :meth:`update` counts, per row on the device (no sync),
    the consecutive steps up to the last one on which the row (and its bias entry) was exactly 0. A unit is dead at a
    check when that count covers at least the later half of the steps since :meth:`reset` (all of them when it was
    dead throughout): a unit that died in the middle of an interval counts at the check that ends it, one that
    fired in its later half does not. The counts run on across :meth:`reset`. Weights of the same row length, dtype
    and device are reduced together.
    """

    def __init__(self, grads: Sequence[torch.Tensor], layers: Mapping[str, tuple[int, int | None]]) -> None:
        self.names = list(layers)
        self.units = {name: int(grads[w].shape[0]) for name, (w, _) in layers.items()}
        keyed: dict[tuple[int, torch.dtype, torch.device], list[str]] = {}
        for name, (w, _) in layers.items():
            g = grads[w]
            keyed.setdefault((int(g[0].numel()), g.dtype, g.device), []).append(name)
        self.groups: list[_RowGroup] = []
        self._rows: dict[str, tuple[int, int]] = {}  # name -> (group, offset)
        for names in keyed.values():
            offset = 0
            for name in names:
                self._rows[name] = (len(self.groups), offset)
                offset += self.units[name]
            positions = [layers[n][0] for n in names]
            device = grads[positions[0]].device
            flat = all(grads[p].dim() == 2 for p in positions)
            # (float32 counts: exact up to 2**24 steps, multiplied by the 0/1 mask in place)
            self.groups.append(_RowGroup(positions, flat, torch.zeros(offset, device=device)))
        self.bias_positions = [b for _, b in layers.values() if b is not None]
        self._bias_rows: dict[str, int] = {}
        offset = 0
        for name, (_, b) in layers.items():
            if b is not None:
                self._bias_rows[name] = offset
                offset += self.units[name]
        device = grads[self.bias_positions[0]].device if self.bias_positions else torch.device("cpu")
        self.bias_quiet = torch.zeros(offset, device=device)
        self.steps = 0

    def update(self, grads: Sequence[torch.Tensor]) -> None:
        """Fold one step's gradients in (a few kernels per group, no sync)."""
        for group in self.groups:
            picked = [grads[i] for i in group.positions]
            if not group.flat:
                picked = [g.reshape(g.shape[0], -1) for g in picked]
            # |g| summed per row is 0 exactly when the row is (no squares: tiny gradients do not underflow);
            # abs_ works on our own copy (the concatenation), abs on a gradient we must not touch
            rows = torch.cat(picked).abs_() if len(picked) > 1 else picked[0].abs()
            group.quiet.add_(1).mul_(rows.sum(1, dtype=torch.float32) == 0)  # NaN/Inf rows are alive
        if self.bias_positions:
            biases = [grads[i] for i in self.bias_positions]
            bias = torch.cat(biases) if len(biases) > 1 else biases[0]
            self.bias_quiet.add_(1).mul_(bias == 0)
        self.steps += 1

    def dead(self, name: str) -> torch.Tensor:
        """Per unit of layer ``name``: exactly 0 on every step of at least the later half of those since the last
        reset, up to the last one (a bool device tensor; all True when no step was seen since).
        """
        group, offset = self._rows[name]
        units = self.units[name]
        needed = (self.steps + 1) // 2
        mask = self.groups[group].quiet[offset : offset + units] >= needed
        if name in self._bias_rows:
            start = self._bias_rows[name]
            mask = mask & (self.bias_quiet[start : start + units].to(mask.device) >= needed)
        return mask

    def reset(self) -> None:
        """Start a new interval (the counts of quiet steps run on)."""
        self.steps = 0

    def state_dict(self) -> dict[str, Any]:
        """The counts as CPU tensors, by layer name (plain types, ``weights_only`` loadable)."""
        rows = {}
        for name in self.names:
            group, offset = self._rows[name]
            rows[name] = self.groups[group].quiet[offset : offset + self.units[name]].detach().cpu()
        bias = {n: self.bias_quiet[s : s + self.units[n]].detach().cpu() for n, s in self._bias_rows.items()}
        return {"quiet_rows": rows, "quiet_bias": bias, "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the counts of the layers that still exist with the same number of units.

        A state of the earlier format (sums of ``|g|`` under ``rows``/``bias``) is not read: the count restarts.
        """
        if "quiet_rows" not in state:
            return
        for name, values in dict(state.get("quiet_rows", {})).items():
            if name in self._rows and int(values.numel()) == self.units[name]:
                group, offset = self._rows[name]
                quiet = self.groups[group].quiet
                quiet[offset : offset + self.units[name]] = values.to(quiet.device, quiet.dtype)
        for name, values in dict(state.get("quiet_bias", {})).items():
            if name in self._bias_rows and int(values.numel()) == self.units[name]:
                start = self._bias_rows[name]
                self.bias_quiet[start : start + self.units[name]] = values.to(
                    self.bias_quiet.device, self.bias_quiet.dtype
                )
        self.steps = int(state.get("steps", self.steps))


# -- check steps: forward hooks ----------------------------------------------------------------------------------
@dataclasses.dataclass
class _Call:
    """One forward call of a hooked module, in order (host facts, device norms)."""

    name: str
    kind: str | None  # None for a weight layer
    norm_in: torch.Tensor  # 2-norm of the input (pre-activation for an activation)
    numel_in: int
    norm_out: torch.Tensor | None = None  # 2-norm of a weight layer's output
    numel_out: int = 0
    link: int | None = None  # index of the weight-layer call that produced an activation's input


@dataclasses.dataclass
class _Unit:
    """Per-layer statistics of one check batch (device sums, host counts)."""

    key: str
    activation: str | None = None
    kind: str | None = None
    units: int = 0
    samples: int = 0  # samples per unit seen
    on: torch.Tensor | None = None  # ReLU family: per unit, samples with z > 0
    magnitude: torch.Tensor | None = None  # GELU/SiLU: per unit, sum of |a|
    saturated: torch.Tensor | None = None  # tanh/sigmoid: values with |z| beyond the threshold
    values: int = 0  # pre-activation values seen


class ActivationProbe:
    """Forward hooks on a model's weight layers and activation modules, for one batch: :meth:`attach`, run the
    forward, :meth:`detach`. Everything is reduced on the device; nothing is read here.

    ``per_unit=False`` keeps only the per-call norms (what :func:`check_activation_scale` needs).
    """

    def __init__(self, model: nn.Module, per_unit: bool = True) -> None:
        self.per_unit = per_unit
        self.weights = {name: m for name, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)}
        self.activations = {
            name: (m, kind) for name, m in model.named_modules() if (kind := activation_kind(m)) is not None
        }
        self.calls: list[_Call] = []
        self.layers: dict[str, _Unit] = {}
        self._handles: list[Any] = []
        self._last_weight: int | None = None

    def attach(self) -> None:
        self.detach()
        self.calls, self.layers, self._last_weight = [], {}, None
        for name, m in self.weights.items():
            self._handles.append(m.register_forward_hook(self._weight_hook(name)))
        for name, (m, kind) in self.activations.items():
            self._handles.append(m.register_forward_pre_hook(self._pre_hook(name, kind)))
            if kind == "smooth" and self.per_unit:
                self._handles.append(m.register_forward_hook(self._post_hook(name)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _weight_hook(self, name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if not args or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
                return
            with torch.no_grad():
                x, z = args[0].detach(), out.detach()
                self.calls.append(
                    _Call(name, None, _norm(x), x.numel(), _norm(z), z.numel()),
                )
                self._last_weight = len(self.calls) - 1

        return hook

    def _pre_hook(self, name: str, kind: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
                return
            with torch.no_grad():
                z = args[0].detach()
                link = self._link(z)
                self.calls.append(_Call(name, kind, _norm(z), z.numel(), link=link))
                if self.per_unit:
                    self._unit_stats(name, kind, z, link)

        return hook

    def _link(self, z: torch.Tensor) -> int | None:
        """The last weight-layer call, when its output has ``z``'s shape (it produced this activation's input)."""
        i = self._last_weight
        if i is None or self.calls[i].numel_out != z.numel():
            return None
        return i

    def _unit_dim(self, z: torch.Tensor, link: int | None) -> int:
        if link is not None and not isinstance(self.weights[self.calls[link].name], nn.Linear):
            return 1  # convolution: channels
        return z.dim() - 1

    def _unit_stats(self, name: str, kind: str, z: torch.Tensor, link: int | None) -> None:
        if z.dim() < 2:
            return
        key = self.calls[link].name if link is not None else name
        dim = self._unit_dim(z, link)
        units = int(z.shape[dim])
        unit = self.layers.get(key)
        if unit is None:
            unit = self.layers[key] = _Unit(key, name, kind, units)
        if unit.units != units or unit.kind != kind:
            return  # the same key seen with another shape (a shared module): keep the first
        dims = tuple(d for d in range(z.dim()) if d != dim)
        unit.values += z.numel()
        unit.samples += z.numel() // max(units, 1)
        if kind == "relu":
            on = (z > 0).sum(dims, dtype=torch.float32)
            unit.on = on if unit.on is None else unit.on + on
        elif kind in _BOUNDED:
            count = (z.abs() >= SATURATION[kind]).sum(dtype=torch.float32)
            unit.saturated = count if unit.saturated is None else unit.saturated + count

    def _post_hook(self, name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
            if not isinstance(out, torch.Tensor) or out.dim() < 2 or not self.calls:
                return
            call = self.calls[-1]
            if call.name != name:
                return
            key = self.calls[call.link].name if call.link is not None else name
            unit = self.layers.get(key)
            if unit is None or unit.kind != "smooth":
                return
            with torch.no_grad():
                dim = self._unit_dim(out, call.link)
                if int(out.shape[dim]) != unit.units:
                    return
                dims = tuple(d for d in range(out.dim()) if d != dim)
                size = out.detach().abs().sum(dims, dtype=torch.float32)
                unit.magnitude = size if unit.magnitude is None else unit.magnitude + size

        return hook

    # -- reduction ------------------------------------------------------------------------------------------------
    def raw(self) -> dict[str, torch.Tensor]:
        """The sums to add over data-parallel ranks before :meth:`summary` (device tensors, by name)."""
        parts: dict[str, torch.Tensor] = {}
        device = self._device()
        for key, unit in self.layers.items():
            counts = torch.tensor([float(unit.samples), float(unit.values)], device=device)
            parts[f"{key}|counts"] = counts
            for field in ("on", "magnitude", "saturated"):
                value = getattr(unit, field)
                if value is not None:
                    parts[f"{key}|{field}"] = value.reshape(-1)
        norms = self._norms()
        for key, value in norms.items():
            parts[f"{key}|norms"] = value
        return parts

    def _device(self) -> torch.device:
        return self.calls[0].norm_in.device if self.calls else torch.device("cpu")

    def _norms(self) -> dict[str, torch.Tensor]:
        """Per weight layer and per unlinked activation: [sum of squares in, values in, sum of squares out,
        values out] (out: the input of the activation it feeds, when one does, else its output).
        """
        rows: dict[int, tuple[str, list[torch.Tensor]]] = {}
        device = self._device()
        for i, call in enumerate(self.calls):
            if call.kind is None:
                out = _out_norm(call)
                rows[i] = (
                    call.name,
                    [call.norm_in, _f(call.numel_in, device), out, _f(call.numel_out, device)],
                )
            elif call.link is not None and call.link in rows:
                rows[call.link][1][2:] = [call.norm_in, _f(call.numel_in, device)]
            else:
                n = _f(call.numel_in, device)
                rows[i] = (call.name, [call.norm_in, n, call.norm_in, n])
        found: dict[str, list[torch.Tensor]] = {}
        for name, (norm_in, n_in, norm_out, n_out) in rows.values():
            found.setdefault(name, []).append(torch.stack([norm_in.square(), n_in, norm_out.square(), n_out]))
        return {k: torch.stack(v).sum(0) for k, v in found.items()}

    def summary(
        self, raw: Mapping[str, torch.Tensor], dead_rows: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Per layer key, the device vector ``[rms, rms_in, dead_frac, on_rate, saturated_frac]`` (NaN where
        unknown) from the (rank-summed) ``raw`` sums and the gradient-row dead masks. Keys: the weight layers seen
        in the forward or in ``dead_rows``, and the activations not linked to one.
        """
        keys = list(dict.fromkeys([*(k.split("|")[0] for k in raw), *(dead_rows or {})]))
        sources = [*raw.values(), *(dead_rows or {}).values()]
        device = sources[0].device if sources else torch.device("cpu")
        nan = torch.tensor(math.nan, device=device)
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            norms = raw.get(f"{key}|norms")
            rms = (norms[2] / norms[3].clamp_min(1)).sqrt() if norms is not None else nan
            rms_in = (norms[0] / norms[1].clamp_min(1)).sqrt() if norms is not None else nan
            dead, on_rate, saturated = self._unit_summary(key, raw, dead_rows, nan)
            out[key] = torch.stack([rms, rms_in, dead, on_rate, saturated]).float()
        return out

    def _unit_summary(
        self,
        key: str,
        raw: Mapping[str, torch.Tensor],
        dead_rows: Mapping[str, torch.Tensor] | None,
        nan: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grad_dead = (dead_rows or {}).get(key)
        unit = self.layers.get(key)
        counts = raw.get(f"{key}|counts")
        dead, on_rate, saturated = nan, nan, nan
        mask = grad_dead.to(nan.device) if grad_dead is not None else None
        if unit is not None and counts is not None:
            samples = counts[0].clamp_min(1)
            on = raw.get(f"{key}|on")
            if on is not None:
                rate = on / samples
                on_rate = rate.mean()
                off = rate < DEAD_ON_RATE
                # a zero gradient row of a unit that fires is starved (no gradient from above), not dead
                mask = off if mask is None or mask.shape != off.shape else mask & off
            size = raw.get(f"{key}|magnitude")
            if size is not None:
                score = size / size.mean().clamp_min(1e-30)
                dormant = score <= DORMANT_SCORE
                mask = dormant if mask is None or mask.shape != dormant.shape else mask | dormant
            sat = raw.get(f"{key}|saturated")
            if sat is not None:
                saturated = sat.reshape(()) / counts[1].clamp_min(1)
        if mask is not None and mask.numel():
            dead = mask.float().mean()
        return dead, on_rate, saturated


def _norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t, dtype=torch.float32)


def _f(value: float, device: torch.device) -> torch.Tensor:
    return torch.tensor(float(value), device=device)


#: The order of the numbers of one layer in :meth:`ActivationProbe.summary`.
SUMMARY_FIELDS = ("rms", "rms_in", "dead_frac", "on_rate", "saturated_frac")


# -- rules ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LayerReading:
    """What one check read about one layer (NaN: not measured)."""

    name: str
    rms: float = math.nan
    rms_in: float = math.nan
    dead_frac: float = math.nan
    on_rate: float = math.nan
    saturated_frac: float = math.nan
    activation: str | None = None  # the activation module attributed to the layer
    kind: str | None = None
    units: int = 0
    description: str = ""  # "Linear 64->32"
    dead_source: str = "gradients"  # "gradients", "on_rate" or "dormant"
    bias_mean: float = math.nan
    rows: bool = False  # dead_frac includes the gradient rows of this layer

    @classmethod
    def from_summary(cls, name: str, values: Sequence[float], **facts: Any) -> LayerReading:
        v = [float(x) for x in values][: len(SUMMARY_FIELDS)]
        v += [math.nan] * (len(SUMMARY_FIELDS) - len(v))
        return cls(name, v[0], v[1], v[2], v[3], v[4], **facts)


class ActivationRules:
    """The ``dead_units`` / ``saturated_activations`` rules over successive checks (a small state machine).

    :meth:`update` takes one check's readings (in forward order) and returns the verdicts to record: one per code,
    naming every layer for which the condition held ``patience`` consecutive checks. They are symptoms
    (:data:`lightning_diag.core.consequences.POLICY`): recorded as ``info`` with ``evidence["pending"] = 1``, and the
    end-of-fit gate makes them warnings when a consequence followed (they explain a plateau, underfitting or
    gradients that vanished to exactly 0 through the diagnosis rules, the training loss got worse after them, or the
    run learned nothing). A condition that lasts is recorded again at each check (one finding, its count and last
    step growing), so the gate sees how long it lasted.
    """

    CODES = ("dead_units", "saturated_activations")

    def __init__(self, layer_share: float = 0.5, patience: int = 3, interval: int = 50) -> None:
        self.layer_share = layer_share
        self.patience = patience
        self.interval = interval
        self.streaks: dict[str, list[int]] = {}  # "<code>:<layer>" -> [consecutive checks, first step, epoch]
        self.starved_by: dict[str, list[str]] = {}  # dead layer -> the layers before it that it starves

    def update(
        self, step: int, readings: Sequence[LayerReading], epoch: int = 0
    ) -> list[tuple[str, Verdict, int, int]]:
        """One check: ``(key, verdict, first step, its epoch)`` to record. ``readings`` in forward order."""
        starved = self.starved(readings)
        for name, above in starved.items():
            if above and name not in self.starved_by.setdefault(above, []):
                self.starved_by[above].append(name)
        ready: dict[str, list[tuple[LayerReading, int, int]]] = {code: [] for code in self.CODES}
        for r in readings:
            values = {  # a saturated tanh/sigmoid passes no gradient either: saturated_activations says so
                "dead_units": math.nan if r.name in starved or r.kind in _BOUNDED else r.dead_frac,
                "saturated_activations": r.saturated_frac,
            }
            for code in self.CODES:
                streak = self.streaks.setdefault(f"{code}:{r.name}", [0, step, epoch])
                if math.isfinite(values[code]) and values[code] >= self.layer_share:
                    if streak[0] == 0:
                        streak[1:] = [step, epoch]
                    streak[0] += 1
                else:
                    streak[0] = 0
                if streak[0] >= self.patience:
                    ready[code].append((r, streak[1], streak[2]))
        return [self._verdict(code, found) for code, found in ready.items() if found]

    def _verdict(
        self, code: str, found: Sequence[tuple[LayerReading, int, int]]
    ) -> tuple[str, Verdict, int, int]:
        value = (lambda r: r.dead_frac) if code == "dead_units" else (lambda r: r.saturated_frac)
        layers = [r for r, _, _ in sorted(found, key=lambda item: -value(item[0]))]
        first = min(s for _, s, _ in found)
        first_epoch = min(e for _, s, e in found if s == first)
        if code == "dead_units":
            verdict = dead_units(
                layers, self.patience, self.interval, self.starved_by.get(layers[0].name, [])
            )
        else:
            verdict = saturated_activations(layers, self.patience, self.interval)
        return f"{code}:{','.join(sorted(r.name for r in layers))}", verdict, first, first_epoch

    def starved(self, readings: Sequence[LayerReading]) -> dict[str, str]:
        """Layers judged from their gradient rows alone (no activation module) whose zero rows say nothing about
        their units: the next weight layer receives no gradient either (a dead layer above them, a loss that is
        exactly 0), or no layer follows (the output layer, whose rows are zero where the loss ignores an output).
        Name -> the dead layer above that starves it ("" when there is none).
        """
        with_rows = [r for r in readings if r.rows]
        unjudged = [
            r
            for i, r in enumerate(with_rows)
            if r.dead_source == "gradients"
            and not r.activation
            and r.dead_frac >= self.layer_share
            and not (i + 1 < len(with_rows) and with_rows[i + 1].dead_frac < 0.999)
        ]
        found: dict[str, str] = {}
        for r in unjudged:
            later = with_rows[with_rows.index(r) + 1 :]
            found[r.name] = next(
                (x.name for x in later if x.dead_frac >= self.layer_share and x not in unjudged), ""
            )
        return found

    def state_dict(self) -> dict[str, Any]:
        return {
            "streaks": {k: list(v) for k, v in self.streaks.items()},
            "starved_by": {k: list(v) for k, v in self.starved_by.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.streaks = {
            str(k): [int(x) for x in [*v, 0, 0][:3]] for k, v in dict(state.get("streaks", {})).items()
        }
        self.starved_by = {str(k): [str(x) for x in v] for k, v in dict(state.get("starved_by", {})).items()}


def _where(r: LayerReading) -> str:
    what = f" ({r.description})" if r.description else ""
    kind = _NAMES.get(r.kind or "", r.kind or "")
    act = f", then {kind} `{r.activation}`" if r.activation and r.activation != r.name else ""
    return f"`{r.name}`{what}{act}"


def _checks(patience: int) -> str:
    return f"{patience} checks in a row" if patience > 1 else "a check"


#: How a pending symptom's message ends: its severity is decided at the end of fit (``evidence["harm"]``).
_GATED = (
    " A warning only if the training shows a consequence by the end of fit (a plateau, underfitting, gradients "
    "that vanish to exactly 0, a loss that gets worse or never moves); a sparse layer that still learns is healthy."
)


def _others(layers: Sequence[LayerReading], value: Callable[[LayerReading], float]) -> str:
    if len(layers) < 2:
        return ""
    listed = ", ".join(f"`{r.name}` ({value(r):.0%})" for r in layers[1:7])
    more = f" and {len(layers) - 7} more" if len(layers) > 7 else ""
    return f" Also {len(layers) - 1} more layer(s): {listed}{more}."


def dead_units(
    layers: Sequence[LayerReading], patience: int, interval: int, starved: Sequence[str] = ()
) -> Verdict:
    """The ``dead_units`` verdict, a pending symptom: the worst layer in detail, the others listed."""
    r = layers[0]
    units = r.units or 0
    dead = round(r.dead_frac * units) if units else -1
    count = f"{dead} of {units} units ({r.dead_frac:.0%})" if units else f"{r.dead_frac:.0%} of the units"
    how = {
        "gradients": f"their gradient rows were exactly 0 on every optimizer step from at least halfway through the "
        f"interval before the first of {_checks(patience)} on (~{max(patience * interval - interval // 2, 1)} steps "
        "or more): "
        + (
            "they never fired on any of those batches"
            if r.kind == "relu"
            else "no gradient passed through them on any of those batches (a ReLU that never fires does that)"
        ),
        "on_rate": f"they fired on fewer than {DEAD_ON_RATE:.0%} of the check batch's samples at "
        f"{_checks(patience)}",
        "dormant": f"they are dormant (mean |activation| at most {DORMANT_SCORE:g}x the layer's average, or a "
        f"gradient row of exactly 0) at {_checks(patience)}",
    }[r.dead_source]
    extra = (
        f" Its ReLU's on-rate on the check batch averages {r.on_rate:.1%}."
        if math.isfinite(r.on_rate)
        else ""
    )
    if starved:
        listed = ", ".join(f"`{n}`" for n in starved[:6]) + (" ..." if len(starved) > 6 else "")
        extra += f" No gradient passes back through it: {listed} before it get none either."
    extra += _others(layers, lambda x: x.dead_frac)
    advice = []
    if math.isfinite(r.bias_mean) and r.bias_mean < -1.0:
        advice.append(
            f"Its bias averages {r.bias_mean:.3g}: a bias that negative keeps the pre-activation below 0 for every "
            "input. Find what sets it (initialisation, a loaded checkpoint) and start it at 0."
        )
    advice += [
        "A learning rate that is too high pushes pre-activations below 0 for every input (a loss spike or "
        "exploding gradients before this finding point there): lower it or add a warmup.",
        "Use an activation without a flat zero region (LeakyReLU, GELU, SiLU), or normalise the pre-activations "
        "(BatchNorm/LayerNorm before the activation).",
        "Initialise ReLU layers with Kaiming/He (nn.init.kaiming_normal_(w, nonlinearity='relu')).",
    ]
    return Verdict(
        "dead_units",
        "info",
        f"{_where(r)}: {count} are dead: {how}.{extra}{_GATED}",
        {
            "layer": r.name,
            "layers": ",".join(x.name for x in layers),
            "activation": r.activation or "",
            "units": units,
            "dead_units": dead,
            "dead_frac": round(r.dead_frac, 4),
            "checks": patience,
            "source": r.dead_source,
            "starved_layers": ",".join(starved),
            "pending": 1,
            **({"bias_mean": round(r.bias_mean, 4)} if math.isfinite(r.bias_mean) else {}),
        },
        advice,
    )


def saturated_activations(layers: Sequence[LayerReading], patience: int, interval: int) -> Verdict:
    """The ``saturated_activations`` verdict, a pending symptom: the worst layer in detail, the others listed."""
    r = layers[0]
    kind = r.kind if r.kind in SATURATION else "tanh"
    limit = SATURATION[kind]
    gain = r.rms / r.rms_in if math.isfinite(r.rms) and math.isfinite(r.rms_in) and r.rms_in > 0 else math.nan
    scale = f"; their RMS is {r.rms:.3g}" if math.isfinite(r.rms) else ""
    if math.isfinite(gain):
        scale += f" (the layer's input RMS {r.rms_in:.3g}, a gain of {gain:.3g}x)"
    advice = []
    if math.isfinite(r.rms_in) and r.rms_in > 3:
        advice.append(
            f"Its input has RMS {r.rms_in:.3g}: standardise the inputs (zero mean, unit variance) or normalise the "
            "previous layer's output."
        )
    if math.isfinite(gain) and gain > 3:
        advice.append(
            f"The layer multiplies its input's RMS by {gain:.3g}x: initialise it for {kind} (Xavier/Glorot: "
            f"nn.init.xavier_uniform_(w, gain=nn.init.calculate_gain('{kind}'))) so that its gain is ~1."
        )
    if not advice:
        advice.append(
            "The pre-activations grew during training: lower the learning rate or add weight decay."
        )
    advice.append(
        "Normalise before the activation (LayerNorm/BatchNorm), or prefer ReLU/GELU/SiLU in hidden layers."
    )
    return Verdict(
        "saturated_activations",
        "info",
        f"{_where(r)}: {r.saturated_frac:.0%} of its pre-activations are in {kind}'s saturated range "
        f"(|z| >= {limit:g}, where the derivative is below 2e-4 of its peak) at {_checks(patience)} "
        f"(~{patience * interval} steps){scale}: "
        f"little gradient passes through them.{_others(layers, lambda x: x.saturated_frac)}{_GATED}",
        {
            "layer": r.name,
            "layers": ",".join(x.name for x in layers),
            "activation": r.activation or "",
            "saturated_frac": round(r.saturated_frac, 4),
            "threshold": limit,
            "rms": round(r.rms, 6) if math.isfinite(r.rms) else "",
            "input_rms": round(r.rms_in, 6) if math.isfinite(r.rms_in) else "",
            "checks": patience,
            "pending": 1,
        },
        advice,
    )


# -- activation scale at initialisation --------------------------------------------------------------------------
@dataclasses.dataclass
class ScaleTrend:
    """The pre-activation RMS across depth and its trend (see :func:`scale_trend`)."""

    names: list[str]  # the activation calls, in forward order
    kinds: list[str]
    rms: list[float]  # pre-activation RMS per depth
    ratios: list[float]  # per-layer factors
    factor: float  # the typical (median) per-layer factor
    late_factor: float  # the median over the second half of the stack
    total: float  # factor ** len(ratios)


def scale_trend(
    names: Sequence[str],
    kinds: Sequence[str],
    rms: Sequence[float],
    input_rms: float | None = None,
    gains: Sequence[float | None] | None = None,
) -> ScaleTrend | None:
    """The per-layer factors of the pre-activation RMS ``rms`` across depth.

    The first factor is ``rms[0] / input_rms`` (the stack's input to the first activation) when ``input_rms`` is
    known; then ``rms[d] / rms[d-1]``, except after a bounded activation (tanh, sigmoid), whose output cannot grow:
    there the larger of that ratio and the weight layer's gain ``gains[d]`` (output RMS / input RMS) counts.
    ``None`` with fewer than :data:`MIN_RATIOS` factors (no stack to speak of) or non-finite values.
    """
    values = [float(v) for v in rms]
    if not values or not all(math.isfinite(v) for v in values):
        return None
    ratios: list[float] = []
    if input_rms is not None and math.isfinite(input_rms) and input_rms > 0:
        ratios.append(values[0] / input_rms)
    for d in range(1, len(values)):
        ratio = values[d] / values[d - 1] if values[d - 1] > 0 else math.nan
        gain = gains[d] if gains is not None and d < len(gains) else None
        if kinds[d - 1] in _BOUNDED and gain is not None and math.isfinite(gain):
            ratio = max(ratio, gain) if math.isfinite(ratio) else gain
        ratios.append(ratio)
    ratios = [max(r, 1e-30) for r in ratios if math.isfinite(r)]
    if len(ratios) < MIN_RATIOS:
        return None
    logs = [math.log(r) for r in ratios]
    factor = math.exp(statistics.median(logs))
    late = math.exp(statistics.median(logs[len(logs) // 2 :]))
    total = math.exp(min(max(statistics.median(logs) * len(logs), -700.0), 700.0))
    return ScaleTrend(list(names), list(kinds), values, ratios, factor, late, total)


def judge_scale(trend: ScaleTrend | None) -> list[Verdict]:
    """``activation_scale`` when the pre-activation RMS shrinks or grows geometrically over the stack."""
    if trend is None:
        return []
    shrinking = trend.total <= 1 / SCALE_FACTOR and trend.late_factor <= _PERSIST[0]
    growing = trend.total >= SCALE_FACTOR and trend.late_factor >= _PERSIST[1]
    if not (shrinking or growing):
        return []
    change = trend.total if growing else 1 / trend.total
    kinds = sorted({_NAMES.get(k, k) for k in trend.kinds})
    way = "grow" if growing else "shrink"
    severity: Severity = "warning" if change >= SCALE_WARNING else "info"
    layers = len(trend.ratios)
    message = (
        f"At initialisation the activations {way} geometrically with depth: across the {layers} layers of the "
        f"{'/'.join(kinds)} stack each layer multiplies their scale by ~{trend.factor:.3g}x (median; "
        f"{trend.late_factor:.3g}x over the second half), {change:.3g}x over the stack; the pre-activation RMS is "
        f"{trend.rms[0]:.3g} at `{trend.names[0]}` and {trend.rms[-1]:.3g} at `{trend.names[-1]}`. The "
        "initialisation does not match the activation."
    )
    if any(k in _BOUNDED for k in trend.kinds) and growing:
        message += " The weights amplify their input, the tanh/sigmoid units saturate instead of passing the growth on."
    advice = [
        "Initialise for the activation: Kaiming/He for ReLU-family layers (nn.init.kaiming_normal_(w, "
        "nonlinearity='relu')), Xavier/Glorot for tanh/sigmoid (nn.init.xavier_uniform_(w, "
        "gain=nn.init.calculate_gain('tanh'))): a per-layer factor of ~1 keeps the scale across depth.",
        "Add normalisation layers (LayerNorm/BatchNorm) that reset the scale at every layer.",
    ]
    if growing:
        advice.append(
            "In residual networks, zero-initialise the last layer of each residual branch (e.g. the last "
            "BatchNorm's weight) so that the stack starts close to the identity."
        )
    return [
        Verdict(
            "activation_scale",
            severity,
            message,
            {
                "direction": way,
                "layers": layers,
                "per_layer_factor": round(trend.factor, 6),
                "late_factor": round(trend.late_factor, 6),
                "change": float(f"{change:.4g}"),
                "first_layer": trend.names[0],
                "last_layer": trend.names[-1],
                "first_rms": float(f"{trend.rms[0]:.4g}"),
                "last_rms": float(f"{trend.rms[-1]:.4g}"),
            },
            advice,
        )
    ]


def check_activation_scale(
    forward: Callable[[torch.Tensor], Any], model: nn.Module, x: torch.Tensor
) -> list[Verdict]:
    """Run ``forward(x)`` once with hooks (gradients off) and judge the pre-activation RMS across depth.

    The caller restores the model (``preserved_module``); nothing is trained. Applies to models with at least two
    activation modules (``nn.ReLU``, ``nn.GELU``, ``nn.Tanh``...) in their forward: functional activations are not
    seen.
    """
    probe = ActivationProbe(model, per_unit=False)
    if not probe.activations:
        return []
    probe.attach()
    try:
        with torch.no_grad():
            forward(x)
    finally:
        probe.detach()
    acts = [c for c in probe.calls if c.kind is not None]
    if len(acts) < 2:
        return []
    rms = torch.stack([c.norm_in / math.sqrt(max(c.numel_in, 1)) for c in acts]).tolist()
    gains: list[float | None] = []
    weight_rms: dict[int, tuple[float, float]] = {}
    linked = [c.link for c in acts if c.link is not None]
    if linked:
        rows = torch.stack(
            [
                torch.stack(
                    [
                        probe.calls[i].norm_in / math.sqrt(max(probe.calls[i].numel_in, 1)),
                        _out_norm(probe.calls[i]) / math.sqrt(max(probe.calls[i].numel_out, 1)),
                    ]
                )
                for i in linked
            ]
        ).tolist()
        weight_rms = {i: (row[0], row[1]) for i, row in zip(linked, rows, strict=True)}
    for c in acts:
        pair = weight_rms.get(c.link) if c.link is not None else None
        gains.append(pair[1] / pair[0] if pair and pair[0] > 0 else None)
    first = weight_rms.get(acts[0].link) if acts[0].link is not None else None
    trend = scale_trend(
        [c.name for c in acts],
        [str(c.kind) for c in acts],
        rms,
        input_rms=first[0] if first else None,
        gains=gains,
    )
    return judge_scale(trend)


def _out_norm(call: _Call) -> torch.Tensor:
    return call.norm_out if call.norm_out is not None else call.norm_in


def describe(module: nn.Module) -> str:
    """``"Linear 64->32"`` / ``"Conv2d 16->32"``: a weight layer in a few words, for messages."""
    if isinstance(module, nn.Linear):
        return f"Linear {module.in_features}->{module.out_features}"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return f"{type(module).__name__} {module.in_channels}->{module.out_channels}"
    return type(module).__name__


def layer_map(params: Sequence[torch.Tensor], model: nn.Module) -> dict[str, tuple[int, int | None]]:
    """The weight layers of ``model`` whose weight is in ``params``: name -> (weight position, bias position)."""
    where = {id(p): i for i, p in enumerate(params)}
    found: dict[str, tuple[int, int | None]] = {}
    for name, m in weight_layers(model):
        w = where.get(id(m.weight))
        if w is None:
            continue
        bias = getattr(m, "bias", None)
        found[name] = (w, where.get(id(bias)) if isinstance(bias, torch.Tensor) else None)
    return found
