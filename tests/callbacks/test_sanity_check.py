"""SanityCheck on real Trainers: each broken model caught with its code, the healthy one clean, nothing touched."""

from __future__ import annotations

import copy
import random
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_diag import SanityCheck, SanityCheckError
from tests.callbacks.sanity_helpers import BROKEN, Classifier, loader
from tests.helpers import trainer

OVERFIT = {"overfit_batch_steps": 100, "overfit_lr": 1e-2}


def run(model_kwargs: dict[str, Any], loader_kwargs: dict[str, Any], **kwargs: Any) -> SanityCheck:
    check = SanityCheck(fail_on="never", **{**OVERFIT, **kwargs})
    trainer(max_steps=1, callbacks=[check]).fit(Classifier(**model_kwargs), loader(**loader_kwargs))
    return check


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_each_broken_model_is_caught(name: str) -> None:
    model_kwargs, loader_kwargs, code, severity = BROKEN[name]
    check = run(model_kwargs, loader_kwargs)
    found = {(f.code, f.severity) for f in check.findings}
    assert (code, severity) in found, [f.message for f in check.findings]


@pytest.mark.parametrize("batchnorm", [False, True])
def test_healthy_model_is_clean(batchnorm: bool) -> None:
    check = run({"batchnorm": batchnorm}, {})
    assert [f for f in check.findings if f.severity != "info"] == []


def test_evidence_names_the_culprits() -> None:
    unused = run({"bug": "unused_layer"}, {})
    missing = next(f for f in unused.findings if f.code == "missing_gradients")
    assert missing.evidence["parameters"] == "unused.weight,unused.bias"
    mixing = next(f for f in run({"bug": "batch_mixing"}, {}).findings if f.code == "batch_dependence")
    assert mixing.evidence["dependent_samples"] > 0 and "view/reshape" in mixing.advice[0]
    init = next(f for f in run({"bug": "overconfident_init"}, {}).findings if f.code == "loss_at_init")
    assert init.evidence["num_classes"] == 4 and init.evidence["loss"] > 1.5 * np.log(4)
    scale = next(f for f in run({}, {"scale": 1000.0}).findings if f.code == "input_scale")
    assert scale.evidence["layer"] == "net.0" and scale.evidence["rms"] > 500
    assert scale.evidence["harm"].startswith("none measured")  # one step: no consequence to measure
    nan = next(f for f in run({}, {"nan": True}).findings if f.code == "non_finite_input")
    assert nan.evidence["tensor"] == "batch[0] (sample 3)"


class Witness(Callback):
    """Copies of what the check must not touch, taken right before and right after SanityCheck's hook."""

    def __init__(self) -> None:
        self.states: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.states.append(
                {
                    "weights": {k: v.clone() for k, v in pl_module.state_dict().items()},
                    "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
                    "torch": torch.get_rng_state(),
                    "python": random.getstate(),
                    "numpy": np.random.get_state()[1].copy(),
                    "training": [m.training for m in pl_module.modules()],
                }
            )


def test_a_single_class_batch_is_a_fact_without_shuffling_and_a_symptom_with_it() -> None:
    ordered = next(f for f in run({}, {"labels": "zeros"}).findings if f.code == "label_distribution")
    assert ordered.severity == "warning" and "does not shuffle" in ordered.message
    drawn = next(
        f for f in run({}, {"labels": "zeros", "shuffle": True}).findings if f.code == "label_distribution"
    )
    assert drawn.severity == "info" and drawn.evidence["harm"].startswith("none measured")


def test_checks_leave_weights_optimizer_and_rng_untouched() -> None:
    before, after = Witness(), Witness()
    check = SanityCheck(fail_on="never", **OVERFIT)
    t = trainer(max_steps=1, callbacks=[before, check, after])
    t.fit(Classifier(batchnorm=True), loader())
    a, b = before.states[0], after.states[0]
    assert all(
        torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"]
    )  # BatchNorm stats included
    assert a["optimizer"] == b["optimizer"]
    assert torch.equal(a["torch"], b["torch"]) and a["python"] == b["python"]
    assert np.array_equal(a["numpy"], b["numpy"]) and a["training"] == b["training"]
    assert check.done


def test_fail_on_error_stops_before_the_first_update() -> None:
    model = Classifier(bug="detached")  # nothing an optimizer steps gets a gradient: nothing can learn
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    t = trainer(max_steps=3, callbacks=[SanityCheck()])
    with pytest.raises(SanityCheckError, match=r"missing_gradients: .*nothing can learn"):
        t.fit(model, loader())
    assert t.global_step == 0
    assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())


def test_an_unused_layer_in_a_model_that_learns_never_stops_the_run() -> None:
    """An auxiliary encoder used only under another setting: named, with advice, and training goes on."""
    check = SanityCheck()  # fail_on="error", the default
    t = trainer(max_steps=3, callbacks=[check])
    t.fit(Classifier(bug="unused_layer"), loader())
    assert t.global_step == 3
    (missing,) = [f for f in check.findings if f.code == "missing_gradients"]
    assert missing.severity == "info" and "unused.weight" in missing.message
    assert "so they are unused" in missing.message and "freeze them" in missing.advice[0]


def test_fail_on_warning_and_never() -> None:
    with pytest.raises(SanityCheckError, match="batch_dependence"):
        trainer(max_steps=1, callbacks=[SanityCheck(fail_on="warning")]).fit(
            Classifier(bug="batch_mixing"), loader()
        )
    t = trainer(max_steps=2, callbacks=[SanityCheck(fail_on="error")])
    t.fit(Classifier(bug="batch_mixing"), loader())  # a warning does not stop fail_on="error"
    assert t.global_step == 2
    # a symptom that may be by design (an overconfident init) stops nothing, even with fail_on="warning"
    t = trainer(max_steps=2, callbacks=[SanityCheck(fail_on="warning")])
    t.fit(Classifier(bug="overconfident_init"), loader())
    assert t.global_step == 2


def test_data_checks_cover_num_batches() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    x, y = torch.randn(48, 16), torch.randint(0, 4, (48,))
    x[40, 0] = float("nan")  # in the third batch only
    data = DataLoader(TensorDataset(x, y), batch_size=16)
    one = SanityCheck(fail_on="never", num_batches=1)
    trainer(max_steps=1, callbacks=[one]).fit(Classifier(), data)
    assert not [f for f in one.findings if f.code == "non_finite_input"]
    three = SanityCheck(fail_on="never", num_batches=3, check_gradients=False)
    trainer(max_steps=3, callbacks=[three]).fit(Classifier(), data)
    assert [f for f in three.findings if f.code == "non_finite_input"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fail_on": "always"}, "`fail_on` must be one of"),
        ({"num_batches": 0}, "`num_batches` must be >= 1, got 0"),
        ({"overfit_batch_steps": -1}, "`overfit_batch_steps` must be >= 0"),
        ({"min_drop": 1.0}, r"`min_drop` must be in \(0, 1\)"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SanityCheck(**kwargs)
