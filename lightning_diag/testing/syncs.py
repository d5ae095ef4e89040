"""Count the host-device synchronisations a piece of code makes (on CPU too, where nothing waits).

A monitoring callback that reads a device value every step (``.item()``, ``float(t)``, ``bool(t)``,
``.tolist()``) stalls a GPU's queue every step. On a CPU nothing waits, so such reads are invisible to a timer;
:class:`HostSyncCounter` counts them instead: the dispatched ops that force a read (``_local_scalar_dense``
behind ``.item()``/``float()``, ``is_nonzero`` behind ``bool()``, ``equal``, ``nonzero``) and, since on CPU they
read memory without dispatching an op, calls of ``Tensor.tolist()`` and ``Tensor.numpy()`` while it is active::

    with HostSyncCounter() as syncs:
        step()
    assert syncs.count == 0

The counter slows every op while active (Python dispatch): use it in tests and sync audits, not in timings.
:class:`SyncAudit` is a callback that counts, per optimizer step, the syncs made inside other callbacks' hooks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode
from typing_extensions import override

__all__ = ["STEP_HOOKS", "HostSyncCounter", "SyncAudit"]


class HostSyncCounter(TorchDispatchMode):
    """Counts host-device synchronisations while active (see the module docstring); ``count`` is the total."""

    SYNCS: ClassVar[frozenset[str]] = frozenset({"_local_scalar_dense", "is_nonzero", "equal", "nonzero"})
    READS: ClassVar[tuple[str, ...]] = ("tolist", "numpy")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._saved: dict[str, Any] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.__name__.split(".")[0] in self.SYNCS:
            self.count += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> HostSyncCounter:
        for name in self.READS:
            original = self._saved[name] = getattr(torch.Tensor, name)

            def counted(tensor: torch.Tensor, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
                self.count += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved = {}
        super().__exit__(*exc)


#: The per-step hooks :class:`SyncAudit` watches.
STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_train_epoch_end",
)


class SyncAudit(Callback):
    """Counts the host syncs made inside other callbacks' per-step hooks, per optimizer step.

    Put it first in ``Trainer(callbacks=...)`` (it reads the step in ``on_train_batch_start``) and pass it the
    callbacks to audit (their ``hooks`` are wrapped on the instances, each call under a :class:`HostSyncCounter`);
    ``per_step`` maps the global step to the syncs counted in it.
    """

    def __init__(self, callbacks: Iterable[Callback] = (), hooks: Iterable[str] = STEP_HOOKS) -> None:
        self.per_step: dict[int, int] = {}
        self.step = 0
        self.hooks = tuple(hooks)
        self.watch(callbacks)

    def watch(self, callbacks: Iterable[Callback]) -> None:
        for callback in callbacks:
            for hook in self.hooks:
                setattr(callback, hook, self._counted(getattr(callback, hook)))

    def _counted(self, original: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            with HostSyncCounter() as syncs:
                result = original(*args, **kwargs)
            self.per_step[self.step] = self.per_step.get(self.step, 0) + syncs.count
            return result

        return counted

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.step = trainer.global_step
