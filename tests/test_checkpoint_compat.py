"""Checkpoints written by lightning_diag 0.1.0 still load, and the resumed run decides as 0.1.0 did.

``tests/fixtures/deferred_v0_1_0.ckpt`` was written by 0.1.0 in the middle of a run whose NaNGuard, GradNormMonitor
and SilentBugDetector all held deferred device values (the format of each callback's own queue before the three
became one). ``deferred_v0_1_0_findings.json`` is what 0.1.0 recorded when it resumed from that file and ran to the
end: today's code must record the same findings (codes, severities, steps, counts, messages and evidence).
"""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
import torch

import lightning_diag
from tests.fixtures import deferred_checkpoint as fixture

EXPECTED = os.path.join(fixture.HERE, "deferred_v0_1_0_findings.json")


def test_the_fixture_checkpoint_holds_every_deferred_format() -> None:
    state = torch.load(fixture.CHECKPOINT, weights_only=True)["callbacks"]
    by_name = {key.split("{")[0]: value for key, value in state.items()}
    assert len(by_name["NaNGuard"]["pending"]) == fixture.SAVED_AT
    assert by_name["GradNormMonitor"]["pending_steps"] == list(range(fixture.SAVED_AT))
    assert {e["kind"] for e in by_name["SilentBugDetector"]["deferred"]} == {"repeat", "stale"}


def test_a_run_resumed_from_a_0_1_0_checkpoint_decides_as_0_1_0_did(tmp_path) -> None:
    pl.seed_everything(0, verbose=False)
    trainer = fixture.trainer(str(tmp_path), callbacks=fixture.callbacks())
    trainer.fit(fixture.Model(), fixture.loader(), ckpt_path=fixture.CHECKPOINT)
    found = [
        {
            "code": f.code,
            "severity": f.severity,
            "step": f.step,
            "source": f.source,
            "message": f.message,
            "count": f.count,
            "evidence": f.evidence,
        }
        for f in lightning_diag.collect_findings(trainer)
    ]
    with open(EXPECTED, encoding="utf-8") as handle:
        expected = json.load(handle)
    assert found == expected
