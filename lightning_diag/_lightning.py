"""The only module that reads private Lightning and torch state.

Every read below names the attribute it relies on and the versions it was checked on; ``tests/test_lightning.py``
exercises each one against the installed versions, so a release that moves one fails there, loudly, instead of
deep inside a user's run. Everything else in lightning_diag uses public APIs or these helpers.

It is also where the two namespaces meet: Lightning ships as ``lightning.pytorch`` and as the standalone
``pytorch_lightning`` package that many libraries still use, whose classes are distinct twins. :func:`is_a` asks
"is this a TensorBoardLogger / DDPStrategy / ..." of both (the standalone one only once it is imported: an object
of its classes cannot exist before).

Checked on: lightning 2.4-2.6, pytorch_lightning 2.4-2.6, torch 2.4-2.13.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = [
    "NAMESPACES",
    "amp_scaler",
    "callback_bases",
    "check_strategy",
    "clear_found_inf",
    "compiled",
    "detached_trainer",
    "epochs_processed",
    "epochs_started",
    "fused_unscale",
    "is_a",
    "is_last_batch",
    "loss_scale",
    "misconfiguration_errors",
    "replay_training_step",
    "set_found_inf",
    "thread_stacks",
    "train_batch_idx",
    "train_loader",
    "trainer_callbacks",
    "trainer_shared_on_copy",
    "unused_parameters_fatal",
]


#: The two packages Lightning ships as.
NAMESPACES = ("lightning.pytorch", "pytorch_lightning")
_CLASSES: dict[tuple[str, bool], tuple[type, ...]] = {}


def callback_bases() -> tuple[type, ...]:
    """The ``Callback`` base class of every installed namespace: ``lightning.pytorch``'s first, then the standalone
    ``pytorch_lightning``'s when it is installed (importing it costs ~0.15 s next to lightning's own import). A
    lightning_diag callback derives from both, so a ``pytorch_lightning.Trainer`` takes one that is passed alone (it
    wraps only its own callbacks in a list) and ``pytorch_lightning.cli.LightningCLI`` resolves it by name.
    """
    from lightning.pytorch.callbacks import Callback

    try:
        from pytorch_lightning.callbacks import Callback as StandaloneCallback
    except ImportError:
        return (Callback,)
    return (Callback, StandaloneCallback)


def misconfiguration_errors() -> tuple[type[BaseException], ...]:
    """Lightning's ``MisconfigurationException`` in each namespace (``lightning_fabric`` ships its own class)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    found: list[type[BaseException]] = [MisconfigurationException]
    standalone = sys.modules.get("lightning_fabric.utilities.exceptions")
    if standalone is not None:
        found.append(standalone.MisconfigurationException)
    return tuple(found)


def is_a(obj: Any, name: str) -> bool:
    """Whether ``obj`` is an instance of Lightning's class ``name`` (``"loggers.TensorBoardLogger"``,
    ``"strategies.DDPStrategy"``, ``"callbacks.ModelCheckpoint"``...) in either namespace.

    Example:
        >>> from lightning.pytorch.loggers import CSVLogger
        >>> is_a(CSVLogger("/tmp"), "loggers.CSVLogger"), is_a(CSVLogger("/tmp"), "loggers.TensorBoardLogger")
        (True, False)
    """
    standalone = "pytorch_lightning" in sys.modules
    key = (name, standalone)
    classes = _CLASSES.get(key)
    if classes is None:
        found = []
        for root in NAMESPACES if standalone else NAMESPACES[:1]:
            module_name, _, class_name = f"{root}.{name}".rpartition(".")
            try:
                found.append(getattr(importlib.import_module(module_name), class_name))
            except (ImportError, AttributeError):  # an optional logger's package is not installed
                continue
        classes = _CLASSES[key] = tuple(found)
    return bool(classes) and isinstance(obj, classes)


def trainer_callbacks(trainer: Any) -> list[Any]:
    """The Trainer's callbacks (``Trainer.callbacks`` is set in ``__init__`` by the callback connector, so type
    checkers do not see it; lightning 2.0-2.6).
    """
    return list(getattr(trainer, "callbacks", []))


def amp_scaler(trainer: Any) -> Any | None:
    """The GradScaler of a 16-bit mixed-precision run, else ``None``.

    Reads ``MixedPrecision.scaler`` (public attribute of the precision plugin; lightning 2.0-2.6).
    """
    return getattr(getattr(trainer, "precision_plugin", None), "scaler", None)


def loss_scale(scaler: Any) -> torch.Tensor:
    """The scaler's current scale as a 0-d float device tensor, without a host sync.

    Reads ``GradScaler._scale`` (private: the scale tensor that ``get_scale()`` would copy to the host; torch
    1.6-2.13). Falls back to ``get_scale()`` (one host read) before the scaler's first step, when ``_scale`` is
    still ``None``.
    """
    scale = getattr(scaler, "_scale", None)
    if isinstance(scale, torch.Tensor):
        return scale.detach().float().reshape(())
    return torch.tensor(float(scaler.get_scale()))


def fused_unscale(optimizer: Any) -> bool:
    """Whether the optimizer unscales its gradients inside ``step()`` (fused Adam/AdamW/SGD under a GradScaler).

    Reads ``Optimizer._step_supports_amp_scaling`` (private flag that GradScaler itself checks; torch 1.13-2.13).
    Lightning wraps optimizers in ``LightningOptimizer``, which forwards attribute reads.
    """
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def set_found_inf(optimizer: Any, flag: torch.Tensor) -> bool:
    """Withhold this step's update on the device when ``flag`` (a 0-d float tensor) is 1: the fused kernels of
    Adam/AdamW/SGD skip the update, parameters and state untouched, as they do for a GradScaler's inf check.

    Writes ``Optimizer.found_inf`` (private: the attribute ``_step_supports_amp_scaling`` optimizers read in
    ``step()`` when no ``found_inf`` keyword is passed; torch 2.0-2.13). Returns whether the optimizer takes it
    (``fused=True`` in its defaults); otherwise nothing is written.
    """
    if not bool(getattr(optimizer, "defaults", {}).get("fused")):
        return False
    optimizer.found_inf = flag
    return True


def clear_found_inf(optimizer: Any) -> None:
    """Remove what :func:`set_found_inf` wrote, once the step has read it (a later step must not see it)."""
    with contextlib.suppress(AttributeError):
        del optimizer.found_inf


@contextlib.contextmanager
def detached_trainer(pl_module: Any) -> Iterator[None]:
    """Detach the Trainer reference so ``copy.deepcopy(pl_module)`` copies the model only.

    Writes ``LightningModule._trainer`` (private; lightning 2.0-2.6): the ``trainer`` property raises when the
    module is not attached, so a copy made inside has none.
    """
    saved = getattr(pl_module, "_trainer", None)
    pl_module._trainer = None
    try:
        yield
    finally:
        pl_module._trainer = saved


@contextlib.contextmanager
def trainer_shared_on_copy(pl_module: Any) -> Iterator[None]:
    """Inside, ``copy.deepcopy(pl_module)`` copies the model and attaches the copy to the same Trainer, so a
    ``training_step`` that reads ``self.trainer`` still works on the copy.

    ``LightningModule.__getstate__`` drops ``_trainer`` (private; lightning 2.0-2.6), so a plain deep copy is
    detached; a ``__deepcopy__`` set on the instance (``copy.deepcopy`` looks it up on the object) copies it and
    sets the copy's ``_trainer`` back. No Trainer: a plain copy.
    """
    trainer = getattr(pl_module, "_trainer", None)
    if trainer is None:
        yield
        return

    def deepcopy_attached(memo: dict[int, Any]) -> Any:
        del pl_module.__dict__["__deepcopy__"]
        try:
            clone = copy.deepcopy(pl_module, memo)
        finally:
            pl_module.__dict__["__deepcopy__"] = deepcopy_attached
        clone._trainer = trainer
        return clone

    pl_module.__dict__["__deepcopy__"] = deepcopy_attached
    try:
        yield
    finally:
        pl_module.__dict__.pop("__deepcopy__", None)


def is_last_batch(trainer: Any) -> bool:
    """Whether the training batch just run was the last of its epoch.

    Reads ``trainer.fit_loop.epoch_loop.batch_progress.is_last_batch`` (lightning 2.0-2.6).
    """
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def train_batch_idx(trainer: Any) -> int:
    """The index in its epoch of the training batch just run. Reads ``fit_loop.epoch_loop.batch_idx`` (2.0-2.6)."""
    return int(trainer.fit_loop.epoch_loop.batch_idx)


def epochs_processed(trainer: Any) -> int:
    """Training epochs completed so far. Reads ``fit_loop.epoch_progress.current.processed`` (lightning 2.0-2.6)."""
    return int(trainer.fit_loop.epoch_progress.current.processed)


def epochs_started(trainer: Any) -> int | None:
    """Training epochs started so far (``None`` outside a fit loop). Reads
    ``fit_loop.epoch_progress.current.started`` (lightning 2.0-2.6).
    """
    try:
        return int(trainer.fit_loop.epoch_progress.current.started)
    except AttributeError:
        return None


def replay_training_step(trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> torch.Tensor | None:
    """Run ``pl_module.training_step`` outside the loop and return its loss (``None`` if it returned none).

    Runs under the run's precision context (``trainer.precision_plugin.train_step_context()``, public) with
    ``self.log``/``self.log_dict`` silenced by shadowing them on the instance: a replay or a check must not log.
    ``trainer=None`` runs without a precision context (a detached copy of the model).
    """

    def silent(*_args: Any, **_kwargs: Any) -> None:
        return None

    pl_module.log, pl_module.log_dict = silent, silent
    context = (
        trainer.precision_plugin.train_step_context() if trainer is not None else contextlib.nullcontext()
    )
    try:
        with context:
            out = pl_module.training_step(batch, batch_idx)
    finally:
        del pl_module.log, pl_module.log_dict
    if isinstance(out, Mapping):
        out = out.get("loss")
    return out if isinstance(out, torch.Tensor) else None


def train_loader(trainer: Any) -> Any:
    """The (first) training DataLoader of the fit, ``None`` when there is none yet.

    ``Trainer.train_dataloader`` (public) holds what the user passed, possibly a list or dict of loaders.
    """
    return _first_loader(getattr(trainer, "train_dataloader", None))


def _first_loader(loaders: Any) -> Any:
    if isinstance(loaders, torch.utils.data.DataLoader):
        return loaders
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        for item in loaders:
            found = _first_loader(item)
            if found is not None:
                return found
    return None


def unused_parameters_fatal(trainer: Any) -> bool:
    """Whether a trainable parameter without a gradient stops the run: DDP over several processes without
    ``find_unused_parameters=True`` fails at the next backward ("Expected to have finished reduction...").

    Reads ``DDPStrategy._ddp_kwargs`` (private: the keyword arguments given to ``DistributedDataParallel``;
    lightning 2.0-2.6).
    """
    if int(getattr(trainer, "world_size", 1)) <= 1 or not is_a(
        getattr(trainer, "strategy", None), "strategies.DDPStrategy"
    ):
        return False
    kwargs = getattr(trainer.strategy, "_ddp_kwargs", None) or {}
    return not bool(kwargs.get("find_unused_parameters", False))


def check_strategy(trainer: Any, who: str, *, fsdp1: bool = False) -> None:
    """Refuse, at setup, strategies whose gradients these callbacks cannot read correctly yet.

    ``strategy="fsdp"`` (FSDP1) keeps each rank's shard of flat parameters: per-rank norms are not the global norm
    and a clip coefficient computed from them would differ between ranks. DeepSpeed owns the optimizer step (and
    its own clipping and loss scaling). Both need a GPU, where they have not been tested; FSDP2
    (``ModelParallelStrategy``) and DDP are supported and tested. ``fsdp1=True`` lets a callback that only needs
    per-rank non-finite checks through under FSDP1. Matches strategy class names (lightning 2.0-2.6) so that
    neither DeepSpeed nor FSDP1 needs to be importable.
    """
    name = type(getattr(trainer, "strategy", None)).__name__
    if name.startswith("DeepSpeed") or (name == "FSDPStrategy" and not fsdp1):
        from lightning_diag._validation import ConfigurationError

        raise ConfigurationError(
            f"{who} does not support `{name}` yet: its gradients are sharded or managed outside Lightning's "
            "optimizer step, so norms, clipping and skips would not be correct. Use DDP or FSDP2 "
            "(`ModelParallelStrategy`), or remove the callback."
        )


def thread_stacks() -> dict[int, tuple[str, list[traceback.FrameSummary]]]:
    """Every Python thread's name and stack (outermost frame first), keyed by thread ident, read from another
    thread without the threads' cooperation.

    Reads ``sys._current_frames()`` (CPython's underscore API, documented "for debugging"; CPython 3.4-3.14) and
    the source lines through ``linecache``. Threads not started by ``threading`` are named ``Thread-<ident>``.
    """
    names = {t.ident: t.name for t in threading.enumerate()}
    stacks: dict[int, tuple[str, list[traceback.FrameSummary]]] = {}
    for ident, frame in sys._current_frames().items():
        stacks[ident] = (names.get(ident, f"Thread-{ident}"), list(traceback.extract_stack(frame)))
    return stacks


def compiled(module: Any) -> bool:
    """Whether ``module`` runs (in part) under ``torch.compile``: forward hooks added later never fire there.

    Reads ``LightningModule._compiler_ctx`` (private; set by ``lightning.pytorch.utilities.compile.from_compiled``
    when ``trainer.fit`` gets ``torch.compile(model)``; lightning 2.1-2.6), ``nn.Module._compiled_call_impl``
    (private; set by ``nn.Module.compile()``; torch 2.2-2.13) and looks for ``torch._dynamo`` ``OptimizedModule``
    submodules (a part compiled with ``torch.compile(submodule)``; torch 2.0-2.13). Dynamo does not guard on
    module hooks by default (``torch._dynamo.config.skip_nnmodule_hook_guards``), so a hook registered after
    compilation is silently skipped.
    """
    if getattr(module, "_compiler_ctx", None):
        return True
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - torch without dynamo
        return False
    return any(
        isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None
        for m in module.modules()
    )
