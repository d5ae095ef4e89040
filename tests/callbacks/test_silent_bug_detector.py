"""SilentBugDetector on real Trainers: each silent bug injected is caught, each healthy look-alike stays clean."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, Sampler

from lightning_diag import SilentBugDetector, WarmupCosine
from tests.helpers import Regression, find, loader, regression_data, trainer
from tests.test_distributed import run_script


class Net(Regression):
    """The tests' regressor with BatchNorm and dropout (the layers whose mode matters)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.net = nn.Sequential(
            nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1)
        )


def fit(
    model: pl.LightningModule,
    train: DataLoader | None = None,
    val: DataLoader | None = None,
    *,
    detector: SilentBugDetector | None = None,
    max_steps: int = 14,
    **kwargs: Any,
) -> SilentBugDetector:
    detector = detector or SilentBugDetector(check_every_n_steps=3)
    callbacks = [*kwargs.pop("callbacks", []), detector]
    t = trainer(max_steps=max_steps, callbacks=callbacks, **kwargs)
    t.fit(model, train if train is not None else loader(n=128, shuffle=True), val)
    return detector


def alarms(detector: SilentBugDetector) -> list[tuple[str, str]]:
    return [(f.code, f.severity) for f in detector.findings if f.severity != "info"]


# -- healthy look-alikes ------------------------------------------------------------------------------------
class FrozenBackbone(Net):
    """Fine-tuning: the first layers frozen on purpose, in eval mode and without gradients."""

    def on_train_start(self) -> None:
        self.net[:2].eval().requires_grad_(False)


class FrozenBNStats(Net):
    """BatchNorm statistics kept fixed on purpose (the BatchNorm layer alone in eval, its affine still trains)."""

    def on_train_start(self) -> None:
        self.net[1].eval()


class MCDropout(Net):
    """Monte-Carlo dropout at validation: dropout layers alone switched to train mode."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.net[3].train()
        super().validation_step(batch, batch_idx)


class ManualZeroBefore(Net):
    def __init__(self, zero: str = "before", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.zero = zero

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        x, y = batch
        if self.zero == "before":
            opt.zero_grad()
        loss = nn.functional.mse_loss(self(x), y)
        self.manual_backward(loss)
        opt.step()
        if self.zero == "after":
            opt.zero_grad()
        return loss.detach()


class WithEMA(Net):
    """An EMA copy of the network: trainable flags left on, never in the loss, held by no optimizer."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ema = copy.deepcopy(self.net)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.net.parameters(), lr=0.05)


class Distillation(Net):
    """A teacher in eval mode (dropout, BatchNorm), run under no_grad, its requires_grad flags left on."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.teacher = copy.deepcopy(self.net)

    def on_train_start(self) -> None:
        self.teacher.eval()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        with torch.no_grad():
            target = self.teacher(x)
        return nn.functional.mse_loss(self(x), 0.5 * (y + target))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.net.parameters(), lr=0.05)


class GAN(pl.LightningModule):
    """Two optimizers under manual optimization; G's backward also reaches D's parameters, zeroed before D steps."""

    def __init__(self, toggle: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.toggle = toggle
        self.gen = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.disc = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, _ = batch
        opt_g, opt_d = self.optimizers()
        fake = self.gen(torch.randn(x.shape[0], 4))
        if self.toggle:  # Lightning's pattern: the other optimizer's parameters stop requiring grad meanwhile
            self.toggle_optimizer(opt_d)
        opt_d.zero_grad()
        d_loss = (
            nn.functional.softplus(-self.disc(x)).mean()
            + nn.functional.softplus(self.disc(fake.detach())).mean()
        )
        self.manual_backward(d_loss)
        opt_d.step()
        if self.toggle:
            self.untoggle_optimizer(opt_d)
            self.toggle_optimizer(opt_g)
        opt_g.zero_grad()
        g_loss = nn.functional.softplus(-self.disc(fake)).mean()
        self.manual_backward(g_loss)  # leaves gradients on D's parameters: D zeroes them before its next step
        opt_g.step()
        if self.toggle:
            self.untoggle_optimizer(opt_g)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.gen.parameters(), 1e-3), torch.optim.Adam(self.disc.parameters(), 1e-3)


HEALTHY = {
    "dropout-batchnorm-shuffle-val": lambda: fit(Net(), val=loader(n=16), val_check_interval=5),
    "gradient-accumulation": lambda: fit(Net(), accumulate_grad_batches=4, max_steps=8),
    "frozen-backbone": lambda: fit(FrozenBackbone(), val=loader(n=16), val_check_interval=5),
    "frozen-bn-statistics": lambda: fit(FrozenBNStats()),
    "mc-dropout-validation": lambda: fit(MCDropout(), val=loader(n=16), val_check_interval=5),
    "manual-zero-grad-before-backward": lambda: fit(ManualZeroBefore("before")),
    "manual-zero-grad-after-step": lambda: fit(ManualZeroBefore("after")),
    "small-dataset-shuffled": lambda: fit(Net(), loader(n=16, batch_size=8, shuffle=True)),
    "one-batch-dataset": lambda: fit(Net(), loader(n=8, batch_size=8, shuffle=True)),
    "overfit-batches": lambda: fit(Net(), loader(n=64), overfit_batches=1),
    "warmup-from-zero": lambda: fit(Net(), callbacks=[WarmupCosine(warmup_steps=4)]),
    "fp16-grad-scaler": lambda: fit(Net(), plugins=[MixedPrecision("16-mixed", "cpu")]),
    "ema-copy": lambda: fit(WithEMA()),
    "distillation-teacher-in-eval": lambda: fit(Distillation()),
    "gan-two-optimizers": lambda: fit(GAN(), max_steps=24),
    "gan-toggled-optimizers": lambda: fit(GAN(toggle=True), max_steps=24),
}


@pytest.mark.parametrize("name", list(HEALTHY))
def test_healthy_look_alikes_stay_clean(name: str) -> None:
    detector = HEALTHY[name]()
    assert alarms(detector) == [], [f.message for f in detector.findings]


@pytest.mark.parametrize("guard_first", [True, False], ids=["guard-first", "detector-first"])
def test_steps_skipped_by_nan_guard_are_not_no_ops(guard_first: bool) -> None:
    """NaN gradients at every check step, skipped by NaNGuard (gradients dropped, step not applied): a skip on
    purpose is neither an optimizer no-op nor stale gradients, whatever the callbacks' order.
    """
    from lightning_diag import NaNGuard
    from tests.callbacks.nan_helpers import Faulty

    guard = NaNGuard(action="skip", check_spikes=False)
    detector = SilentBugDetector(check_every_n_steps=3)
    callbacks = [guard, detector] if guard_first else [detector, guard]
    t = trainer(max_steps=10, callbacks=callbacks)
    t.fit(Faulty("gradient", at=(0, 3, 6, 9)), loader(n=128))
    assert guard.skipped_steps == 4
    assert alarms(detector) == []


# -- injected bugs ------------------------------------------------------------------------------------------
class OverACopy(Net):
    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(copy.deepcopy(self.net).parameters(), lr=0.05)


class ReplacedLayer(Net):
    def on_train_start(self) -> None:
        self.net[4] = nn.Linear(16, 1)  # after configure_optimizers: the optimizer holds the old one


class NoZeroGrad(Net):
    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        pass  # "optimised away"


class EvalEncoder(Net):
    def on_train_start(self) -> None:
        self.net[:4].eval()  # e.g. left over from computing a metric


class TrainInValidation(Net):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.train()
        super().validation_step(batch, batch_idx)


class SameIndices(Sampler):
    """A broken sampler: the same eight indices every time."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Any:
        return iter([i % 8 for i in range(self.n)])


def test_lr_zero_is_an_optimizer_no_op() -> None:
    detector = fit(Net(lr=0.0))
    found = find(detector.findings, "optimizer_no_op")
    assert found and found.severity == "error"
    assert found.evidence["lr"] == "0" and found.evidence["sampled_elements"] > 0
    assert alarms(detector) == [("optimizer_no_op", "error")]


def test_optimizer_over_a_copy_trains_nothing() -> None:
    detector = fit(OverACopy())
    found = find(detector.findings, "optimizer_no_op")
    assert found and found.severity == "error" and found.step == 0
    assert found.evidence["held_tensors_with_grad"] == 0 and found.evidence["unheld_tensors"] == 6


def test_layer_replaced_after_configure_optimizers() -> None:
    detector = fit(ReplacedLayer())
    found = find(detector.findings, "optimizer_no_op")
    assert found and found.severity == "warning"
    assert found.evidence["first_unheld"] == "net.4.weight" and found.evidence["unheld_tensors"] == 2


@pytest.mark.parametrize("model", [NoZeroGrad, lambda: ManualZeroBefore("never")], ids=["override", "manual"])
def test_gradients_never_zeroed_are_stale(model) -> None:
    detector = fit(model())
    found = find(detector.findings, "stale_gradients")
    assert found and found.severity == "error" and found.evidence["watched_tensors"] > 0
    # checks at steps 0, 3, 6: each judged on the device at the next step and read at the next check (patience 2)
    assert found.step == 6 and found.evidence["step"] == 3


def test_submodule_left_in_eval_mode() -> None:
    detector = fit(EvalEncoder())
    found = find(detector.findings, "wrong_mode")
    assert found and found.evidence["phase"] == "train"
    assert found.evidence["modules"] == "net.1, net.3"  # the BatchNorm and the dropout the slice reached
    assert alarms(detector) == [("wrong_mode", "warning")]


def test_train_mode_in_validation_and_batchnorm_updated() -> None:
    detector = fit(TrainInValidation(), val=loader(n=16), val_check_interval=5)
    found = [f for f in detector.findings if f.code == "wrong_mode"]
    phases = {f.evidence["phase"]: f for f in found}
    assert set(phases) == {"validation"} and len(found) == 2
    assert any(f.evidence.get("bn_updates", 0) > 0 for f in found)
    assert any(f.evidence.get("modules") == "<root>" for f in found)


def test_the_same_batch_every_step() -> None:
    data = regression_data(64)
    detector = fit(Net(), DataLoader(data, batch_size=8, sampler=SameIndices(64)))
    found = find(detector.findings, "repeated_data")
    assert found and found.severity == "error"
    assert alarms(detector) == [("repeated_data", "error")]


# -- the gradient noise scale -------------------------------------------------------------------------------
def test_noise_scale_equals_the_direct_computation_under_accumulation(tmp_path) -> None:
    """One check over four micro-batches: the logged B_simple is the estimator applied to the micro-batch
    gradients computed directly (with the initial weights) outside the Trainer.
    """
    torch.manual_seed(0)
    model = Regression(lr=0.05)
    start = copy.deepcopy(model)
    data = regression_data(64)
    detector = SilentBugDetector(check_every_n_steps=100)
    from lightning.pytorch.loggers import CSVLogger

    t = trainer(
        max_steps=1,
        accumulate_grad_batches=4,
        callbacks=[detector],
        logger=CSVLogger(
            tmp_path, name="", version=""
        ),  # log_every_n_steps=50: the check is not a flush step
    )
    t.fit(model, DataLoader(data, batch_size=8))
    grads = []
    for i in range(4):
        start.zero_grad()
        x, y = data.tensors[0][8 * i : 8 * i + 8], data.tensors[1][8 * i : 8 * i + 8]
        nn.functional.mse_loss(start(x), y).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in start.parameters()]).double())
    small_sq = float(torch.stack([g.pow(2).sum() for g in grads]).mean())
    big_sq = float(torch.stack(grads).mean(0).pow(2).sum())
    from lightning_diag.core.silent import noise_scale_terms

    trace, grad_sq = noise_scale_terms(small_sq, big_sq, 8, 32)
    assert detector.noise_scale() == pytest.approx(trace / grad_sq, rel=1e-4)
    from tests.readers import csv_scalars

    logged = csv_scalars(os.path.join(tmp_path, "metrics.csv"))["diag/grad_noise/scale"]
    assert logged[0][1] == pytest.approx(trace / grad_sq, rel=1e-4)


def test_noise_scale_is_reported_with_its_numbers_when_far_from_the_batch() -> None:
    """Pure-noise targets: the gradient is mostly noise, so B_simple is far above a global batch of 8."""
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    noisy = torch.utils.data.TensorDataset(x, x[:, :1] * 0.01 + torch.randn(512, 1))
    detector = SilentBugDetector(check_every_n_steps=1, noise_scale_min_checks=5)
    fit(
        Regression(lr=0.01),
        DataLoader(noisy, batch_size=2, shuffle=True),
        detector=detector,
        accumulate_grad_batches=4,
        max_steps=30,
    )
    found = find(detector.findings, "grad_noise_scale")
    assert found and found.severity == "info"
    assert found.evidence["global_batch"] == 8.0 and found.evidence["noise_scale"] > 80
    assert found.evidence["batch_over_noise_scale"] < 0.1
    assert alarms(detector) == []


def test_noise_scale_needs_more_than_one_micro_batch() -> None:
    detector = fit(Net())
    assert detector.noise_scale() != detector.noise_scale()  # NaN: nothing to compare on one process


# -- cost -------------------------------------------------------------------------------------------------------
def test_quiet_steps_cost_no_host_sync() -> None:
    """Every hook of the detector runs under a dispatch-level sync counter, counted per optimizer step (the step
    a batch starts in): at its defaults only Lightning's logging steps (and step 0) may read from the device.
    """
    from tests.callbacks.grad_helpers import SyncCounter

    detector = SilentBugDetector()
    per_step: dict[int, int] = {}
    current = [0]

    class Step(pl.Callback):
        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            current[0] = trainer.global_step

    for hook in (
        "on_train_batch_start",
        "on_before_backward",
        "on_before_optimizer_step",
        "on_train_batch_end",
    ):
        original = getattr(detector, hook)

        def counted(*args: Any, _original: Any = original) -> Any:
            mode = SyncCounter()
            with mode:
                out = _original(*args)
            per_step[current[0]] = per_step.get(current[0], 0) + mode.count
            return out

        setattr(detector, hook, counted)
    # LR 0 and a repeated batch: the checks have something to find, and still no read on quiet steps
    data = DataLoader(regression_data(64), batch_size=8, sampler=SameIndices(64))
    fit(
        Net(lr=0.0),
        data,
        detector=detector,
        max_steps=20,
        accumulate_grad_batches=2,
        log_every_n_steps=5,
        callbacks=[Step()],
    )
    checks = {s for s in per_step if s == 0 or (s + 1) % 5 == 0}
    quiet = [s for s in per_step if s not in checks]
    assert len(quiet) == 15 and all(per_step[s] == 0 for s in quiet), per_step
    assert all(per_step[s] > 0 for s in checks)  # the counter sees the checks' reads
    assert {c for c, _ in alarms(detector)} == {"optimizer_no_op", "repeated_data"}


# -- arguments and state ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"check_every_n_steps": 0}, "`check_every_n_steps` must be >= 1, got 0."),
        ({"check_every_n_steps": 2.5}, "`check_every_n_steps` must be an int, got 2.5."),
        ({"patience": 0}, "`patience` must be >= 1, got 0."),
        ({"replica_tolerance": 1.0}, r"`replica_tolerance` must be in \(0, 1\), got 1.0."),
        ({"replica_tolerance": 0.0}, r"`replica_tolerance` must be in \(0, 1\), got 0.0."),
        ({"noise_scale_ratio": 1.0}, "`noise_scale_ratio` must be > 1, got 1.0."),
        ({"noise_scale_min_checks": 0}, "`noise_scale_min_checks` must be >= 1, got 0."),
        ({"noise_scale_decay": 1.0}, r"`noise_scale_decay` must be in \[0, 1\), got 1.0."),
        ({"sample_size": 0}, "`sample_size` must be >= 1, got 0."),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SilentBugDetector(**kwargs)


def test_state_survives_a_checkpoint_and_a_new_fit_starts_clean(tmp_path) -> None:
    detector = fit(Net(lr=0.0), accumulate_grad_batches=2, max_steps=8)
    state = detector.state_dict()
    assert state["streaks"]["no_op"] >= 2 and state["noise"]["count"] >= 1
    torch.save(state, tmp_path / "s.pt")
    loaded = SilentBugDetector(check_every_n_steps=3)
    loaded.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert loaded.state_dict() == json.loads(json.dumps(state))
    assert [f.code for f in loaded.findings] == [f.code for f in detector.findings]
    fit(Net(), detector=detector)
    assert alarms(detector) == []  # setup("fit") forgot the previous fit


def test_state_0_1_0_deferred_entries_are_judged_after_loading_and_saved_in_the_queue_format() -> None:
    """0.1.0 saved its follow-ups as ``"deferred": [{"kind", "values", **where}]``; they load into the shared queue
    and are judged at the next check with one host read, as 0.1.0 judged them; ``state_dict`` writes the queue."""
    from types import SimpleNamespace

    from lightning_diag.testing import HostSyncCounter

    detector = SilentBugDetector()
    detector.load_state_dict(
        {
            "streaks": {"no_op": 0, "stale": 1, "mode": 0, "repeat": 1, "ranks": 0},
            "noise": {"trace": 0.0, "grad_sq": 0.0, "count": 0},
            "held_checked": True,
            "deferred": [
                {"kind": "repeat", "values": [1.0], "batch_idx": 5, "epoch": 1},
                {"kind": "stale", "values": [4.0, 4.0], "step": 9, "next_step": 10},
            ],
        }
    )
    state = detector.state_dict()
    assert "deferred" not in state
    assert [e["info"] for e in state["queue"]] == [
        {"kind": "repeat", "batch_idx": 5, "epoch": 1},
        {"kind": "stale", "step": 9, "next_step": 10},
    ]
    counter = HostSyncCounter()
    with counter:
        detector._take_deferred(SimpleNamespace(world_size=1, global_step=14, current_epoch=1))
    assert counter.count == 1  # both entries in one read
    found = {f.code: f for f in detector.findings}
    assert found["repeated_data"].evidence == {"batch_idx": 5, "epoch": 1, "checks": 2}
    assert found["stale_gradients"].evidence == {"watched_tensors": 4, "step": 9, "checks": 2}
    assert detector.state_dict()["queue"] == []


class ManyBugs(Net):
    """Three silent bugs at once: gradients never zeroed, a sub-module left in eval mode, the same batch again."""

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        pass

    def on_train_start(self) -> None:
        self.net.eval()


@pytest.mark.parametrize("every", [3, 5, 7])  # 5 and 7: a check on the last step before a checkpoint
def test_a_resumed_run_decides_like_the_straight_one(every: int, tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt: str | None = None) -> SilentBugDetector:
        torch.manual_seed(0)
        detector = SilentBugDetector(check_every_n_steps=every)
        save = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
        data = DataLoader(regression_data(64), batch_size=8, sampler=SameIndices(64))
        t = trainer(max_epochs=4, enable_checkpointing=True, callbacks=[detector, save])
        t.fit(ManyBugs(), data, ckpt_path=ckpt)
        return detector

    straight = run()
    assert {f.code for f in straight.findings} == {"stale_gradients", "wrong_mode", "repeated_data"}
    resumed = run(str(tmp_path / "epoch=1.ckpt"))
    assert [f.to_dict() for f in resumed.findings] == [f.to_dict() for f in straight.findings]
    assert resumed.state_dict() == straight.state_dict()


def test_sharded_strategies_are_not_compared_as_replicas() -> None:
    """FSDP1 and DeepSpeed need a GPU; their strategy objects are enough: ranks hold shards, not replicas."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from lightning_diag.callbacks.silent_bug_detector import _replicated

    model = Net()
    assert _replicated(SimpleNamespace(world_size=2, strategy=DDPStrategy()), model)
    assert _replicated(SimpleNamespace(world_size=1, strategy=None), model)
    assert not _replicated(SimpleNamespace(world_size=2, strategy=FSDPStrategy()), model)


# -- DDP --------------------------------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.timeout(420)
def test_ddp_replica_divergence_and_same_data_on_every_rank(tmp_path) -> None:
    run_script("silent_dist.py", str(tmp_path), cwd=tmp_path)
    r0, r1 = (json.loads((tmp_path / f"silent-rank{r}.json").read_text()) for r in (0, 1))
    for scenario in r0:
        # every rank judged alike (the same gathered table), at the same steps
        assert r0[scenario]["alarms"] == r1[scenario]["alarms"], scenario
        assert r0[scenario]["step"] == r1[scenario]["step"]
    assert r0["healthy"]["alarms"] == [] and r0["healthy-batchnorm"]["alarms"] == []
    assert r0["healthy"]["noise_scale"] > 0  # per-rank gradients vs their mean: measurable under DDP
    for scenario in ("healthy", "rank-local-weight", "rank-local-buffer"):  # (no dropout: reproducible)
        # step 0's measurement equals the estimator on the per-rank gradients computed directly, outside DDP
        # (NaN, reported as None, when that first estimate is not positive)
        direct, measured = r0[scenario]["step0_direct"], r0[scenario]["step0_measured"]
        if direct > 0:
            assert measured == pytest.approx(direct, rel=1e-4), scenario
        else:
            assert measured is None
    assert r0["rank-local-weight"]["alarms"] == [["replica_divergence", "error"]]
    assert r0["rank-local-weight"]["evidence"]["first_tensor"] == "net.2.weight"
    assert r0["rank-local-buffer"]["alarms"] == [["replica_divergence", "warning"]]
    assert r0["rank-local-buffer"]["evidence"]["first_tensor"] == "offset"
    assert r0["no-distributed-sampler"]["alarms"] == [["repeated_data", "warning"]]


def test_without_the_optimizer_check_the_stale_probe_hooks_do_not_pile_up() -> None:
    # The stale probe's starting hook used to be removed only next to the no-op probe: with check_optimizer=False
    # one more post-hook stayed on the optimizer at every check, and the patience counted steps instead of checks.
    detector = SilentBugDetector(check_every_n_steps=2, check_optimizer=False)
    t = trainer(max_steps=24, callbacks=[detector])
    t.fit(Regression(), loader(n=64))
    assert len(t.optimizers[0]._optimizer_step_post_hooks) <= 1
    assert [f.code for f in detector.findings] == []
