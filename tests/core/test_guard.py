"""core.guard: NaNGuard's escalation policy as decision tables, Trainer-free."""

from __future__ import annotations

import pytest
import torch

from lightning_diag.core.guard import (
    GuardPolicy,
    Origin,
    StepFlags,
    StepWindow,
    back_off_lr,
    bad_step,
    never_rolls_back,
    never_skips,
    no_rollback_text,
    no_skip_text,
)

GOOD = StepFlags()
NAN = StepFlags(loss=True)
BAD_PARAMS = StepFlags(params=True)
SPIKE = StepFlags(grad_spike=True)


def run(policy: GuardPolicy, flags: list[StepFlags]) -> list[str | None]:
    """The action taken at each step (the policy's snapshots are 'taken' as the callback would)."""
    return [policy.update(f, step).action for step, f in enumerate(flags)]


@pytest.mark.parametrize(
    ("kwargs", "flags", "expected"),
    [
        # skip, escalating after max_consecutive_skips to escalate_to (raise)
        ({"action": "skip", "max_consecutive_skips": 2}, [NAN, NAN, NAN], ["skip", "skip", "raise"]),
        # a good step resets the run of skips
        (
            {"action": "skip", "max_consecutive_skips": 2},
            [NAN, NAN, GOOD, NAN, NAN],
            ["skip", "skip", None, "skip", "skip"],
        ),
        # non-finite parameters cannot be cured by a skip
        ({"action": "skip"}, [BAD_PARAMS], ["raise"]),
        # rollback without a snapshot yet raises
        ({"action": "rollback"}, [NAN], ["raise"]),
        # warn never escalates
        ({"action": "warn", "max_consecutive_skips": 1}, [NAN, NAN, NAN], ["warn", "warn", "warn"]),
        # spikes follow spike_action, not action
        ({"action": "raise", "spike_action": "skip"}, [SPIKE, GOOD, NAN], ["skip", None, "raise"]),
    ],
)
def test_decision_table(kwargs: dict, flags: list[StepFlags], expected: list[str | None]) -> None:
    assert run(GuardPolicy(**kwargs), flags) == expected


def test_snapshots_every_n_good_steps_and_rollbacks_hold_the_schedule_back_to_it() -> None:
    policy = GuardPolicy(action="rollback", snapshot_every_n_steps=2, max_rollbacks=2)
    policy.snapshot_taken(0, keep_schedule=True)  # at train start
    due = [policy.update(GOOD, step).snapshot_due for step in range(5)]
    assert due == [False, False, True, False, True]  # after 2 good steps, then every 2
    assert policy.snapshot_step == 4 and policy.good_since_snapshot == 1
    decision = policy.update(NAN, 5)
    # back to the snapshot of step 4: the step that advanced since (4) and this one
    assert decision.action == "rollback" and decision.hold_steps == 2 and decision.withholds_update
    assert policy.rollbacks == 1 and policy.skipped_steps == 1 and policy.good_since_snapshot == 0
    assert policy.update(NAN, 6).action == "rollback"
    third = policy.update(NAN, 7)
    assert third.action == "raise" and third.escalated  # max_rollbacks used


def test_skip_escalates_to_rollback_when_asked() -> None:
    policy = GuardPolicy(action="skip", escalate_to="rollback", max_consecutive_skips=1)
    assert policy.rollback_possible
    policy.snapshot_taken(0)
    first, second = policy.update(NAN, 0), policy.update(NAN, 1)
    assert (first.action, first.hold_steps) == ("skip", 1)
    assert second.action == "rollback" and second.escalated and second.code == "non_finite_loss"


def test_codes_from_flags() -> None:
    assert StepFlags(input=True, loss=True).code == "non_finite_input"
    assert StepFlags(params=True, loss=True).code == "non_finite_parameters"
    assert StepFlags(norm_overflow=True).code == "exploding_gradients"
    assert StepFlags(loss_spike=True).code == "loss_spike"
    assert GOOD.code is None and not GOOD.non_finite and not GOOD.spike


def test_state_round_trip_makes_the_same_decisions() -> None:
    flags = [GOOD, GOOD, NAN, GOOD, NAN, NAN, NAN]
    straight = GuardPolicy(action="skip", max_consecutive_skips=2)
    expected = run(straight, flags)
    first = GuardPolicy(action="skip", max_consecutive_skips=2)
    head = [first.update(f, s).action for s, f in enumerate(flags[:5])]
    resumed = GuardPolicy(action="skip", max_consecutive_skips=2)
    resumed.load_state_dict(first.state_dict())
    tail = [resumed.update(f, s + 5).action for s, f in enumerate(flags[5:])]
    assert head + tail == expected and expected[-1] == "raise"
    resumed.load_state_dict({})  # missing keys are tolerated
    assert resumed.consecutive_skips == 2


def test_back_off_lr_scales_groups_and_schedulers() -> None:
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=1.0)
    back_off_lr([optimizer], [scheduler], 0.5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.05)
    assert scheduler.base_lrs == [pytest.approx(0.05)]


def _given(**kwargs: object) -> dict[str, object]:
    """NaNGuard's arguments as ``check_unused`` sees them (its defaults, then ``kwargs``)."""
    return {"action": "skip", "spike_action": "warn", "check_spikes": True, "escalate_to": "raise", **kwargs}


@pytest.mark.parametrize(
    ("given", "skips", "rolls_back", "skip_text", "rollback_text"),
    [
        (_given(), True, False, "", "`action='skip'` and `spike_action='warn'` and `escalate_to='raise'`"),
        (
            _given(action="warn"),
            False,
            False,
            "`action='warn'` and `spike_action='warn'`",
            "`action='warn'` and",
        ),
        (
            _given(action="warn", check_spikes=False),
            False,
            False,
            "`action='warn'` (nothing",
            "`action='warn'` (no",
        ),
        (
            _given(action="warn", spike_action="skip"),
            True,
            False,
            "",
            "and `escalate_to='raise'` (no rollback",
        ),
        (_given(action="warn", spike_action="skip", check_spikes=False), False, False, "", ""),
        (_given(escalate_to="rollback"), True, True, "", ""),
        (_given(action="rollback"), False, True, "", ""),
        (_given(action="raise", spike_action="rollback", check_spikes=False), False, False, "", ""),
    ],
    ids=[
        "defaults",
        "warn",
        "warn-no-spikes",
        "spike-skip",
        "spike-skip-unchecked",
        "escalate",
        "rollback",
        "x",
    ],
)
def test_which_settings_the_policies_never_read(
    given: dict, skips: bool, rolls_back: bool, skip_text: str, rollback_text: str
) -> None:
    assert never_skips(given) is not skips
    assert never_rolls_back(given) is not rolls_back
    assert no_skip_text(given).endswith("(nothing is ever skipped)") and skip_text in no_skip_text(given)
    assert no_rollback_text(given).endswith("(no rollback can happen)") and rollback_text in no_rollback_text(
        given
    )


def test_bad_step_says_why_the_policy_escalated() -> None:
    policy = GuardPolicy("skip", max_consecutive_skips=1)
    run(policy, [NAN])
    decision = policy.update(NAN, 1)
    bad = bad_step(decision, policy, (1, 0, "1"), None, deferred=False, lr_backoff=1.0)
    assert (bad.step, bad.epoch, bad.action, bad.batch_idx, bad.deferred) == (1, 0, "raise", "1", False)
    assert bad.escalation[0].startswith("1 consecutive step(s) were skipped")
    assert policy.report_series(0.5) == {"nan_guard": {"skipped_steps": 1, "rollbacks": 0, "lr_backoff": 0.5}}
    assert GuardPolicy().report_series(1.0) == {}


def test_a_deferred_step_names_the_last_non_finite_gradient_and_the_window_its_bad_input() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    norms = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    names = ["0.weight", "0.bias", "1.weight", "1.bias"]
    origin = Origin.of_deferred(model, names, norms, StepFlags(grads=True))
    assert origin.seen is not None and origin.seen.phase == "backward" and origin.seen.module == "1"
    assert Origin.of_deferred(model, names, norms, StepFlags(loss=True)).seen.phase == "loss"
    window = StepWindow()
    window.add_batch({"x": torch.ones(2, 2)}, 3, check_inputs=True)
    window.add_batch({"x": torch.tensor([[1.0, float("nan")], [0.0, 0.0]])}, 4, check_inputs=True)
    assert window.first_non_finite() == ("batch['x'] (sample 0)", "nan")
    info = window.info(2, ("a",))
    assert info == {"epoch": 2, "has_loss": False, "samples": 4, "names": ["a"], "batch_idx": "3,4"}
