"""WarmupCosine with real Trainers: the rates used equal the pure function, per group, with accumulation, on resume."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from lightning_diag import WarmupCosine
from lightning_diag.core.schedules import warmup_cosine
from tests.helpers import Regression, Stream, loader, trainer
from tests.readers import tb_scalars


class LrRecorder(Callback):
    """The rate of every group at the moment the optimizer steps, by global step."""

    def __init__(self) -> None:
        self.lrs: dict[int, list[float]] = {}

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.lrs[trainer.global_step] = [g["lr"] for g in optimizer.param_groups]


def expected(
    step: int, base: float, total: int, warmup: int, start: float | None = None, floor: float = 0.0
) -> float:
    start = base / (warmup + 1) if start is None else start
    return warmup_cosine(
        step, base_lr=base, total_steps=total, warmup_steps=warmup, warmup_start_lr=start, min_lr=floor
    )


def test_rates_follow_the_schedule_and_land_in_tensorboard(tmp_path) -> None:
    rec = LrRecorder()
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    t = trainer(
        max_epochs=3, logger=logger, log_every_n_steps=1, callbacks=[WarmupCosine(warmup_steps=4), rec]
    )
    t.fit(Regression(lr=0.2), loader(n=64, batch_size=8))
    total = 3 * 8
    assert sorted(rec.lrs) == list(range(total))
    for step, (lr,) in rec.lrs.items():
        assert lr == pytest.approx(expected(step, 0.2, total, 4)), step
    assert (
        rec.lrs[0][0] == pytest.approx(0.2 / 5) and rec.lrs[0][0] > 0
    )  # never 0 on the first step by default
    assert rec.lrs[4][0] == pytest.approx(0.2)  # the peak right after warmup
    logged = tb_scalars(logger.log_dir)["diag/lr/group0"]
    assert [s for s, _ in logged] == list(range(total))
    assert all(v == pytest.approx(rec.lrs[s][0], rel=1e-6) for s, v in logged)


def test_every_group_scales_from_its_own_base() -> None:
    rec = LrRecorder()
    cb = WarmupCosine(warmup_ratio=0.25, min_lr_ratio=0.1, warmup_start_factor=0.0)
    trainer(max_epochs=2, callbacks=[cb, rec]).fit(Regression(lr=0.1, optimizer="groups"), loader(n=64))
    total, warmup = 16, 4
    assert cb.resolved_warmup_steps == warmup and cb.base_lrs == [[0.1, pytest.approx(0.01)]]
    for step, lrs in rec.lrs.items():
        for lr, base in zip(lrs, (0.1, 0.01), strict=False):
            assert lr == pytest.approx(expected(step, base, total, warmup, start=0.0, floor=0.1 * base)), step


def test_gradient_accumulation_counts_optimizer_steps() -> None:
    rec = LrRecorder()
    cb = WarmupCosine(warmup_steps=2)
    # 10 batches per epoch, 3 micro-batches per step -> ceil(10/3) = 4 optimizer steps per epoch
    trainer(max_epochs=2, accumulate_grad_batches=3, callbacks=[cb, rec]).fit(Regression(), loader(n=80))
    assert cb.resolved_total_steps == 8
    assert sorted(rec.lrs) == list(range(8))
    for step, (lr,) in rec.lrs.items():
        assert lr == pytest.approx(expected(step, 0.05, 8, 2)), step


def test_epoch_interval() -> None:
    seen: dict[tuple[int, int], float] = {}

    class ByEpoch(Callback):
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            seen[(trainer.current_epoch, trainer.global_step)] = optimizer.param_groups[0]["lr"]

    trainer(max_epochs=4, callbacks=[WarmupCosine(warmup_steps=1, interval="epoch"), ByEpoch()]).fit(
        Regression(lr=0.1), loader(n=32)
    )
    for (epoch, _), lr in seen.items():
        assert lr == pytest.approx(expected(epoch, 0.1, 4, 1)), epoch


def test_resume_reproduces_the_uninterrupted_sequence(tmp_path) -> None:
    schedule = {"warmup_steps": 5, "num_cycles": 2, "min_lr": 1e-4}
    straight = LrRecorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=11, save_top_k=-1, filename="{step}")
    trainer(
        max_epochs=3, enable_checkpointing=True, callbacks=[WarmupCosine(**schedule), straight, ckpt]
    ).fit(Regression(optimizer="adamw"), loader(n=64))
    resumed = LrRecorder()
    path = str(tmp_path / "step=11.ckpt")
    assert torch.load(path, weights_only=True)["callbacks"]  # our state is weights_only-loadable
    trainer(max_epochs=3, callbacks=[WarmupCosine(**schedule), resumed]).fit(
        Regression(optimizer="adamw"), loader(n=64), ckpt_path=path
    )
    assert sorted(resumed.lrs) == list(range(11, 24))
    for step, lrs in resumed.lrs.items():
        assert lrs == straight.lrs[step], step  # exactly equal, not approximately

    # The saved schedule length wins over a longer resumed run: steps 11..23 unchanged, then the floor.
    longer = LrRecorder()
    trainer(max_epochs=4, callbacks=[WarmupCosine(**schedule), longer]).fit(
        Regression(optimizer="adamw"), loader(n=64), ckpt_path=path
    )
    assert all(longer.lrs[step] == straight.lrs[step] for step in range(11, 24))
    assert all(longer.lrs[step] == [pytest.approx(1e-4)] for step in range(24, 32))


def test_refuses_a_scheduler_from_configure_optimizers() -> None:
    class WithScheduler(Regression):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 2)}

    with pytest.raises(
        ValueError, match=r"found a learning-rate scheduler configured in `configure_optimizers` \(StepLR\)"
    ):
        trainer(max_epochs=1, callbacks=[WarmupCosine()]).fit(WithScheduler(), loader())


def test_unknown_length_asks_for_total_steps() -> None:
    with pytest.raises(
        ValueError, match=r"Pass `WarmupCosine\(total_steps=...\)` or set `Trainer\(max_steps=...\)`"
    ):
        trainer(max_epochs=1, callbacks=[WarmupCosine()]).fit(
            Regression(), DataLoader(Stream(), batch_size=4)
        )
    rec = LrRecorder()
    trainer(max_steps=6, callbacks=[WarmupCosine(total_steps=6, warmup_steps=2), rec]).fit(
        Regression(), DataLoader(Stream(), batch_size=4)
    )
    assert rec.lrs[5][0] == pytest.approx(expected(5, 0.05, 6, 2))


def test_warmup_longer_than_the_run_is_an_error() -> None:
    with pytest.raises(
        ValueError, match=r"the warmup \(100 steps\) must be shorter than the schedule \(8 steps\)"
    ):
        trainer(max_epochs=1, callbacks=[WarmupCosine(warmup_steps=100)]).fit(Regression(), loader(n=64))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup_steps": -3}, r"^`warmup_steps` must be >= 0, got -3\.$"),
        ({"warmup_ratio": 1.0}, r"`warmup_ratio` must be in \[0, 1\), got 1\.0"),
        ({"warmup_steps": 2, "warmup_ratio": 0.1}, r"Pass at most one of `warmup_steps`, `warmup_ratio`"),
        ({"min_lr": 0.1, "min_lr_ratio": 0.1}, r"Pass at most one of `min_lr`, `min_lr_ratio`"),
        ({"warmup_start_lr": 0.0, "warmup_start_factor": 0.1}, r"Pass at most one of `warmup_start_lr`"),
        ({"total_steps": 0}, r"`total_steps` must be >= 1, got 0"),
        ({"total_steps": 5, "warmup_steps": 5}, r"`warmup_steps` must be < `total_steps` \(5\), got 5"),
        ({"min_lr": -1.0}, r"`min_lr` must be >= 0, got -1\.0"),
        ({"min_lr_ratio": 1.5}, r"`min_lr_ratio` must be in \[0, 1\], got 1\.5"),
        ({"num_cycles": 0}, r"`num_cycles` must be >= 1, got 0"),
        ({"cycle_mul": 0}, r"`cycle_mul` must be > 0, got 0"),
        ({"interval": "batch"}, r"`interval` must be one of 'step', 'epoch', got 'batch'"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        WarmupCosine(**kwargs)


def test_hf_ramp_from_zero_when_asked() -> None:
    rec = LrRecorder()
    trainer(max_epochs=1, callbacks=[WarmupCosine(warmup_steps=4, warmup_start_lr=0.0), rec]).fit(
        Regression(lr=0.1), loader(n=64)
    )
    assert rec.lrs[0] == [0.0] and rec.lrs[2][0] == pytest.approx(0.05)
    assert not math.isnan(rec.lrs[7][0])
