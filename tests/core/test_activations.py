"""core/activations without a Trainer: the gradient-row accumulator, the forward probe, the rules and their words,
and the activation-scale check, as tables against reference computations."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from torch import nn

from lightning_diag.core import activations as act
from lightning_diag.core.diagnosis import diagnose


# -- DeadRows ----------------------------------------------------------------------------------------------------
def _layers(model: nn.Module) -> tuple[list[torch.Tensor], dict[str, tuple[int, int | None]]]:
    params = list(model.parameters())
    return params, act.layer_map(params, model)


def _reference_dead(steps: list[dict[str, torch.Tensor]], model: nn.Module) -> dict[str, torch.Tensor]:
    """Per weight layer, units whose weight row and bias entry were exactly 0 on every one of the later half of the
    steps (at least), up to the last (a per-tensor loop)."""
    out = {}
    tail = steps[len(steps) // 2 :]  # ceil(n / 2) steps
    for name, m in act.weight_layers(model):
        dead = torch.ones(m.weight.shape[0], dtype=torch.bool)
        for grads in tail:
            w = grads[f"{name}.weight"].reshape(m.weight.shape[0], -1)
            dead &= (w == 0).all(1)
            if m.bias is not None:
                dead &= grads[f"{name}.bias"] == 0
        out[name] = dead
    return out


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(24, 8),
        nn.ReLU(),
        nn.Linear(8, 8, bias=False),
        nn.Tanh(),
        nn.Linear(8, 3),
    )


CASES = {
    # per step, per parameter: which rows (units) get a gradient of exactly 0; None: all rows nonzero
    "row_and_bias_zero_is_dead": [{"3": [1, 2]}, {"3": [1, 2]}],
    "alive_once_is_alive": [{"3": [1, 2]}, {"3": [2]}],
    "zero_row_nonzero_bias_is_starved_not_dead": [{"3.weight": [0]}, {"3.weight": [0]}],
    "layer_without_bias": [{"5": [0, 7]}, {"5": [7]}],
    "convolution_channels": [{"0": [3]}, {"0": [3]}, {"0": [3]}],
    "nan_and_inf_rows_count_as_alive": [{"3": [4], "nan": [4]}, {"3": [4], "nan": [4]}],
    # a unit that died halfway through the interval is dead at its end; one that fired in the later half is not
    "died_halfway_is_dead": [{}, {}, {"3": [1, 2]}, {"3": [1, 2]}],
    "fired_in_the_later_half_is_alive": [{"3": [1]}, {"3": [1]}, {"3": [1]}, {}, {"3": [1]}],
}


@pytest.mark.parametrize("pattern", list(CASES.values()), ids=list(CASES))
def test_dead_rows_match_a_per_tensor_reference(pattern: list[dict[str, list[int]]]) -> None:
    model = _net()
    params, layers = _layers(model)
    names = [n for n, _ in model.named_parameters()]
    rows = act.DeadRows([torch.zeros_like(p) for p in params], layers)
    assert len(rows.groups) == 3  # row lengths 6, 24 and 8: one reduction per group, not per tensor
    history = []
    for spec in pattern:
        grads = {n: torch.randn_like(p) for n, p in zip(names, params, strict=True)}
        for key, units in spec.items():
            if key == "nan":
                grads["3.weight"][units] = math.nan
                continue
            targets = [key] if "." in key else [f"{key}.weight", f"{key}.bias"]
            for target in targets:
                if target in grads:
                    grads[target][units] = 0.0
        history.append(grads)
        rows.update([grads[n] for n in names])
    reference = _reference_dead(history, model)
    for name in rows.names:
        assert torch.equal(rows.dead(name), reference[name]), name
    assert rows.steps == len(pattern)
    rows.reset()
    assert rows.steps == 0 and all(bool(rows.dead(n).all()) for n in rows.names)  # nothing seen since


def test_dead_rows_count_on_across_checks() -> None:
    # A unit that went quiet two steps before a check (of a 4-step interval) is dead there, and stays dead at the next
    # check while it stays quiet; it is alive again at the first check after it fires in the later half.
    model = _net()
    params, layers = _layers(model)
    names = [n for n, _ in model.named_parameters()]
    rows = act.DeadRows([torch.zeros_like(p) for p in params], layers)

    def step(quiet: bool) -> None:
        grads = {n: torch.randn_like(p) for n, p in zip(names, params, strict=True)}
        if quiet:
            grads["3.weight"][1], grads["3.bias"][1] = 0.0, 0.0
        rows.update([grads[n] for n in names])

    seen = []
    for interval in ([False, False, True, True], [True, True, True, True], [True, True, False, True]):
        for quiet in interval:
            step(quiet)
        seen.append(bool(rows.dead("3")[1]))
        rows.reset()
    assert seen == [True, True, False]


def test_dead_rows_never_touch_the_gradients_and_survive_a_state_round_trip() -> None:
    model = _net()
    params, layers = _layers(model)
    grads = [torch.randn_like(p) for p in params]
    where = {id(p): i for i, p in enumerate(params)}
    grads[where[id(model[3].weight)]][5] = 0
    grads[where[id(model[3].bias)]][5] = 0
    before = [g.clone() for g in grads]
    rows = act.DeadRows(grads, layers)
    rows.update(grads)
    assert all(torch.equal(a, b) for a, b in zip(grads, before, strict=True))
    state = rows.state_dict()
    again = act.DeadRows(grads, layers)
    again.load_state_dict(state)
    assert all(torch.equal(again.dead(n), rows.dead(n)) for n in rows.names) and again.steps == 1
    assert int(again.dead("3").sum()) == 1
    act.DeadRows(grads, layers).load_state_dict({})  # tolerates missing keys


# -- ActivationProbe ---------------------------------------------------------------------------------------------
def _probe(model: nn.Module, x: torch.Tensor, dead: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    probe = act.ActivationProbe(model)
    probe.attach()
    with torch.no_grad():
        model(x)
    probe.detach()
    assert not probe.attached
    summary = probe.summary(probe.raw(), dead)
    return {k: act.LayerReading.from_summary(k, v.tolist()) for k, v in summary.items()} | {"_probe": probe}


def test_probe_reads_relu_on_rate_rms_and_links_through_batchnorm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(inplace=True), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].bias[:4] = -100.0  # BatchNorm re-centres them: not off after all
    x = torch.randn(64, 8)
    out = _probe(model, x)
    z = model[1](model[0](x)).detach()
    assert (
        out["_probe"].layers["0"].activation == "2"
    )  # the ReLU is attributed to the Linear, through BatchNorm
    assert out["0"].rms == pytest.approx(
        float(z.pow(2).mean().sqrt()), rel=1e-5
    )  # inplace ReLU: pre-activation
    assert out["0"].on_rate == pytest.approx(float((z > 0).float().mean()), rel=1e-5)
    assert out["0"].rms_in == pytest.approx(float(x.pow(2).mean().sqrt()), rel=1e-5)
    assert out["0"].dead_frac == 0.0
    assert math.isnan(out["3"].dead_frac) and out["3"].rms > 0  # no activation, no gradient rows: unknown


def test_probe_dead_relu_units_need_a_zero_row_and_no_firing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 2))
    with torch.no_grad():
        model[0].bias[:3] = -50.0  # three units never fire
    x = torch.randn(128, 8)
    assert _probe(model, x)["0"].dead_frac == pytest.approx(0.3)  # no rows: the on-rate decides
    rows_zero = torch.zeros(10, dtype=torch.bool)
    rows_zero[:5] = True  # units 3, 4 have zero rows but fire: starved, not dead
    assert _probe(model, x, {"0": rows_zero})["0"].dead_frac == pytest.approx(0.3)


def test_probe_convolution_units_are_channels_and_tanh_saturation_is_a_share_of_values() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 36, 3), nn.Sigmoid())
    x = torch.randn(16, 1, 8, 8) * 40
    out = _probe(model, x)
    z = model[0](x).detach()
    assert out["_probe"].layers["0"].units == 6
    assert out["0"].saturated_frac == pytest.approx(float((z.abs() >= 5).float().mean()), rel=1e-5)
    logits = model[:4](x).detach()
    assert out["3"].saturated_frac == pytest.approx(float((logits.abs() >= 10).float().mean()), abs=1e-6)


def test_probe_gelu_dormant_units() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 20), nn.GELU(), nn.Linear(20, 2))
    with torch.no_grad():
        model[0].weight[:5] = 0.0
        model[0].bias[:5] = -30.0  # GELU(-30) ~ 0: dormant
    out = _probe(model, torch.randn(64, 8))
    assert out["0"].dead_frac == pytest.approx(0.25)
    healthy = nn.Sequential(nn.Linear(8, 20), nn.SiLU(), nn.Linear(20, 2))
    assert _probe(healthy, torch.randn(64, 8))["0"].dead_frac == 0.0


# -- activation scale --------------------------------------------------------------------------------------------
def _mlp(
    depth: int, width: int, act_cls: type[nn.Module], std: float | None = None, kaiming: bool = False
) -> Any:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    sizes = [16] + [width] * depth
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), act_cls()]
    net = nn.Sequential(*layers, nn.Linear(width, 4))
    for m in net.modules():
        if isinstance(m, nn.Linear) and std is not None:
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and kaiming:
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return net


SCALE = {
    # name: (model, expected (severity, direction) or None)
    "tanh20_std0.01": (lambda: _mlp(20, 64, nn.Tanh, std=0.01), ("warning", "shrink")),
    "tanh20_std1.5": (lambda: _mlp(20, 64, nn.Tanh, std=1.5), ("warning", "grow")),
    "tanh20_default": (lambda: _mlp(20, 64, nn.Tanh), None),
    "tanh20_xavier": (lambda: _mlp(20, 64, nn.Tanh, std=1 / 8), None),
    "relu7_default": (lambda: _mlp(7, 64, nn.ReLU), None),  # shrinks, then settles at the biases' level
    "relu12_wide_default": (lambda: _mlp(12, 256, nn.ReLU), None),
    "relu12_kaiming": (lambda: _mlp(12, 256, nn.ReLU, kaiming=True), None),
    "relu10_std0.5": (lambda: _mlp(10, 128, nn.ReLU, std=0.5), ("warning", "grow")),
    "relu8_std0.3": (lambda: _mlp(8, 64, nn.ReLU, std=0.3), ("info", "grow")),  # ~2x a layer: 10-1000x
    "sigmoid14_default": (lambda: _mlp(14, 32, nn.Sigmoid), None),  # the signal keeps its RMS
    "gelu12_default": (lambda: _mlp(12, 128, nn.GELU), None),
    "two_layers": (lambda: _mlp(2, 64, nn.ReLU, std=3.0), None),  # too short for a trend
}


@pytest.mark.parametrize(("build", "expected"), list(SCALE.values()), ids=list(SCALE))
def test_activation_scale(build: Any, expected: tuple[str, str] | None) -> None:
    model = build()
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    found = act.check_activation_scale(model, model, x)
    if expected is None:
        assert found == []
        return
    (verdict,) = found
    assert (verdict.code, verdict.severity, verdict.evidence["direction"]) == ("activation_scale", *expected)
    assert f"{verdict.evidence['change']:.3g}" in verdict.message
    assert any("Kaiming" in a for a in verdict.advice) and any("Xavier" in a for a in verdict.advice)


def test_scale_trend_uses_the_gain_after_a_bounded_activation() -> None:
    rms = [8.0, 11.0, 11.5, 11.2, 11.4]  # saturated tanh: the pre-activations stop growing...
    flat = act.scale_trend(["a"] * 5, ["relu"] * 5, rms, input_rms=1.0)
    assert flat is not None and act.judge_scale(flat) == []
    tanh = act.scale_trend(["a"] * 5, ["tanh"] * 5, rms, input_rms=1.0, gains=[8.0, 12.0, 12.0, 12.0, 12.0])
    assert tanh is not None and tanh.factor == pytest.approx(12.0)  # ...the weights' gain shows the growth
    assert act.scale_trend(["a", "b"], ["relu", "relu"], [1.0, 0.01]) is None  # one ratio: no stack


# -- rules -------------------------------------------------------------------------------------------------------
def _reading(
    name: str = "net.2", dead: float = 1.0, saturated: float = math.nan, **facts: Any
) -> act.LayerReading:
    facts = {"activation": "net.3", "kind": "relu", "units": 32, "description": "Linear 64->32"} | facts
    facts = {"rms": 1.0, "rms_in": 1.0, "rows": True} | facts
    return act.LayerReading(name, dead_frac=dead, saturated_frac=saturated, **facts)


RULES = {
    # name: (dead_frac per check, the steps (first step of the condition) recorded after each check)
    "three_checks_in_a_row": ([1.0, 1.0, 1.0, 1.0], [None, None, 0, 0]),
    "below_layer_share_is_quiet": ([0.4] * 4, [None] * 4),
    "not_consecutive_is_quiet": ([1.0, 0.0, 1.0, 1.0], [None] * 4),
    "streak_starts_late": ([0.0, 0.9, 0.9, 0.9], [None, None, None, 10]),
}


@pytest.mark.parametrize(("checks", "recorded"), list(RULES.values()), ids=list(RULES))
def test_dead_unit_rule(checks: list[float], recorded: list[int | None]) -> None:
    rules = act.ActivationRules(layer_share=0.5, patience=3, interval=10)
    for i, (dead, expected) in enumerate(zip(checks, recorded, strict=True)):
        found = rules.update(10 * i, [_reading(dead=dead)])
        assert [first for _, _, first, _ in found] == ([] if expected is None else [expected])
        for key, verdict, _, _ in found:  # a symptom: info until the end-of-fit gate sees a consequence
            assert (verdict.code, verdict.severity, verdict.evidence["pending"]) == ("dead_units", "info", 1)
            assert key == "dead_units:net.2" and "`net.2`" in verdict.message
            assert verdict.evidence["layer"] == "net.2" and verdict.evidence["dead_units"] == round(32 * dead)


def test_saturation_names_the_layer_and_dead_units_skip_tanh_layers() -> None:
    rules = act.ActivationRules(patience=1)
    tanh = _reading(dead=1.0, saturated=0.7, kind="tanh")  # saturated units have zero rows too
    ((key, verdict, _, _),) = rules.update(0, [tanh])
    assert key == "saturated_activations:net.2" and verdict.code == "saturated_activations"
    assert "70% of its pre-activations" in verdict.message and verdict.evidence["threshold"] == 5.0


def test_zero_rows_without_gradient_from_above_are_not_dead_units() -> None:
    rules = act.ActivationRules(patience=1)
    plain = {"activation": None, "kind": None}
    before = _reading("net.0", dead=1.0, **plain)  # F.relu: gradient rows only
    head = _reading("net.4", dead=0.75, **plain)  # the output layer: zero rows where the loss is satisfied
    (found,) = rules.update(0, [before, _reading("net.2"), head])
    verdict = found[1]
    assert verdict.evidence["layer"] == "net.2" and verdict.evidence["layers"] == "net.2"
    assert "`net.0` before it get none" in verdict.message and verdict.evidence["starved_layers"] == "net.0"
    # a functional-ReLU layer whose next layer still gets gradient is judged from its rows
    alive_head = _reading("net.4", dead=0.0, **plain)
    (found,) = act.ActivationRules(patience=1).update(0, [_reading("net.2", **plain), alive_head])
    assert found[1].evidence["layer"] == "net.2"
    # a loss of exactly 0 (everything fitted): every row is zero, nothing is judged
    fitted = [_reading(f"net.{i}", dead=1.0, **plain) for i in (0, 2, 4)]
    assert act.ActivationRules(patience=1).update(0, fitted) == []


def test_several_layers_make_one_finding_and_the_advice_follows_the_evidence() -> None:
    rules = act.ActivationRules(patience=1)
    layers = [_reading(f"net.{i}", dead=0.6 + 0.1 * i, bias_mean=-10.0 if i == 2 else 0.0) for i in range(3)]
    ((key, verdict, _, _),) = rules.update(0, layers)
    assert key == "dead_units:net.0,net.1,net.2"
    assert verdict.evidence["layer"] == "net.2" and verdict.evidence["layers"] == "net.2,net.1,net.0"
    assert "Also 2 more layer(s)" in verdict.message and "bias averages -10" in verdict.advice[0]
    quiet = act.dead_units([_reading(bias_mean=0.1)], 3, 50)
    assert not any("bias averages" in a for a in quiet.advice)
    saturated = act.saturated_activations(
        [_reading(saturated=0.9, kind="tanh", rms_in=35.0, rms=20.0)], 3, 50
    )
    assert "standardise the inputs" in saturated.advice[0]
    grown = act.saturated_activations([_reading(saturated=0.9, kind="tanh", rms_in=1.0, rms=12.0)], 3, 50)
    assert "Xavier" in grown.advice[0] and "gain of 12x" in grown.message


def test_rules_state_round_trip() -> None:
    rules = act.ActivationRules(patience=3)
    for step in range(2):
        rules.update(step, [_reading()])
    state = rules.state_dict()
    again = act.ActivationRules(patience=3)
    again.load_state_dict(state)
    assert again.state_dict() == state
    assert [v.message for _, v, _, _ in again.update(2, [_reading()])] == [
        v.message for _, v, _, _ in rules.update(2, [_reading()])
    ]


# -- diagnosis ---------------------------------------------------------------------------------------------------
def _finding(code: str, step: int, severity: str = "warning") -> dict[str, Any]:
    return {"code": code, "step": step, "severity": severity, "evidence": {}, "advice": []}


def test_a_loss_spike_before_dead_units_is_their_cause() -> None:
    findings = [_finding("loss_spike", 5), _finding("dead_units", 49), _finding("loss_plateau", 120)]
    d = diagnose(findings)
    assert d.caused_by["dead_units@49"] == "loss_spike@5" and d.primary == "loss_spike@5"
    alone = diagnose(
        [_finding("dead_units", 49), _finding("vanishing_gradients", 149), _finding("loss_plateau", 172)]
    )
    assert alone.primary == "dead_units@49" and alone.caused_by["vanishing_gradients@149"] == "dead_units@49"


def test_activation_scale_explains_what_follows_and_input_scale_explains_saturation() -> None:
    d = diagnose(
        [_finding("activation_scale", 0), _finding("vanishing_gradients", 149), _finding("loss_plateau", 172)]
    )
    assert d.primary == "activation_scale@0"
    d = diagnose([_finding("input_scale", 0), _finding("saturated_activations", 49)])
    assert d.caused_by["saturated_activations@49"] == "input_scale@0"
