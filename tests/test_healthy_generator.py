"""A fixed sample of the healthy-run generator (``benchmarks/diagnosis/generator.py``): each run is a sensibly
tuned healthy run, so the suite at defaults must neither block it nor record a warning/error finding (issue 23,
item 7). The sample is ``fast_sample(seed=0)``: 24 configurations across every family, each estimated at a couple
of seconds; the whole 200-configuration sweep is ``python -m benchmarks.diagnosis.generator --count 200 --seed 0``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.diagnosis.generator import fast_sample, run_config

SAMPLE = fast_sample(seed=0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models: one intra-op thread is faster, and far faster on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_sample_is_large_and_varied():
    assert len(SAMPLE) >= 20
    assert len({c.family for c in SAMPLE}) >= 6
    assert len({c.optimizer for c in SAMPLE}) >= 4
    assert len({c.schedule for c in SAMPLE}) >= 5
    assert {c.precision for c in SAMPLE} == {"32", "bf16-mixed", "16-mixed"}
    assert any(c.wrapped for c in SAMPLE) and any(c.label_noise for c in SAMPLE)


@pytest.mark.parametrize("cfg", SAMPLE, ids=[c.name for c in SAMPLE])
def test_generated_healthy_run_has_no_warning_or_error(cfg):
    run = run_config(cfg)
    result = run.result
    details = "\n".join(f"  {line[:300]}" for line in result.details)
    assert result.status == "finished", f"{result.status}: {result.error}\n{details}"
    # the configuration itself must be healthy (a generator bug otherwise, not a false alarm)
    assert run.learned, f"did not learn: loss {run.initial_loss:.4g} -> {run.final_loss:.4g}"
    assert not run.overfit, f"overfit: validation losses {run.val_losses}"
    assert result.found == [], f"false alarm: {result.found} (primary {result.primary})\n{details}"
