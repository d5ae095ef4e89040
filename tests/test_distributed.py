"""Real 2-process DDP on CPU (gloo): decisions agree across ranks and only rank 0 writes the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name: str, *args: str, cwd) -> subprocess.CompletedProcess[str]:
    """Run tests/scripts/<name> in a fresh interpreter (Lightning's DDP launcher re-runs the script per rank)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("LOCAL_RANK", None)
    script = os.path.join(ROOT, "tests", "scripts", name)
    proc = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=200, env=env, cwd=str(cwd)
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_ddp_two_processes_decide_alike(tmp_path) -> None:
    proc = run_script("ddp_run.py", str(tmp_path), cwd=tmp_path)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    # Rank 0's plateau decides for both: rank 1's own (improving) values would never have stopped it.
    assert r0["stopped_epoch"] == r1["stopped_epoch"] == 4
    assert r0["best_epoch"] == r1["best_epoch"] == 2
    assert r0["restored_epoch"] == r1["restored_epoch"] == 2
    assert r0["global_step"] == r1["global_step"]
    assert r0["lrs"] == r1["lrs"] and len(r0["lrs"]) == r0["global_step"]
    assert r0["weights"] == r1["weights"]  # replicas identical after restoring the best weights
    expected = {
        "any": True,
        "all": False,
        "all_true": True,
        "sum": 3.0,
        "mean": 1.5,
        "max": 2.0,
        "min": 1.0,
        "input_untouched": True,
        "broadcast": "from rank 0",
    }
    assert r0["collectives"] == r1["collectives"] == expected
    # I/O on global rank 0 only
    assert (tmp_path / "root0" / "diagnosis.json").exists()
    assert not (tmp_path / "root1" / "diagnosis.json").exists()
    assert proc.stdout.count("lightning_diag: run finished") == 1


def run_grad_script(kind: str, out) -> dict[int, dict]:
    run_script("grad_dist.py", kind, str(out), cwd=out)
    ranks = {}
    for rank in (0, 1):
        path = out / f"{kind}-rank{rank}.json"
        if path.exists():
            ranks[rank] = json.loads(path.read_text())
    return ranks


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_grad_norms_and_clipping_agree_across_single_ddp_and_fsdp2(tmp_path) -> None:
    from tests.readers import csv_scalars

    logged = {}
    for kind in ("single", "ddp", "fsdp2"):
        ranks = run_grad_script(kind, tmp_path)
        assert len(ranks) == (1 if kind == "single" else 2)
        if kind == "fsdp2":
            assert ranks[0]["grad_types"] == ["DTensor"]  # really sharded
        series = csv_scalars(os.path.join(ranks[0]["log_dir"], "metrics.csv"))
        logged[kind] = series
        before = {int(k): v for k, v in ranks[0]["before"].items()}
        for step, value in series["diag/grad_norm/total"]:
            assert value == pytest.approx(before[step], rel=1e-5), (kind, step)  # global, pre-clip norm
        for step, value in series["diag/clip/pre_norm"]:
            assert value == pytest.approx(before[step], rel=1e-5), (kind, step)
        for rank in ranks.values():
            assert all(v <= 0.5 * (1 + 1e-5) for v in rank["after"].values())  # the step used clipped grads
        if kind != "single":
            assert ranks[0]["before"] == ranks[1]["before"] and ranks[0]["after"] == ranks[1]["after"]
            assert ranks[1]["log_dir"] is None  # only rank 0 logs
    for key in (
        "diag/grad_norm/total",
        "diag/grad_norm/net.0",
        "diag/grad_norm/net.4",
        "diag/param_norm/total",
    ):
        reference = dict(logged["single"][key])
        for kind in ("ddp", "fsdp2"):
            got = dict(logged[kind][key])
            assert got.keys() == reference.keys()
            for step, value in got.items():
                assert value == pytest.approx(reference[step], rel=1e-4), (kind, key, step)


def test_collectives_are_identities_on_one_process() -> None:
    import torch

    from lightning_diag._distributed import all_ranks, any_rank, broadcast, is_distributed, reduce
    from tests.helpers import trainer

    t = trainer()
    x = torch.tensor([2.0])
    assert not is_distributed(t)
    assert any_rank(t, True) and not any_rank(t, False) and all_ranks(t, True) and not all_ranks(t, False)
    assert reduce(t, x, "max") is x and broadcast(t, {"a": 1}) == {"a": 1}


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_nan_guard_ranks_agree_when_only_rank_1_sees_the_fault(kind: str, tmp_path) -> None:
    run_script("nan_dist.py", kind, str(tmp_path), cwd=tmp_path)
    r0, r1 = (json.loads((tmp_path / f"{kind}-rank{r}.json").read_text()) for r in (0, 1))
    expected = {
        # scenario: (updates applied, skipped, rollbacks, phase, module)
        "skip-input": (7, 1, 0, "input", ""),
        "rollback-forward": (6, 1, 1, "forward", "net.2"),  # snapshot before step 2, fault at step 3
        "skip-gradient": (7, 1, 0, "backward", "net.2"),
        "raise-loss": (3, 0, 0, "loss", ""),
    }
    for scenario, (updates, skipped, rollbacks, phase, module) in expected.items():
        a, b = r0[scenario], r1[scenario]
        # the same decision on both ranks, and replicas still identical and finite
        assert a["adam_steps"] == b["adam_steps"] == [updates], scenario
        assert (a["skipped"], a["rollbacks"]) == (b["skipped"], b["rollbacks"]) == (skipped, rollbacks)
        assert a["weights"] == b["weights"] and a["finite"] and b["finite"]
        assert a["step"] == b["step"]
        # rank 0 reports where rank 1's NaN began
        (finding,) = a["findings"]
        assert finding["rank"] == 1 and finding["phase"] == phase and finding["module"] == module
        assert finding["reproduced"] == 1
        if scenario.startswith("raise"):
            assert a["raised"] and a["raised"] == b["raised"] and "step 3" in a["raised"]
        else:
            assert not a["raised"] and not b["raised"]
    for scenario in expected:
        assert (tmp_path / f"{kind}-{scenario}" / "diagnosis.json").exists()


@pytest.mark.distributed
@pytest.mark.timeout(420)
@pytest.mark.parametrize("kind", ["single", "ddp", "fsdp2"])
def test_every_callback_together_decides_alike_and_resumes(kind: str, tmp_path) -> None:
    """The whole suite in one run per strategy; rank 1 alone sees a NaN batch, its own val_loss, an odd first batch."""
    run_script("matrix.py", kind, str(tmp_path), cwd=tmp_path)
    ranks = [0] if kind == "single" else [0, 1]
    runs = [json.loads((tmp_path / f"{kind}-rank{r}.json").read_text()) for r in ranks]
    r0 = runs[0]
    # rank 0's val_loss plateaus after epoch 2 (best), rank 1's keeps falling: EarlyStop follows rank 0 everywhere
    assert (r0["stopped_epoch"], r0["best_epoch"]) == (4, 2)
    assert [round(p[2], 6) for p in r0["curve"]] == [
        2.0,
        1.5,
        1.2,
        1.25,
        1.3,
    ]  # OverfitDetector: rank 0's values
    steps_per_epoch = 32 if kind == "single" else 16
    nan_steps = [str(3 + e * steps_per_epoch) for e in range(5)]
    assert [k for k, moved in r0["applied"].items() if not moved] == nan_steps  # NaNGuard skipped those steps
    assert r0["skipped"] == 5
    for other in runs[1:]:
        for key in ("global_step", "lrs", "applied", "skipped", "stopped_epoch", "best_epoch", "curve"):
            assert other[key] == r0[key], key
    # I/O on global rank 0 only: the report and its plots
    assert (tmp_path / "root0" / "diagnosis.json").exists() and (
        tmp_path / "root0" / "learning_curves.png"
    ).exists()
    assert not (tmp_path / "root1").exists() or not list((tmp_path / "root1").glob("diagnosis.json"))

    # resume from the end of epoch 1 (a distributed checkpoint directory under FSDP2): the same decisions after it
    run_script(
        "matrix.py", kind, str(tmp_path), str(tmp_path / f"ckpt-{kind}" / "epoch=1.ckpt"), cwd=tmp_path
    )
    for r in ranks:
        resumed = json.loads((tmp_path / f"{kind}-resumed-rank{r}.json").read_text())
        straight = runs[r]
        assert resumed["lrs"] and all(
            straight["lrs"][k] == pytest.approx(v, rel=1e-12) for k, v in resumed["lrs"].items()
        )
        assert all(straight["applied"][k] == v for k, v in resumed["applied"].items())
        for key in ("global_step", "skipped", "stopped_epoch", "best_epoch"):
            assert resumed[key] == straight[key], key


@pytest.mark.parametrize(
    ("make", "allowed"),
    [
        (lambda: __import__("lightning_diag").GradNormMonitor(), False),
        (lambda: __import__("lightning_diag").GradClip(max_norm=1.0), False),
        (lambda: __import__("lightning_diag").NaNGuard(action="rollback"), False),
        (lambda: __import__("lightning_diag").NaNGuard(action="skip"), True),
    ],
)
def test_fsdp1_is_refused_where_gradients_would_be_wrong(make, allowed) -> None:
    """FSDP1 needs a GPU to run; its strategy object is enough to check the refusal at setup."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    class FakeTrainer(SimpleNamespace):
        __hash__ = object.__hash__  # weakly referenced and hashable, as a Trainer is (the run context)

    callback = make()
    fake_trainer = FakeTrainer(strategy=FSDPStrategy(), gradient_clip_val=None)
    if allowed:
        callback.setup(fake_trainer, None, "fit")
    else:
        with pytest.raises(ValueError, match="does not support `FSDPStrategy` yet"):
            callback.setup(fake_trainer, None, "fit")


@pytest.mark.distributed
@pytest.mark.timeout(480)
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_activation_monitor_agrees_across_ranks(kind: str, tmp_path) -> None:
    run_script("act_dist.py", kind, str(tmp_path), cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"act-{kind}-rank{r}.json").read_text()) for r in (0, 1)]
    for result in ranks:
        (dead,) = [f for f in result["findings"] if f["code"] == "dead_units"]
        assert dead["layer"] == "net.2" and dead["dead_frac"] == 1.0
        assert dead["source"] == ("gradients" if kind == "ddp" else "on_rate")
    assert ranks[0]["findings"] == ranks[1]["findings"]
    # each rank saw its own half of the data: the same logged values mean the sums were added over ranks
    assert ranks[0]["logged"] == ranks[1]["logged"] and "diag/activations/net.0/rms" in ranks[0]["logged"]
