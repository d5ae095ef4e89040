"""core.silent: samples, fingerprints, the module-mode rule, replica comparison, the noise-scale estimator, the
rules the callback applies at a check, the probes of one optimizer step, and the words of every finding."""

from __future__ import annotations

import math
import types

import pytest
import torch
from torch import nn

from lightning_diag.core.silent import (
    NoiseMeter,
    NoiseSample,
    NoiseScale,
    NoOpProbe,
    StaleWatch,
    Streak,
    all_stale,
    batch_over_noise_scale,
    bn_batches_tracked,
    bn_updates,
    checksums,
    divergent_entries,
    diverging_tensors,
    fingerprint,
    flat_sample,
    holds_dtensors,
    is_check_step,
    mode_problems,
    model_parallel,
    no_op_seen,
    noise_row,
    noise_sample,
    noise_scale_terms,
    per_group,
    replica_checksums,
    replicated_buffers,
    same_batch,
    same_on_every_rank,
    spread,
    unheld_names,
    verdicts,
)
from lightning_diag.core.verdict import Verdict


def test_flat_sample_is_evenly_spaced_and_bounded() -> None:
    t = torch.arange(1000.0).reshape(10, 100)
    sample = flat_sample(t, 64)
    assert sample.numel() == 64
    assert torch.equal(sample, torch.arange(0.0, 1000.0, 15.0)[:64])
    assert torch.equal(flat_sample(torch.arange(5.0), 64), torch.arange(5.0))  # small tensors whole
    assert torch.equal(flat_sample(t.t(), 8), flat_sample(t.t().contiguous(), 8))  # non-contiguous alike


def test_fingerprint_equal_batches_alike_and_changes_seen() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    a = fingerprint([x, y])
    assert torch.equal(a, fingerprint([x.clone(), y.clone()]))
    x2 = x.clone()
    x2[0, 0] += 1e-3  # position 0 is always sampled
    assert not torch.equal(a, fingerprint([x2, y]))
    assert not torch.equal(a, fingerprint([x[:16], y[:16]]))  # another shape
    assert not torch.equal(a, fingerprint([torch.randn(32, 8, generator=g), y]))
    nan = x.clone()
    nan[0, 0] = float("nan")
    assert not torch.equal(fingerprint([nan]), fingerprint([nan]))  # a NaN batch is never called a repeat
    assert fingerprint([])[-1] == 0


@pytest.mark.parametrize(
    ("rows", "rtol", "expected"),
    [
        pytest.param([[1.0, 2.0], [1.0, 2.0]], 1e-6, [], id="identical"),
        pytest.param([[1.0, 2.0], [1.0, 2.0 + 1e-3]], 1e-6, [1], id="second-differs"),
        pytest.param([[1.0, 2.0], [1.0 + 1e-9, 2.0]], 1e-6, [], id="within-tolerance"),
        pytest.param([[0.0, 5.0], [0.0, 5.0], [1e-3, 5.0]], 1e-6, [0], id="third-rank-at-zero"),
        pytest.param([[float("nan"), 1.0], [1.0, 1.0]], 1e-6, [0], id="nan-on-one-rank"),
        pytest.param([[float("nan"), 1.0], [float("nan"), 1.0]], 1e-6, [], id="nan-everywhere"),
        pytest.param([[1.0, 2.0]], 1e-6, [], id="one-rank"),
    ],
)
def test_divergent_entries(rows: list[list[float]], rtol: float, expected: list[int]) -> None:
    assert divergent_entries(torch.tensor(rows), rtol) == expected


class Block(nn.Module):
    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(dropout)


class Model(nn.Module):
    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone = Block(dropout)
        self.head = Block(dropout)


def _frozen_backbone(m: Model) -> None:
    m.backbone.eval()
    m.backbone.requires_grad_(False)


def _bn_only_eval(m: Model) -> None:
    for sub in m.modules():
        if isinstance(sub, nn.BatchNorm1d):
            sub.eval()


def _mc_dropout(m: Model) -> None:
    m.eval()
    for sub in m.modules():
        if isinstance(sub, nn.Dropout):
            sub.train()


@pytest.mark.parametrize(
    ("setup", "training", "expected"),
    [
        pytest.param(lambda m: m.train(), True, [], id="train-all-in-train"),
        pytest.param(lambda m: m.backbone.eval(), True, [("backbone", 2)], id="train-backbone-eval"),
        pytest.param(lambda m: m.eval(), True, [("", 4)], id="train-whole-model-eval"),
        pytest.param(_frozen_backbone, True, [], id="train-frozen-backbone-on-purpose"),
        pytest.param(_bn_only_eval, True, [], id="train-bn-stats-frozen-on-purpose"),
        pytest.param(lambda m: m.eval(), False, [], id="val-all-in-eval"),
        pytest.param(lambda m: (m.eval(), m.head.train()), False, [("head", 2)], id="val-head-train"),
        pytest.param(lambda m: m.train(), False, [("", 4)], id="val-whole-model-train"),
        pytest.param(_mc_dropout, False, [], id="val-mc-dropout-on-purpose"),
    ],
)
def test_mode_problems(setup, training: bool, expected: list[tuple[str, int]]) -> None:
    model = Model()
    model.train()
    setup(model)
    assert mode_problems(model, training=training) == expected


def test_mode_problems_ask_which_parameters_are_trained() -> None:
    model = Model()
    model.backbone.eval()  # a teacher: requires_grad left on, but no optimizer holds it
    head = {id(p) for p in model.head.parameters()}
    assert mode_problems(model, True) == [("backbone", 2)]
    assert mode_problems(model, True, lambda p: id(p) in head) == []


def test_mode_problems_ignore_models_whose_mode_changes_nothing() -> None:
    model = Model(dropout=0.0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.track_running_stats = False
    model.eval()
    assert mode_problems(model, training=True) == []
    plain = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1)).eval()
    assert mode_problems(plain, training=True) == []


def test_bn_batches_tracked_counts_train_mode_forwards() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4))
    assert int(bn_batches_tracked(model.modules())) == 0
    model(torch.randn(8, 4))
    assert int(bn_batches_tracked(model.modules())) == 2
    model.eval()(torch.randn(8, 4))
    assert int(bn_batches_tracked(model.modules())) == 2
    assert bn_batches_tracked(nn.Linear(2, 2).modules()) is None


@pytest.mark.parametrize(
    ("grad_sq", "trace", "b_small", "b_big"),
    [(1.0, 10.0, 8, 32), (0.01, 50.0, 4, 64), (3.0, 0.5, 1, 2), (2.0, 200.0, 16, 512)],
)
def test_noise_scale_terms_invert_the_expected_norms_exactly(
    grad_sq: float, trace: float, b_small: int, b_big: int
) -> None:
    """E|G_B|^2 = |G|^2 + tr(Sigma)/B: the estimator recovers both terms from the expectations at two sizes."""
    small = grad_sq + trace / b_small
    big = grad_sq + trace / b_big
    got_trace, got_grad_sq = noise_scale_terms(small, big, b_small, b_big)
    assert got_trace == pytest.approx(trace, rel=1e-12)
    assert got_grad_sq == pytest.approx(grad_sq, rel=1e-12)
    with pytest.raises(ValueError, match="batch_big > batch_small > 0"):
        noise_scale_terms(small, big, b_big, b_small)


def test_noise_scale_estimate_matches_a_direct_computation_on_a_small_model() -> None:
    """Per-sample gradients of a small model give tr(Sigma) and |G|^2 directly; the estimator, fed only the norms
    of micro-batch gradients and of their mean, agrees with them on average (it is unbiased) and B_simple follows."""
    torch.manual_seed(0)
    n, features = 256, 6
    x = torch.randn(n, features)
    y = x @ torch.randn(features, 1) + 0.5 * torch.randn(n, 1)
    model = nn.Sequential(nn.Linear(features, 4), nn.Tanh(), nn.Linear(4, 1))
    params = list(model.parameters())

    def grad(idx: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()

    per_sample = torch.stack([grad(torch.tensor([i])) for i in range(n)])
    true_grad = per_sample.mean(0)
    true_grad_sq = float(true_grad.pow(2).sum())
    true_trace = float(((per_sample - true_grad) ** 2).sum(1).mean())  # tr of the per-sample covariance

    b_small, micro = 4, 8
    g = torch.Generator().manual_seed(1)
    traces, grads = [], []
    for _ in range(400):
        # micro-batches drawn with replacement: exactly the model E|G_B|^2 = |G|^2 + tr(Sigma)/B assumes
        smalls = [per_sample[torch.randint(0, n, (b_small,), generator=g)].mean(0) for _ in range(micro)]
        small_sq = float(torch.stack([s.pow(2).sum() for s in smalls]).mean())
        big_sq = float(torch.stack(smalls).mean(0).pow(2).sum())
        trace, grad_sq = noise_scale_terms(small_sq, big_sq, b_small, b_small * micro)
        traces.append(trace)
        grads.append(grad_sq)
    mean_trace, mean_grad_sq = sum(traces) / len(traces), sum(grads) / len(grads)
    assert mean_trace == pytest.approx(true_trace, rel=0.1)
    assert mean_grad_sq == pytest.approx(true_grad_sq, rel=0.15)
    assert mean_trace / mean_grad_sq == pytest.approx(true_trace / true_grad_sq, rel=0.2)
    # the per-micro-batch gradients of the real autograd path are the per-sample means used above
    idx = torch.arange(b_small)
    assert torch.allclose(grad(idx), per_sample[idx].mean(0), atol=1e-6)


def test_noise_scale_running_average_and_state() -> None:
    ns = NoiseScale(decay=0.5)
    assert math.isnan(ns.scale)
    ns.update(10.0, 2.0)
    assert ns.scale == 5.0
    ns.update(30.0, 2.0)
    assert (ns.trace, ns.grad_sq, ns.count) == (20.0, 2.0, 2)
    ns.update(float("nan"), 1.0)  # never enters
    assert ns.count == 2
    ns.update(
        5.0, -10.0
    )  # a negative |G|^2 estimate enters the average (it is unbiased), the ratio guards it
    clone = NoiseScale(decay=0.5)
    clone.load_state_dict(ns.state_dict())
    assert clone.state_dict() == ns.state_dict()
    assert math.isnan(NoiseScale(trace=1.0, grad_sq=-1.0, count=1).scale)  # noise-dominated: no scale yet


def test_streak_needs_consecutive_checks() -> None:
    streak = Streak(patience=2)
    assert [streak.update(s) for s in (True, False, True, True, True, False)] == [
        False,
        False,
        False,
        True,
        True,
        False,
    ]


# -- the rules the callback used to hold inline --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("every", "log_every", "expected"),
    [
        pytest.param(None, 5, [0, 4, 9, 14], id="logging-steps-and-step-0"),
        pytest.param(None, 1, list(range(15)), id="log-every-step"),
        pytest.param(None, 0, list(range(15)), id="log-every-0-counts-as-1"),
        pytest.param(3, 5, [0, 3, 6, 9, 12], id="every-3"),
        pytest.param(1, 50, list(range(15)), id="every-step"),
    ],
)
def test_is_check_step(every: int | None, log_every: int, expected: list[int]) -> None:
    assert [s for s in range(15) if is_check_step(s, every, log_every)] == expected


def test_same_batch_on_the_device_and_same_on_every_rank() -> None:
    x = torch.randn(8, 3)
    a = fingerprint([x])
    assert bool(same_batch(a, fingerprint([x.clone()])))
    assert not bool(same_batch(a, fingerprint([x + 1])))
    empty = fingerprint([])
    assert not bool(same_batch(empty, empty))  # no tensor seen: never a repeat
    assert same_on_every_rank(torch.stack([a, a.clone()]))
    assert not same_on_every_rank(torch.stack([a, fingerprint([x + 1])]))
    assert not same_on_every_rank(torch.stack([empty, empty]))
    assert same_on_every_rank(a.unsqueeze(0))  # one rank: the caller only asks under DDP


@pytest.mark.parametrize(
    ("held", "expected"),
    [
        pytest.param("all", ([], 3), id="all-held"),
        pytest.param("none", (["a", "b", "c"], 0), id="none-held"),
        pytest.param("first", (["b", "c"], 1), id="some-held"),
    ],
)
def test_unheld_names(held: str, expected: tuple[list[str], int]) -> None:
    params = [("a", torch.zeros(1)), ("b", torch.zeros(1)), ("c", torch.zeros(1))]
    ids = {"all": {id(p) for _, p in params}, "none": set(), "first": {id(params[0][1])}}[held]
    assert unheld_names(params, ids) == expected


@pytest.mark.parametrize(
    ("active", "moved", "expected"),
    [(0, 0, None), (10, 0, True), (10, 1, False), (10, 10, False)],
    ids=["nothing-to-judge", "none-moved", "one-moved", "all-moved"],
)
def test_no_op_seen(active: int, moved: int, expected: bool | None) -> None:
    assert no_op_seen(active, moved) is expected


@pytest.mark.parametrize(
    ("stale", "judged", "expected"),
    [(0, 0, False), (4, 4, True), (3, 4, False), (0, 4, False)],
    ids=["nothing-judged", "all-stale", "some-stale", "none-stale"],
)
def test_all_stale(stale: int, judged: int, expected: bool) -> None:
    assert all_stale(stale, judged) is expected


class WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)  # running statistics: not compared
        self.register_buffer("offset", torch.ones(2))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # not a float: not compared


def test_replica_checksums_are_norms_and_sums_of_parameters_then_float_buffers() -> None:
    model = WithBuffers()
    names, parameters, values = replica_checksums(model)
    assert names == ["lin.weight", "lin.bias", "bn.weight", "bn.bias", "offset"]
    assert parameters == 4
    tensors = [model.lin.weight, model.lin.bias, model.bn.weight, model.bn.bias, model.offset]
    reference = torch.stack(
        [torch.stack([torch.linalg.vector_norm(t.detach()), t.detach().sum()]) for t in tensors]
    ).flatten()
    assert values is not None and torch.allclose(values, reference)
    assert checksums([t.double() for t in tensors]).dtype == torch.float32
    assert replica_checksums(nn.ReLU()) == ([], 0, None)
    assert [n for n, _ in replicated_buffers(model)] == ["offset"]


@pytest.mark.parametrize(
    ("row1", "expected"),
    [
        pytest.param([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], ([], []), id="identical"),
        pytest.param([1.0, 2.0, 3.5, 4.0, 5.0, 6.0], ([1], []), id="second-parameter"),
        pytest.param([1.0, 2.0, 3.0, 4.0, 5.0, 6.5], ([], [2]), id="buffer"),
        pytest.param([1.5, 2.0, 3.0, 4.0, 5.0, 6.5], ([0], [2]), id="both"),
    ],
)
def test_diverging_tensors_split_parameters_from_buffers(
    row1: list[float], expected: tuple[list[int], list[int]]
) -> None:
    table = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], row1])  # (norm, sum) of 2 parameters and 1 buffer
    assert diverging_tensors(table, 2, 1e-6) == expected


def test_model_parallel_reads_the_mesh_dimensions() -> None:
    class Dim:
        def __init__(self, n: int) -> None:
            self.n = n

        def size(self) -> int:
            return self.n

    class Mesh(dict):
        @property
        def mesh_dim_names(self) -> tuple[str, ...]:
            return tuple(self)

    def module(**dims: int) -> object:
        return types.SimpleNamespace(device_mesh=Mesh({k: Dim(v) for k, v in dims.items()}))

    assert not model_parallel(nn.Linear(2, 2))  # no mesh
    assert not model_parallel(module(data_parallel=4))
    assert not model_parallel(module(data_parallel=2, tensor_parallel=1))
    assert model_parallel(module(data_parallel=2, tensor_parallel=2))
    assert not holds_dtensors(nn.Linear(2, 2).parameters())


def test_noise_row_scales_the_micro_batches_and_marks_partial_windows() -> None:
    micro = [torch.tensor(2.0), torch.tensor(4.0)]
    row = noise_row(micro, 2, torch.tensor(3.0), None, torch.device("cpu"))
    assert row.tolist() == [12.0, 9.0, 1.0]  # mean 3 x 2^2 (the loss was divided by 2), |G|^2, measured
    scaled = noise_row(micro, 2, torch.tensor(3.0), torch.tensor(2.0), torch.device("cpu"))
    assert scaled.tolist() == [3.0, 9.0, 1.0]  # incoming gradients of a loss multiplied by the GradScaler's 2
    assert noise_row(micro[:1], 2, torch.tensor(3.0), None, torch.device("cpu")).tolist() == [0.0, 0.0, 0.0]
    assert noise_row(micro, 2, None, None, torch.device("cpu")).tolist() == [0.0, 0.0, 0.0]


def test_noise_sample_from_gathered_rows() -> None:
    # two ranks, two micro-batches of 8 each: B_small = 8, B_big = 32
    small, big = 1.0 + 10.0 / 8, 1.0 + 10.0 / 32  # |G|^2 = 1, tr(Sigma) = 10
    rows = torch.tensor([[small, big, 1.0], [small, big, 1.0]], dtype=torch.float64)
    sample = noise_sample(rows, 8, 2)
    assert sample is not None
    assert (sample.micro_batch, sample.global_batch, sample.micro_batches) == (8.0, 32.0, 4)
    assert sample.trace == pytest.approx(10.0) and sample.grad_sq == pytest.approx(1.0)
    assert noise_sample(torch.tensor([[small, big, 1.0], [0.0, 0.0, 0.0]]), 8, 2) is None  # a rank could not
    assert noise_sample(rows, 0, 2) is None  # no batch size
    assert noise_sample(torch.tensor([[2.0, 2.0, 1.0]]), 8, 2) is None  # identical micro-batches: no noise


@pytest.mark.parametrize(
    ("batch", "scale", "ratio", "expected"),
    [
        (64.0, 1000.0, 10.0, 0.064),
        (64.0, 100.0, 10.0, None),
        (640.0, 64.0, 10.0, None),
        (6400.0, 64.0, 10.0, 100.0),
    ],
    ids=["far-below", "within", "at-the-edge", "far-above"],
)
def test_batch_over_noise_scale(batch: float, scale: float, ratio: float, expected: float | None) -> None:
    assert batch_over_noise_scale(batch, scale, ratio) == expected


def test_noise_scale_add_counts_measurements_and_says_when_there_is_a_scale() -> None:
    ns = NoiseScale(decay=0.5)
    assert ns.add(None) is None and ns.count == 0
    assert ns.add(NoiseSample(10.0, 2.0, 8.0, 32.0, 4)) == 5.0
    assert ns.add(NoiseSample(-100.0, 2.0, 8.0, 32.0, 4)) is None  # counted, but no positive estimate
    assert ns.count == 2


def test_bn_updates_counts_train_mode_forwards_since_before() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    before = bn_batches_tracked(model.modules())
    model(torch.randn(8, 4))
    model(torch.randn(8, 4))
    assert bn_updates(before, model.modules()) == 2
    assert bn_updates(None, model.modules()) == 0
    assert bn_updates(before, nn.Linear(2, 2).modules()) == 0


# -- probes --------------------------------------------------------------------------------------------------------
def test_spread_and_per_group() -> None:
    assert spread(list(range(10)), 3) == [0, 4, 9]
    assert spread(list(range(3)), 8) == [0, 1, 2]
    a, b, c = (nn.Parameter(torch.ones(2)) for _ in range(3))
    opt = torch.optim.SGD([{"params": [a, b]}, {"params": [c], "lr": 0.0}], lr=0.1)
    picked = per_group(opt, [a, b, c])
    assert {id(p) for p in picked} == {id(a), id(b), id(c)}  # every group is represented
    assert per_group(opt, [a]) == [a]


def _step(model: nn.Module, opt: torch.optim.Optimizer, zero: bool = True) -> None:
    if zero:
        opt.zero_grad()
    model(torch.ones(4, 3)).sum().backward()
    opt.step()


@pytest.mark.parametrize(("lr", "moved"), [(0.1, True), (0.0, False)], ids=["trains", "lr-zero"])
def test_no_op_probe_reads_what_the_step_moved(lr: float, moved: bool) -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model(torch.ones(4, 3)).sum().backward()
    probe = NoOpProbe(opt, list(model.parameters()), 64, torch.tensor(True))
    opt.step()
    probe.close()
    read = probe.read()
    assert read is not None and read[0] == 8  # every sampled element had a gradient
    assert (read[1] > 0) is moved and probe.lrs == [lr]
    assert no_op_seen(*read) is (not moved)


@pytest.mark.parametrize(("zero", "stale"), [(True, 0.0), (False, 2.0)], ids=["zeroed", "never-zeroed"])
def test_stale_watch_hands_the_probe_over_at_the_next_step(zero: bool, stale: float) -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = StaleWatch(64)
    model(torch.ones(4, 3)).sum().backward()
    watch.arm(opt, 0, list(model.parameters()))
    opt.step()  # the post-hook starts the probe
    watch.disarm()
    assert watch.probe is not None and watch.due(opt, 0) is None  # not before a later step
    if zero:
        opt.zero_grad()
    model(torch.ones(4, 3)).sum().backward()
    probe = watch.due(opt, 1)
    assert probe is not None and watch.probe is None
    assert probe.verdict().tolist() == [stale, 2.0]
    watch.close()


@pytest.mark.parametrize(("zero", "stale"), [(True, 0.0), (False, 1.0)], ids=["zeroed", "never-zeroed"])
def test_a_gradient_that_is_always_zero_is_not_judged(zero: bool, stale: float) -> None:
    # The weights of an input that is always 0 (a blank pixel of the digits) get an exactly-zero gradient at every
    # backward: "backward found it zero" is no evidence that anything cleared it. Judging it used to make 1 of the 4
    # watched tensors look cleared, so a run that never zeroes its gradients was never reported.
    model = nn.Linear(3, 2, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    blank = nn.Linear(3, 2, bias=False)  # its gradient is zero: its input is all zero
    opt.add_param_group({"params": blank.parameters()})
    watch = StaleWatch(64)

    def backward() -> None:
        (model(torch.ones(4, 3)).sum() + blank(torch.zeros(4, 3)).sum()).backward()

    backward()
    watch.arm(opt, 0, [model.weight, blank.weight])
    opt.step()
    watch.disarm()
    if zero:
        opt.zero_grad(set_to_none=False)  # zeros left in place: cleared by value, not by None
    backward()
    probe = watch.due(opt, 1)
    assert probe is not None
    assert probe.verdict().tolist() == [stale, 1.0]  # only the informative gradient is judged
    watch.close()


def test_noise_meter_measures_one_step() -> None:
    model = nn.Linear(3, 1, bias=False)
    meter = NoiseMeter(decay=0.9)
    meter.start(list(model.parameters()), 0)
    assert not meter.measuring  # no batch size: no measurement
    meter.start(list(model.parameters()), 4)
    for x in (torch.ones(4, 3), 2 * torch.ones(4, 3)):
        meter.open()
        (model(x).sum() / 2).backward()
    row = meter.row(2, torch.linalg.vector_norm(model.weight.grad), None, torch.device("cpu"))
    assert not meter.measuring
    # incoming gradients (2, 2, 2) and (4, 4, 4) of a loss halved: the micro-batch gradients are (4, 4, 4) and
    # (8, 8, 8), mean squared norm (48 + 192) / 2; the step's gradient (6, 6, 6) is their mean
    assert row.tolist() == pytest.approx([120.0, 108.0, 1.0])
    meter.close()
    assert meter.micro_batch is None


# -- verdicts: the words of every finding --------------------------------------------------------------------------
VERDICTS = [
    pytest.param(
        verdicts.unheld_parameters(["a", "b"], 0, 1),
        (
            "optimizer_no_op",
            "error",
            {"unheld_tensors", "held_tensors_with_grad", "first_unheld", "optimizers"},
        ),
        "2 parameter tensor(s) receive gradients but no optimizer holds them (a, b); no parameter the optimizer "
        "holds receives a gradient: nothing trains.",
        id="unheld-nothing-trains",
    ),
    pytest.param(
        verdicts.unheld_parameters([f"p{i}" for i in range(7)], 3, 2),
        (
            "optimizer_no_op",
            "warning",
            {"unheld_tensors", "held_tensors_with_grad", "first_unheld", "optimizers"},
        ),
        "7 parameter tensor(s) receive gradients but no optimizer holds them (p0, p1, p2, p3, p4 and 2 more); 3 "
        "other parameter tensor(s) train.",
        id="unheld-others-train",
    ),
    pytest.param(
        verdicts.no_op_step(49, 439, 8, [0.0, 1e-3], 2),
        ("optimizer_no_op", "error", {"step", "sampled_elements", "tensors", "lr", "checks"}),
        "The optimizer step changed no parameter at 2 consecutive checks (last at step 49): 439 sampled elements "
        "of 8 tensor(s) had a non-zero gradient and none moved. Learning rate per group: 0, 0.001.",
        id="no-op",
    ),
    pytest.param(
        verdicts.stale_gradients(49, 50, 8, 2),
        ("stale_gradients", "error", {"watched_tensors", "step", "checks"}),
        "Gradients were not cleared between optimizer steps at 2 consecutive checks (last: steps 49 and 50): all "
        "8 watched gradient tensors still held the previous step's gradient when the next one was added, so every "
        "step re-applies all earlier gradients.",
        id="stale",
    ),
    pytest.param(
        verdicts.train_mode([("encoder", 2), ("", 1)], 2),
        ("wrong_mode", "warning", {"phase", "modules", "mode_sensitive_layers"}),
        "During training, 2 trained sub-module(s) are in eval mode with dropout/BatchNorm inside at 2 consecutive "
        "checks: encoder (2 layer(s)), <the whole model> (1 layer(s)). Dropout is off and BatchNorm uses frozen "
        "running statistics there.",
        id="train-mode",
    ),
    pytest.param(
        verdicts.validation_mode([("", 3)]),
        ("wrong_mode", "warning", {"phase", "modules", "mode_sensitive_layers"}),
        "During validation, 1 sub-module(s) with dropout/BatchNorm are in train mode: <the whole model> (3 "
        "layer(s)).",
        id="validation-mode",
    ),
    pytest.param(
        verdicts.validation_bn_updates(2),
        ("wrong_mode", "warning", {"phase", "bn_updates"}),
        "BatchNorm running statistics were updated 2 time(s) during validation: validation data leaked into the "
        "statistics the model evaluates with.",
        id="bn-updates",
    ),
    pytest.param(
        verdicts.parameter_divergence("net.2.weight", 1, [1.5, 1.25], 7),
        (
            "replica_divergence",
            "error",
            {"first_tensor", "diverging_parameters", "norms_per_rank", "world_size"},
        ),
        "1 parameter tensor(s) differ across the 2 ranks at step 7; the first is net.2.weight (norm per rank: "
        "1.5, 1.25). Each rank now trains a different model and the checkpoint keeps rank 0's.",
        id="parameters",
    ),
    pytest.param(
        verdicts.buffer_divergence("offset", 1, 2, 7),
        ("replica_divergence", "warning", {"first_tensor", "diverging_buffers", "world_size"}),
        "1 buffer(s) differ across the 2 ranks at step 7 (first: offset): each rank computes with different "
        "constants.",
        id="buffers",
    ),
    pytest.param(
        verdicts.repeated_steps(2, 1, 2),
        ("repeated_data", "error", {"batch_idx", "epoch", "checks"}),
        "Consecutive training batches were identical at 2 consecutive checks (last: batches 1 and 2 of epoch 1): "
        "the model sees the same data again and again.",
        id="repeated-steps",
    ),
    pytest.param(
        verdicts.repeated_ranks(2, 9, 2),
        ("repeated_data", "warning", {"world_size", "checks"}),
        "All 2 ranks trained on the same batch at 2 consecutive checks (last at step 9): data parallelism brings "
        "no new samples.",
        id="repeated-ranks",
    ),
    pytest.param(
        verdicts.grad_noise_scale(640.0, 10.0 / 64.0, 100.0, 25.0, 4, 5),
        (
            "grad_noise_scale",
            "info",
            {
                "noise_scale",
                "global_batch",
                "batch_over_noise_scale",
                "micro_batch",
                "micro_batches",
                "checks",
            },
        ),
        "The global batch (100 samples) is 6.4x below the gradient noise scale B_simple = 640 (averaged over 5 "
        "checks).",
        id="noise-below",
    ),
    pytest.param(
        verdicts.grad_noise_scale(10.0, 20.0, 200.0, 50.0, 4, 5),
        (
            "grad_noise_scale",
            "info",
            {
                "noise_scale",
                "global_batch",
                "batch_over_noise_scale",
                "micro_batch",
                "micro_batches",
                "checks",
            },
        ),
        "The global batch (200 samples) is 20.0x above the gradient noise scale B_simple = 10 (averaged over 5 "
        "checks).",
        id="noise-above",
    ),
]


@pytest.mark.parametrize(("verdict", "kind", "message"), VERDICTS)
def test_verdicts_say_what_was_seen(verdict: Verdict, kind: tuple[str, str, set[str]], message: str) -> None:
    code, severity, keys = kind
    assert (verdict.code, verdict.severity, set(verdict.evidence)) == (code, severity, keys)
    assert verdict.message == message
    assert verdict.advice and all(isinstance(a, str) and a for a in verdict.advice)


def test_advice_follows_the_evidence() -> None:
    below = verdicts.grad_noise_scale(640.0, 0.1, 64.0, 16.0, 4, 5)
    above = verdicts.grad_noise_scale(6.4, 10.0, 64.0, 16.0, 4, 5)
    assert "Larger batches" in below.advice[0] and "smaller batch" in above.advice[0]
    assert verdicts.unheld_parameters(["a"], 0, 1).advice == verdicts.UNHELD_ADVICE
    assert verdicts.no_op_step(0, 1, 1, [0.0], 2).advice == verdicts.NO_OP_ADVICE
    assert verdicts.validation_bn_updates(1).advice == verdicts.VAL_MODE_ADVICE
    assert verdicts.repeated_ranks(2, 0, 2).advice == verdicts.RANK_REPEAT_ADVICE
