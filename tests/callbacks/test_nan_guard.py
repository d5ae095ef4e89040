"""NaNGuard on real Trainers: faults injected at a known step and place; each policy; each precision."""

from __future__ import annotations

import copy
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_diag import LightningDiagWarning, NaNGuard, NonFiniteError, WarmupCosine
from tests.callbacks.grad_helpers import PRECISIONS, precision_kwargs
from tests.callbacks.nan_helpers import EXPECTED, Faulty, adam_steps, all_finite, faulty_loader
from tests.helpers import find, trainer

STEPS = 8
AT = 3  # the step where the fault fires


class StepWatch(Callback):
    """Copies of the parameters and optimizer state just before and just after every optimizer step."""

    def __init__(self) -> None:
        self.before: dict[int, Any] = {}
        self.after: dict[int, Any] = {}

    @staticmethod
    def _state(pl_module: Any, trainer: Any) -> Any:
        return (
            {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            copy.deepcopy(trainer.optimizers[0].state_dict()["state"]),
        )

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.before[trainer.global_step] = self._state(pl_module, trainer)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.after[trainer.global_step - 1] = self._state(pl_module, trainer)


def same_state(a: Any, b: Any) -> bool:
    def eq(x: Any, y: Any) -> bool:
        if isinstance(x, torch.Tensor):
            return torch.equal(x, y)
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        if isinstance(x, (tuple, list)):
            return len(x) == len(y) and all(eq(a, b) for a, b in zip(x, y, strict=True))
        return bool(x == y)

    return eq(a, b)


def fit(inject: str, guard: NaNGuard, precision: str = "32-true", at: tuple[int, ...] = (AT,), **kwargs: Any):
    model = Faulty(inject, at)
    watch = StepWatch()
    t = trainer(max_steps=STEPS, callbacks=[watch, guard], **precision_kwargs(precision), **kwargs)
    t.fit(model, faulty_loader(inject, at))
    return t, model, watch


def check_finding(guard: NaNGuard, inject: str) -> Any:
    code, phase, module, tensor = EXPECTED[inject]
    finding = find(guard.findings, code)
    assert finding is not None, [f.code for f in guard.findings]
    assert finding.evidence["phase"] == phase, finding.message
    assert finding.evidence["module"] == module  # "" where no module applies (input, loss)
    assert tensor in finding.evidence["tensor"], finding.evidence
    assert finding.evidence["reproduced"] == 1
    return finding


# -- skip --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("inject", ["input", "forward", "loss", "gradient"])
def test_skip_withholds_exactly_the_bad_update(inject: str, precision: str) -> None:
    guard = NaNGuard(action="skip", check_spikes=False)
    t, model, watch = fit(inject, guard, precision)
    assert t.state.finished and all_finite(model)
    # the bad step left parameters and optimizer state (Adam's moments and step) bit-identical
    assert same_state(watch.before[AT], watch.after[AT])
    assert not same_state(watch.before[AT + 1], watch.after[AT + 1])  # and the next one trained
    assert adam_steps(t.optimizers[0]) == STEPS - 1
    if inject == "gradient" and precision == "16-mixed-scaler":
        # non-finite gradients under a GradScaler are its business: it skipped the step, NaNGuard did not
        assert guard.findings == [] and guard.skipped_steps == 0
        return
    assert guard.skipped_steps == 1
    finding = check_finding(guard, inject)
    assert finding.step == AT and finding.severity == "warning"
    assert f"step {AT}" in finding.message and "skipped" in finding.message


def test_parameter_fault_cannot_be_skipped_and_escalates() -> None:
    guard = NaNGuard(action="skip", check_spikes=False)  # escalate_to="raise" by default
    with pytest.raises(NonFiniteError, match=r"step 4 .*optimizer update: parameter `net.0.weight`"):
        fit("parameter", guard)
    check_finding(guard, "parameter")


def test_consecutive_skips_escalate() -> None:
    guard = NaNGuard(action="skip", max_consecutive_skips=2, check_spikes=False)
    with pytest.raises(NonFiniteError, match="step 4"):
        fit("forward", guard, at=(2, 3, 4))
    assert guard.skipped_steps == 2


def test_skips_that_recover_reset_the_consecutive_count() -> None:
    guard = NaNGuard(action="skip", max_consecutive_skips=1, check_spikes=False)
    t, _, _ = fit("forward", guard, at=(1, 3, 5))
    assert t.state.finished and guard.skipped_steps == 3 and guard.policy.consecutive_skips == 0
    finding = find(guard.findings, "non_finite_loss")
    assert finding.count == 3 and finding.evidence["module"] == "net.2"


def test_skip_holds_the_warmup_cosine_schedule() -> None:
    lrs: list[float] = []

    class LR(Callback):
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            lrs.append(optimizer.param_groups[0]["lr"])

    schedule = WarmupCosine(warmup_steps=3, total_steps=STEPS)
    guard = NaNGuard(action="skip", check_spikes=False)
    t = trainer(max_steps=STEPS, callbacks=[LR(), schedule, guard])
    t.fit(Faulty("forward", {AT}), faulty_loader())
    expected = [schedule.lr_at(s, 0.01) for s in range(STEPS)]
    # the skipped step AT used rate AT; the next step uses it again, then the schedule goes on one step behind
    assert lrs == pytest.approx([*expected[: AT + 1], *expected[AT : STEPS - 1]])
    assert schedule.held_steps == 1


# -- rollback ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("inject", ["input", "forward", "loss", "gradient", "parameter"])
def test_rollback_restores_the_snapshot(inject: str, precision: str) -> None:
    guard = NaNGuard(action="rollback", snapshot_every_n_steps=2, check_spikes=False)
    at = AT + 1 if inject == "parameter" else AT  # the corrupted weight is seen by the step after the update
    t, model, watch = fit(inject, guard, precision, at=(AT,))
    assert t.state.finished and all_finite(model)
    if inject == "gradient" and precision == "16-mixed-scaler":
        assert guard.findings == [] and guard.rollbacks == 0  # the GradScaler's own skip
        return
    assert guard.rollbacks == 1 and guard.skipped_steps == 1
    snapshot_step = 2  # good steps 0 and 1, then a snapshot before step 2's update
    # after the bad step, the model and optimizer are exactly as they were before step `snapshot_step`
    assert same_state(watch.after[at][0], watch.before[snapshot_step][0])
    assert same_state(watch.after[at][1], watch.before[snapshot_step][1])
    if getattr(t.precision_plugin, "scaler", None) is None:
        assert adam_steps(t.optimizers[0]) == snapshot_step + (STEPS - 1 - at)
    finding = check_finding(guard, inject)
    assert finding.step == at and "rolled back to the snapshot of step 2" in finding.message


def test_rollback_backs_off_the_learning_rate_and_the_schedule_keeps_it() -> None:
    schedule = WarmupCosine(warmup_steps=2, total_steps=20)
    guard = NaNGuard(action="rollback", snapshot_every_n_steps=2, lr_backoff=0.5, check_spikes=False)
    t = trainer(max_steps=STEPS, callbacks=[schedule, guard])
    t.fit(Faulty("forward", {AT}), faulty_loader())
    assert schedule.lr_scale == 0.5 and schedule.held_steps == AT + 1 - 2
    step = STEPS - schedule.held_steps
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.5 * schedule.lr_at(step - 1, 0.01))


def test_two_rollbacks_to_one_snapshot_replay_the_schedule_from_it() -> None:
    lrs: list[float] = []

    class LR(Callback):
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            lrs.append(optimizer.param_groups[0]["lr"])

    schedule = WarmupCosine(warmup_steps=2, total_steps=20)
    guard = NaNGuard(
        action="rollback", snapshot_every_n_steps=100, check_spikes=False
    )  # only the snapshot at step 0
    t = trainer(max_steps=STEPS, callbacks=[LR(), schedule, guard])
    t.fit(Faulty("forward", {2, 5}), faulty_loader())
    assert guard.rollbacks == 2 and adam_steps(t.optimizers[0]) == 2  # steps 6 and 7, from the step-0 state
    positions = [0, 1, 2, 0, 1, 2, 0, 1]  # the schedule restarts from the snapshot with the model
    assert lrs == pytest.approx([schedule.lr_at(p, 0.01) for p in positions])


def test_rollback_backs_off_a_plain_scheduler_too() -> None:
    class WithScheduler(Faulty):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.01)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)}

    guard = NaNGuard(action="rollback", snapshot_every_n_steps=2, lr_backoff=0.25, check_spikes=False)
    t = trainer(max_steps=STEPS, callbacks=[guard])
    t.fit(WithScheduler("forward", {AT}), faulty_loader())
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0025)  # survived the scheduler's writes


def test_rollbacks_are_bounded_and_the_stop_says_they_were_exhausted() -> None:
    guard = NaNGuard(action="rollback", snapshot_every_n_steps=1, max_rollbacks=2, check_spikes=False)
    with pytest.raises(NonFiniteError, match="step 5") as raised:
        fit("forward", guard, at=(2, 4, 5))
    assert guard.rollbacks == 2
    message = str(raised.value)
    assert (
        "training stopped (the fault came back after 2 rollback(s), the most `max_rollbacks` allows"
        in message
    )
    assert (
        "with `lr_backoff=1.0` every rollback resumed at the same learning rate, which diverged again"
        in message
    )
    (stop,) = [f for f in guard.findings if f.evidence.get("action") == "raise"]
    assert stop.severity == "error" and "Set `lr_backoff=0.5`" in stop.advice[0]


def test_skips_that_run_out_say_so() -> None:
    guard = NaNGuard(action="skip", max_consecutive_skips=2, check_spikes=False)
    with pytest.raises(NonFiniteError, match="2 consecutive step\\(s\\) were skipped"):
        fit("forward", guard, at=(3, 4, 5))


def test_skip_escalates_to_rollback_when_asked() -> None:
    guard = NaNGuard(action="skip", escalate_to="rollback", snapshot_every_n_steps=2, check_spikes=False)
    t, model, _ = fit("parameter", guard)
    assert t.state.finished and all_finite(model) and guard.rollbacks == 1


# -- warn and raise ----------------------------------------------------------------------------------------------
def test_warn_records_and_lets_the_update_happen() -> None:
    # warn defers its checks to the logging steps (no host sync per step): the step is named, not replayed
    guard = NaNGuard(action="warn", check_spikes=False, check_params_every_n_steps=0)
    with pytest.warns(LightningDiagWarning) as record:
        t, model, _ = fit("forward", guard, log_every_n_steps=5)
    messages = [str(w.message) for w in record if issubclass(w.category, LightningDiagWarning)]
    assert len(messages) == 1 and "at step 3 (epoch 0)" in messages[0] and "not replayed" in messages[0]
    assert t.state.finished and not all_finite(model)  # warn does not protect the weights
    finding = find(guard.findings, "non_finite_loss")
    assert finding is not None and finding.step == AT and finding.severity == "error"
    # the NaN update went ahead: every later step is non-finite too, one finding with a count
    assert finding.count == STEPS - AT and finding.last_step == STEPS - 1
    assert finding.evidence["phase"] == "loss" and finding.evidence["deferred"] == 1
    assert guard.skipped_steps == 0


@pytest.mark.parametrize(
    ("guard", "optimizer"),
    [
        (lambda: NaNGuard(action="warn"), "adamw"),
        (lambda: NaNGuard(action="skip"), "adamw_fused"),
    ],
    ids=["warn", "skip-fused"],
)
def test_deferred_paths_make_no_host_sync_on_quiet_steps(guard: Any, optimizer: str) -> None:
    from tests.callbacks.grad_helpers import Enter, Exit, SyncCounter

    mode = SyncCounter()
    per_step: dict[int, int] = {}
    model = Faulty(optimizer=optimizer)
    t = trainer(max_steps=STEPS, log_every_n_steps=4, callbacks=[Enter(mode), guard(), Exit(mode, per_step)])
    t.fit(model, faulty_loader())
    quiet = [s for s in per_step if (s + 1) % 4 != 0]
    assert len(quiet) == 6 and all(per_step[s] == 0 for s in quiet), per_step
    # positive control: the synchronous path (skip with a non-fused optimizer) reads once per step
    mode, per_step = SyncCounter(), {}
    t = trainer(max_steps=4, callbacks=[Enter(mode), NaNGuard(action="skip"), Exit(mode, per_step)])
    t.fit(Faulty(), faulty_loader())
    assert all(count >= 1 for count in per_step.values()), per_step


def test_skip_with_a_fused_optimizer_withholds_the_update_on_the_device() -> None:
    guard = NaNGuard(action="skip", check_spikes=False)
    model = Faulty("gradient", (AT,), optimizer="adamw_fused")
    watch = StepWatch()
    t = trainer(max_steps=STEPS, log_every_n_steps=50, callbacks=[watch, guard])
    t.fit(model, faulty_loader("gradient", (AT,)))
    assert t.state.finished and all_finite(model)
    assert same_state(watch.before[AT], watch.after[AT])  # parameters and AdamW state bit-identical
    assert not same_state(watch.before[AT + 1], watch.after[AT + 1])
    assert adam_steps(t.optimizers[0]) == STEPS - 1
    assert not hasattr(t.optimizers[0], "found_inf")  # removed after each step
    finding = find(guard.findings, "non_finite_gradients")
    assert finding is not None and finding.step == AT and finding.severity == "warning"
    assert guard.skipped_steps == 1 and "skipped" in finding.message


@pytest.mark.parametrize("inject", ["input", "forward", "loss", "gradient", "parameter"])
def test_raise_names_step_phase_and_module(inject: str) -> None:
    guard = NaNGuard(action="raise", check_spikes=False)
    at = AT + 1 if inject == "parameter" else AT
    _, phase, module, tensor = EXPECTED[inject]
    with pytest.raises(NonFiniteError) as info:
        fit(inject, guard)
    message = str(info.value)
    assert f"step {at}" in message and tensor in message and "training stopped" in message
    # the phase in words: "input batch", "forward pass", "loss computation", "backward pass", "optimizer update"
    assert phase in message
    assert (module or tensor) in message
    check_finding(guard, inject)


def test_the_report_is_written_when_the_guard_raises(tmp_path) -> None:
    guard = NaNGuard(action="raise", check_spikes=False)
    with pytest.raises(NonFiniteError):
        fit("forward", guard, default_root_dir=str(tmp_path))
    text = (tmp_path / "diagnosis.json").read_text()
    assert '"status": "failed"' in text and "net.2" in text


# -- the replay ----------------------------------------------------------------------------------------------------
class Probe(Callback):
    """Records, around NaNGuard's hook, what the replay must not change."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    def _capture(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        return {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state()[1].copy(),
            "buffers": {k: v.clone() for k, v in pl_module.named_buffers()},
            "grads": {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None},
            "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
            "metrics": dict(trainer.callback_metrics),
        }

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if trainer.global_step == AT:
            self.seen["before"] = self._capture(trainer, pl_module)


class ProbeAfter(Probe):
    def __init__(self, first: Probe) -> None:
        super().__init__()
        self.first = first

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if trainer.global_step == AT:
            self.first.seen["after"] = self._capture(trainer, pl_module)


class WithNorm(Faulty):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.net.insert(1, torch.nn.BatchNorm1d(16))
        self.net.insert(3, torch.nn.Dropout(0.2))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.net[4].step = self.global_step
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss


def test_replay_leaves_no_trace() -> None:
    probe = Probe()
    # a spike policy that acts keeps warn on the synchronous path, where the step is replayed before the update
    guard = NaNGuard(action="warn", spike_action="skip")
    after = ProbeAfter(probe)
    model = WithNorm("", ())
    model.net[4].where, model.net[4].fire = "gradient", {AT}
    t = trainer(max_steps=AT + 1, callbacks=[probe, guard, after])
    with pytest.warns(LightningDiagWarning):
        t.fit(model, faulty_loader())
    before, later = probe.seen["before"], probe.seen["after"]
    assert torch.equal(before["torch"], later["torch"]) and before["python"] == later["python"]
    assert np.array_equal(before["numpy"], later["numpy"])
    assert same_state(before["buffers"], later["buffers"])  # BatchNorm running stats untouched
    assert before["grads"].keys() == later["grads"].keys()
    assert all(
        torch.equal(g.nan_to_num(), later["grads"][k].nan_to_num()) for k, g in before["grads"].items()
    )
    assert same_state(before["optimizer"]["state"], later["optimizer"]["state"])
    assert before["metrics"].keys() == later["metrics"].keys()
    finding = find(guard.findings, "non_finite_gradients")
    assert finding.evidence["module"] == "net.4" and finding.evidence["module_type"] == "Poison"


def test_no_localisation_on_good_steps() -> None:
    calls = []

    class Counting(Faulty):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            calls.append(self.global_step)
            return super().training_step(batch, batch_idx)

    t = trainer(max_steps=STEPS, callbacks=[NaNGuard(check_spikes=False)])
    t.fit(Counting("forward", {AT}), faulty_loader())
    assert sorted(calls) == sorted([*range(STEPS), AT])  # one replay, of the bad step only


def test_gradient_accumulation_replays_the_window() -> None:
    guard = NaNGuard(action="skip", check_spikes=False)
    model = Faulty("input", ())
    data = faulty_loader("input", (5,))  # sample 40 -> batch 5 -> optimizer step 2 with 2 batches per step
    t = trainer(max_steps=4, accumulate_grad_batches=2, callbacks=[guard])
    t.fit(model, data)
    finding = find(guard.findings, "non_finite_input")
    assert finding.step == 2 and finding.evidence["batch_idx"] == "4,5"
    assert guard.skipped_steps == 1 and adam_steps(t.optimizers[0]) == 3


# -- spikes ----------------------------------------------------------------------------------------------------
class Spiky(Faulty):
    """A loss multiplied by 50 at the steps in ``at`` (a bad batch), finite everywhere."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * 50.0 if self.global_step in self.at else loss


@pytest.mark.parametrize("precision", PRECISIONS)
def test_loss_spike_is_flagged_and_skipped(precision: str) -> None:
    guard = NaNGuard(spike_action="skip", spike_warmup_steps=5, spike_window=20)
    t = trainer(max_steps=14, callbacks=[guard], **precision_kwargs(precision))
    t.fit(Spiky("", {10}, lr=1e-3), faulty_loader(n=256))
    spike = find(guard.findings, "loss_spike")
    assert spike is not None and spike.step == 10, [f.message for f in guard.findings]
    assert guard.skipped_steps == 1
    assert not [f for f in guard.findings if f.code.startswith("non_finite")]


def test_healthy_run_has_no_findings() -> None:
    guard = NaNGuard(spike_warmup_steps=5)
    t = trainer(max_epochs=6, callbacks=[guard])
    t.fit(Faulty(lr=1e-3), faulty_loader(n=256))
    assert guard.findings == [] and guard.skipped_steps == 0


# -- state -----------------------------------------------------------------------------------------------------
def test_resume_after_a_rollback_restores_counters_and_snapshot_schedule(tmp_path) -> None:
    def run(ckpt_path: str | None, max_steps: int) -> NaNGuard:
        guard = NaNGuard(action="rollback", snapshot_every_n_steps=3, check_spikes=False)
        save = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1, filename="{step}")
        t = trainer(max_steps=max_steps, callbacks=[guard, save], enable_checkpointing=True)
        t.fit(Faulty("forward", {4}), faulty_loader(), ckpt_path=ckpt_path)
        return guard

    straight = run(None, 12)
    resumed = run(str(tmp_path / "step=6.ckpt"), 12)
    saved = torch.load(tmp_path / "step=6.ckpt", weights_only=True)["callbacks"][straight.state_key]
    assert saved["rollbacks"] == 1 and saved["skipped_steps"] == 1 and saved["good_since_snapshot"] == 1
    assert resumed.state_dict()["good_since_snapshot"] == straight.state_dict()["good_since_snapshot"]
    assert (
        resumed.rollbacks == straight.rollbacks == 1
        and resumed.policy.snapshot_step == straight.policy.snapshot_step
    )


# -- arguments -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"action": "ignore"}, "`action` must be one of"),
        ({"spike_action": "stop"}, "`spike_action` must be one of"),
        ({"spike_window": 0}, "`spike_window` must be >= 1, got 0"),
        ({"spike_threshold": -1.0}, "`spike_threshold` must be > 0"),
        ({"spike_warmup_steps": -3}, "`spike_warmup_steps` must be >= 0, got -3"),
        ({"check_params_every_n_steps": -1}, "`check_params_every_n_steps` must be >= 0"),
        ({"max_consecutive_skips": 0}, "`max_consecutive_skips` must be >= 1, got 0"),
        ({"action": "rollback", "snapshot_every_n_steps": 0}, "`snapshot_every_n_steps` must be >= 1, got 0"),
        ({"max_rollbacks": 0}, "`max_rollbacks` must be >= 1"),
        ({"lr_backoff": 0.0}, r"`lr_backoff` must be in \(0, 1\]"),
        ({"lr_backoff": 2.0}, r"`lr_backoff` must be in \(0, 1\]"),
        ({"spike_ratio": 0.5}, "`spike_ratio` must be >= 1"),
        ({"escalate_to": "skip"}, "`escalate_to` must be one of"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NaNGuard(**kwargs)


def test_a_run_resumed_between_a_rollback_and_the_next_snapshot_is_exact(tmp_path) -> None:
    """Snapshot at step 5, a rollback at step 6, a checkpoint at the end of epoch 0 (step 8: one good step since
    the rollback, the next snapshot not due yet), a second fault at step 10: the resumed run must roll back to step
    5's weights again and hold the same schedule steps."""

    def run(ckpt_path: str | None) -> tuple[NaNGuard, WarmupCosine, Faulty]:
        pl.seed_everything(0, verbose=False)
        guard = NaNGuard(action="rollback", snapshot_every_n_steps=5, check_spikes=False)
        schedule = WarmupCosine(warmup_steps=3, total_steps=14)
        save = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1, filename="{step}")
        model = Faulty("forward", (6, 10))
        t = trainer(max_steps=14, callbacks=[guard, schedule, save], enable_checkpointing=True)
        t.fit(model, faulty_loader(), ckpt_path=ckpt_path)
        return guard, schedule, model

    guard, schedule, model = run(None)
    saved = torch.load(tmp_path / "step=8.ckpt", weights_only=True)["callbacks"][guard.state_key]
    assert saved["snapshot"]["step"] == 5 and saved["advanced"] == 1 and saved["rollbacks"] == 1
    resumed_guard, resumed_schedule, resumed = run(str(tmp_path / "step=8.ckpt"))
    assert guard.rollbacks == resumed_guard.rollbacks == 2
    assert resumed_schedule.held_steps == schedule.held_steps
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


class RaisesOnNaN(Faulty):
    """A forward that raises on non-finite input (as index computations and input validations do)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if not torch.isfinite(batch[0]).all():
            raise RuntimeError("index -9223372036854775808 is out of bounds")
        return super().training_step(batch, batch_idx)


def test_a_nan_batch_that_makes_the_forward_raise_is_the_primary_finding(tmp_path) -> None:
    guard = NaNGuard()
    t = trainer(max_steps=STEPS, callbacks=[guard], default_root_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="out of bounds"):
        t.fit(RaisesOnNaN(), faulty_loader("input", (AT,)))
    (finding,) = [f for f in guard.findings if f.code == "non_finite_input"]
    assert finding.severity == "error" and finding.step == AT
    assert (
        finding.evidence["tensor"].startswith("batch[0] (sample 0)")
        and "out of bounds" in finding.evidence["error"]
    )
    from lightning_diag import load_report

    report = load_report(tmp_path)
    assert (
        report.status == "failed" and report.primary is not None and report.primary.code == "non_finite_input"
    )
