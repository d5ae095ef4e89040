"""lightning_diag._lightning: every private Lightning/torch read, checked against the installed versions.

When a release moves one of these, this file fails first, with the name of the read.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from lightning_diag import _lightning
from tests.helpers import Regression, loader, trainer


class Probe(pl.Callback):
    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.seen.setdefault("last", []).append(_lightning.is_last_batch(trainer))
        self.seen.setdefault("idx", []).append(_lightning.train_batch_idx(trainer))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.seen.setdefault("processed", []).append(_lightning.epochs_processed(trainer))

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        scaler = _lightning.amp_scaler(trainer)
        if scaler is not None:
            scale = _lightning.loss_scale(scaler)
            self.seen["scale"] = (scale.dim(), float(scale), float(scaler.get_scale()))
        self.seen["fused"] = _lightning.fused_unscale(optimizer)
        self.seen["callbacks"] = _lightning.trainer_callbacks(trainer)


def test_loop_progress_reads() -> None:
    probe = Probe()
    t = trainer(max_epochs=2, callbacks=[probe])
    t.fit(Regression(), loader(n=32, batch_size=8))
    assert probe.seen["last"] == [False, False, False, True] * 2
    assert probe.seen["idx"] == [0, 1, 2, 3] * 2
    # an epoch counts as processed once its batches ran: its own epoch-end hooks already see it counted
    assert probe.seen["processed"] == [1, 2]
    assert probe in probe.seen["callbacks"]


def test_scaler_reads_under_the_cpu_grad_scaler() -> None:
    class Fused(Regression):
        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)

    probe = Probe()
    t = trainer(max_steps=2, callbacks=[probe], plugins=[MixedPrecision("16-mixed", "cpu")])
    t.fit(Fused(), loader(n=32))
    dim, read, public = probe.seen["scale"]
    assert dim == 0 and read == public  # the private tensor is the scale get_scale() reports
    assert probe.seen["fused"] is True
    plain = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert _lightning.fused_unscale(plain) is False
    assert _lightning.amp_scaler(trainer()) is None


def test_detached_trainer_lets_a_copy_leave_the_trainer_behind() -> None:
    model = Regression()
    t = trainer(max_steps=1)
    t.fit(model, loader(n=16))
    with _lightning.detached_trainer(model):
        clone = copy.deepcopy(model)
    assert model.trainer is t  # put back
    assert clone._trainer is None


def test_replay_training_step_silences_logging_and_returns_the_loss() -> None:
    logged: list[str] = []

    class Logs(Regression):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            self.log("x", 1.0)
            logged.append("x")
            return {"loss": super().training_step(batch, batch_idx)}

    model = Logs()
    batch = next(iter(loader(n=8)))
    loss = _lightning.replay_training_step(None, model, batch, 0)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and logged == ["x"]
    assert "log" not in vars(model)  # the silencing shadow was removed


def test_unused_parameters_are_fatal_only_under_ddp_without_find_unused() -> None:
    from lightning.pytorch.strategies import DDPStrategy

    class Stub:  # the two public attributes the read needs, around a real DDPStrategy
        def __init__(self, world_size: int, strategy: Any) -> None:
            self.world_size, self.strategy = world_size, strategy

    assert _lightning.unused_parameters_fatal(Stub(2, DDPStrategy()))
    assert not _lightning.unused_parameters_fatal(Stub(2, DDPStrategy(find_unused_parameters=True)))
    assert not _lightning.unused_parameters_fatal(Stub(1, DDPStrategy()))
    assert not _lightning.unused_parameters_fatal(trainer())


def test_set_found_inf_writes_only_where_a_fused_kernel_reads_it() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    fused = torch.optim.AdamW([param], lr=0.1, fused=True)
    param.grad = torch.ones(3)
    assert _lightning.set_found_inf(fused, torch.ones(()))
    fused.step()
    assert torch.equal(param.detach(), torch.ones(3))  # the update was withheld on the device
    _lightning.clear_found_inf(fused)
    assert not hasattr(fused, "found_inf")
    plain = torch.optim.AdamW([param], lr=0.1)
    assert not _lightning.set_found_inf(plain, torch.ones(())) and not hasattr(plain, "found_inf")


def test_is_a_recognises_both_namespaces() -> None:
    from lightning.pytorch.loggers import CSVLogger

    assert _lightning.is_a(CSVLogger("/tmp/x"), "loggers.CSVLogger")
    assert not _lightning.is_a(CSVLogger("/tmp/x"), "loggers.TensorBoardLogger")
    standalone = pytest.importorskip("pytorch_lightning")
    assert _lightning.is_a(standalone.loggers.CSVLogger("/tmp/x"), "loggers.CSVLogger")


def test_thread_stacks_read_another_threads_frames_without_its_help() -> None:
    import threading
    import time

    release = threading.Event()

    def blocked_here() -> None:
        release.wait(10)

    thread = threading.Thread(target=blocked_here, name="blocked")
    thread.start()
    try:
        time.sleep(0.05)
        stacks = _lightning.thread_stacks()
        name, frames = stacks[thread.ident]
        assert name == "blocked" and any(
            f.name == "blocked_here" and "release.wait" in f.line for f in frames
        )
        _, main_frames = stacks[threading.get_ident()]
        assert main_frames[-1].name == "thread_stacks"  # outermost first: the caller's own frame last
    finally:
        release.set()
        thread.join()


def test_compiled_sees_every_way_a_model_gets_compiled() -> None:
    from lightning.pytorch.utilities.compile import from_compiled

    assert _lightning.compiled(Regression()) is False
    assert _lightning.compiled(from_compiled(torch.compile(Regression(), backend="eager"))) is True
    inner = Regression()
    inner.net = torch.compile(inner.net, backend="eager")  # type: ignore[assignment]
    assert _lightning.compiled(inner) is True
    in_place = Regression()
    in_place.net.compile(backend="eager")
    assert _lightning.compiled(in_place) is True
