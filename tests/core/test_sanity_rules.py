"""SanityCheck's rules without a Trainer: what is a fact and what is a symptom (issue 23)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_diag.core import sanity


@pytest.mark.parametrize(
    ("ratio", "severity", "certain"),
    [(1.0, None, False), (3.0, "warning", False), (150.0, "warning", False), (2000.0, "warning", True)],
)
def test_loss_at_init_is_a_fact_only_when_absurd(ratio: float, severity: str | None, certain: bool) -> None:
    found = sanity.check_loss_at_init(ratio * math.log(4), 4)
    if severity is None:
        assert found == []
        return
    (verdict,) = found
    assert verdict.severity == severity and bool(verdict.evidence.get("certain")) is certain
    assert ("no initialisation meant to train" in verdict.message) is certain


class _Net(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head, self.spare = nn.Linear(6, 6), nn.Linear(6, 3), nn.Linear(6, 6)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "detached":
            return self.head(self.body(x).detach())  # the body's values reach the loss, its gradient does not
        if self.how == "dropout_detached":
            return self.head(nn.functional.dropout(self.body(x), 0.5).detach())
        return self.head(self.body(x))  # `spare` is never called


X, Y = torch.randn(8, 6), torch.randint(0, 3, (8,))


@pytest.mark.parametrize(
    ("how", "severity", "names"),
    [
        ("unused", "info", "spare.weight, spare.bias"),
        ("detached", "warning", "body.weight, body.bias"),
        ("dropout_detached", "warning", "body.weight, body.bias"),  # same random state for both forwards
    ],
)
def test_missing_gradients_warns_only_for_a_cut_graph(how: str, severity: str, names: str) -> None:
    net = _Net(how)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    found = [v for v in sanity.check_gradients(net, lambda: nn.functional.cross_entropy(net(X), Y)) if v.code]
    missing = [v for v in found if v.code == "missing_gradients"]
    assert len(missing) == 1 and missing[0].severity == severity and names in missing[0].message
    assert missing[0].evidence["cut"] == int(severity == "warning")
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the perturbation is undone


def test_missing_gradients_is_an_error_when_ddp_would_stop() -> None:
    net = _Net("unused")
    (verdict,) = sanity.check_gradients(
        net, lambda: nn.functional.cross_entropy(net(X), Y), unused_fatal=True
    )
    assert verdict.severity == "error" and "find_unused_parameters" in verdict.message


def test_chance_loss_is_read_from_the_observed_cross_entropy() -> None:
    net = nn.Sequential(nn.Linear(6, 5))
    facts: dict[str, float] = {}
    sanity.run_checks(
        net,
        [(X, Y)],
        lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
        data=False,
        gradients=False,
        batch_independence=False,
        activation_scale=False,
        facts=facts,
    )
    assert facts["chance_loss"] == pytest.approx(math.log(5))


class _Binary(nn.Module):
    def __init__(self, squash: bool, bias: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net, self.squash = nn.Linear(6, 1), squash
        with torch.no_grad():
            self.net.weight.mul_(0.01)
            self.net.bias.fill_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return torch.sigmoid(out).squeeze(-1) if self.squash else out.squeeze(-1)


@pytest.mark.parametrize(
    ("squash", "bias", "found"), [(True, 0.0, True), (False, 0.5, False), (False, 0.0, False)]
)
def test_sigmoid_before_bce_with_logits_is_seen_not_guessed(squash: bool, bias: float, found: bool) -> None:
    """Logits that all fall in [0, 1] (a small init with a positive bias) are not probabilities."""
    net, target = _Binary(squash, bias), (Y > 0).float()
    view = sanity.observe_step(net, lambda: nn.functional.binary_cross_entropy_with_logits(net(X), target))
    (call,) = view.losses
    assert bool((call.input >= 0).all() and (call.input <= 1).all()) is (squash or bias > 0)
    verdicts = sanity.check_sigmoid_as_logits(call)
    assert bool(verdicts) is found
    if found:
        assert verdicts[0].evidence["certain"] == 1 and "sigmoid is applied twice" in verdicts[0].message


def test_chance_loss_is_a_uniform_guess() -> None:
    def call(classes: int, target: torch.Tensor) -> sanity.LossCall:
        return sanity.LossCall("cross_entropy", torch.zeros(len(target), classes), target, torch.tensor(0.0))

    skewed = torch.tensor(
        [0] * 60 + [1] * 10
    )  # not the targets' entropy: a language model's unigram plateau is fine
    assert sanity.chance_loss([call(4, torch.arange(4).repeat(10))]) == pytest.approx(math.log(4))
    assert sanity.chance_loss([call(2, skewed)]) == pytest.approx(math.log(2))
    mse = sanity.LossCall("mse_loss", torch.zeros(8, 4), torch.zeros(8, 4), torch.tensor(0.0))
    assert sanity.chance_loss([mse]) is None
