"""SanityCheck: pre-flight checks on the first batches, before the first update; can refuse to start training."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_diag import _distributed, _lightning
from lightning_diag._validation import (
    Unused,
    check_bool,
    check_choice,
    check_fraction,
    check_int,
    check_unused,
)
from lightning_diag.callbacks._base import DiagCallback
from lightning_diag.callbacks._context import run_context
from lightning_diag.core import sanity
from lightning_diag.core.verdict import Verdict, fails
from lightning_diag.errors import SanityCheckError

__all__ = ["SanityCheck", "SanityCheckError"]


#: Settings that have no effect (``_validation.check_unused``).
_UNUSED = (
    Unused(
        ("overfit_lr", "min_drop"),
        lambda a: a["overfit_batch_steps"] == 0,
        "`overfit_batch_steps=0`",
        "set `overfit_batch_steps` > 0",
    ),
    Unused(("num_batches",), lambda a: not a["check_data"], "`check_data=False`", "set `check_data=True`"),
)


class SanityCheck(DiagCallback):
    """Pre-flight checks before the first optimizer step; say what is wrong before hours are spent.

    On the first training batch of a fresh run (``on_train_batch_start`` at step 0, so the batch is the real one,
    already on the device, and no extra data is drawn), SanityCheck runs the checks of
    :mod:`lightning_diag.core.sanity` and records each failure as a finding:

    * data: NaN/Inf in the first ``num_batches`` batches (``non_finite_input``, error);
    * what the first step consumes, read with one observed run of the loss (the batch itself may be a dict of
      lengths, masks, category codes... built by a library): the float input of the first layer with parameters
      far from unit scale (``input_scale``), the targets handed to a classification loss all of one class or
      heavily imbalanced (``label_distribution``), and that loss at initialisation against ``ln(C)``
      (``loss_at_init``: far above, an overconfident init; near 0, a leak; probabilities given to a loss that
      takes logits). These are symptoms: ``info`` before training, a ``warning`` at the end of fit only if a
      consequence followed (the loss went wrong around them), so they never stop a run that may be right;
    * ``missing_gradients``: trainable parameters the loss does not reach (names listed): an error when nothing an
      optimizer steps gets a gradient (or under DDP without ``find_unused_parameters``, which would stop at the
      next backward); a warning when the loss still moves with them (their values reach it through a
      ``.detach()`` or ``torch.no_grad()``, so they never learn what they affect); info when the loss ignores them
      and the model learns without them (N-BEATS' last backcast, auxiliary heads, conditional branches, experts);
    * ``batch_dependence`` (warning): the output of one sample depends on the others (gradient test; BatchNorm is
      put in eval mode for it, which the finding says);
    * ``activation_scale``: the RMS of the pre-activations across depth, on one forward pass with hooks
      (:func:`~lightning_diag.core.activations.check_activation_scale`): a geometric shrink or growth of more than
      10x over the stack means an initialisation mismatched to the activation (from 1000x a symptom pending a
      consequence, like the other pre-flight symptoms; info below);
    * ``cannot_overfit_batch`` (``overfit_batch_steps > 0``): a copy of the model trained on the first batch with
      Adam must cut its loss by ``min_drop``.

    Under manual optimisation (``automatic_optimization = False``) only the data checks run: the training step
    calls backward and the optimizer itself, so replaying it would update the real weights.

    Weights, gradients, buffers, train/eval modes, the optimizer state and the RNG states are left exactly as they
    were. The batch-independence check calls ``forward`` on the input found by convention (``batch[0]``, or
    ``x``/``input``/``image``... in a dict) and is skipped when that call fails. Then ``fail_on`` decides: a finding
    of that severity or worse (on any rank) raises :class:`SanityCheckError` before the first update. At the
    default (``"error"``) that is only for what cannot be by design: NaN/Inf data, a loss with no gradient path,
    nothing an optimizer steps reached by the loss.

    Args:
        fail_on: ``"error"`` (default), ``"warning"`` or ``"never"``.
        num_batches: batches the data checks look at.
        check_data: run the data checks (NaN/Inf, input scale, labels).
        check_loss_at_init: run the loss-at-initialisation check.
        check_gradients: run the missing-gradient check.
        check_batch_independence: run the batch-mixing check.
        check_activation_scale: run the activation-scale check.
        overfit_batch_steps: steps of the overfit-one-batch check (0: off; it trains a copy of the model).
        overfit_lr: Adam's learning rate for that check.
        min_drop: the fraction by which the loss must fall in that check.

    Findings:
        ``non_finite_input``, ``input_scale``, ``label_distribution``, ``loss_at_init``, ``missing_gradients``,
        ``non_finite_gradients``, ``batch_dependence``, ``activation_scale``, ``cannot_overfit_batch``;
        ``declined`` (info, with a LightningDiagWarning) for the loss-based checks under manual optimization
        (``training_step`` steps the optimizers itself) or when ``training_step`` returns no loss on the first batches. The model checks run on
        the first batch whose ``training_step`` returns a loss (Lightning skips the others); the overfit copy stays
        attached to the Trainer (a ``training_step`` may read ``self.trainer``); sparse embeddings get SparseAdam.

    Raises:
        ValueError: (``ArgumentError``, also a ``MisconfigurationException``) at construction for an unknown
            ``fail_on``, out-of-range numbers, a non-bool flag, or ``overfit_lr``/``min_drop`` without
            ``overfit_batch_steps`` (``num_batches`` without ``check_data``).
        SanityCheckError: at the first batch when a finding reaches ``fail_on``.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_diag import SanityCheck
        >>> trainer = pl.Trainer(callbacks=[SanityCheck(overfit_batch_steps=50)])

    Note:
        A run resumed from a checkpoint (``global_step > 0``) is not checked again. Under DDP each rank checks its
        own batch; the decision to stop is agreed by all ranks, the report lists rank 0's findings.
    """

    def __init__(
        self,
        fail_on: Literal["never", "error", "warning"] = "error",
        num_batches: int = 1,
        check_data: bool = True,
        check_loss_at_init: bool = True,
        check_gradients: bool = True,
        check_batch_independence: bool = True,
        overfit_batch_steps: int = 0,
        overfit_lr: float = 1e-3,
        min_drop: float = 0.5,
        check_activation_scale: bool = True,
    ) -> None:
        super().__init__()
        check_choice("fail_on", fail_on, ("never", "error", "warning"))
        check_int("num_batches", num_batches, minimum=1)
        check_int("overfit_batch_steps", overfit_batch_steps, minimum=0)
        check_fraction("overfit_lr", overfit_lr, low_open=True)
        check_fraction("min_drop", min_drop, low_open=True, high_open=True)
        for name, flag in (
            ("check_data", check_data),
            ("check_loss_at_init", check_loss_at_init),
            ("check_gradients", check_gradients),
            ("check_batch_independence", check_batch_independence),
            ("check_activation_scale", check_activation_scale),
        ):
            check_bool(name, flag)
        check_unused(SanityCheck.__init__, locals(), _UNUSED)
        self.fail_on = fail_on
        self.num_batches = num_batches
        self.check_data = check_data
        self.check_loss_at_init = check_loss_at_init
        self.check_gradients = check_gradients
        self.check_batch_independence = check_batch_independence
        self.overfit_batch_steps = overfit_batch_steps
        self.overfit_lr = float(overfit_lr)
        self.min_drop = float(min_drop)
        self.check_activation_scale = check_activation_scale
        self._reset_state()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            fail_on=self.fail_on, num_batches=self.num_batches, overfit_batch_steps=self.overfit_batch_steps
        )

    def _reset_state(self) -> None:
        self.done = False
        self._batches: list[Any] = []  # the batches the data checks will look at
        self._model_done = False
        self._model_tries = 0

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.done:
            return
        if trainer.global_step > 0 and not self._batches and not self._model_tries:
            self.done = True  # a resumed run: it was checked when it started
            return
        data_done = not self.check_data
        if self.check_data:  # first: a NaN in the data also makes the model checks fail, as a consequence
            self._batches.append(batch)
            if len(self._batches) >= self.num_batches or batch_idx + 1 >= _num_batches(trainer):
                issues = sanity.run_checks(
                    pl_module,
                    self._batches,
                    _no_loss,
                    data=True,
                    inputs=False,
                    loss_at_init=False,
                    gradients=False,
                    batch_independence=False,
                    activation_scale=False,
                )
                self._judge(trainer, issues)
                self._batches = []
                data_done = True
        if not self._model_done:
            self._model_checks(trainer, pl_module, batch, batch_idx)
        self.done = self._model_done and data_done

    def _model_checks(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """The checks that run the model, on the first batch whose ``training_step`` returns a loss."""
        loss_checks = {
            "loss_at_init": self.check_loss_at_init,
            "gradients": self.check_gradients,
            "overfit_batch_steps": self.overfit_batch_steps,
        }
        if not pl_module.automatic_optimization and any(loss_checks.values()):
            # training_step steps the optimizers itself: running it outside the loop would update the model
            self.decline(
                trainer,
                "SanityCheck skipped its loss-based checks (loss at initialisation, missing gradients, overfit one "
                "batch): under manual optimization `training_step` steps the optimizers itself, so it cannot be "
                "run outside the loop. The data and batch-independence checks still ran.",
                "manual_optimization",
            )
            loss_checks = {"loss_at_init": False, "gradients": False, "overfit_batch_steps": 0}
        self._model_tries += 1
        facts: dict[str, float] = {}
        try:
            issues = sanity.run_checks(
                pl_module,
                [batch],
                lambda module, b: _lightning.replay_training_step(
                    trainer if module is pl_module else None, module, b, batch_idx
                ),
                copyable=lambda: _lightning.trainer_shared_on_copy(pl_module),
                data=False,
                inputs=self.check_data and pl_module.automatic_optimization,
                loss_at_init=bool(loss_checks["loss_at_init"]),
                gradients=bool(loss_checks["gradients"]),
                batch_independence=self.check_batch_independence,
                overfit_batch_steps=int(loss_checks["overfit_batch_steps"]),
                overfit_lr=self.overfit_lr,
                min_drop=self.min_drop,
                activation_scale=self.check_activation_scale,
                trained={id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
                or None,
                unused_fatal=_lightning.unused_parameters_fatal(trainer),
                shuffled=_shuffled(trainer),
                facts=facts,
            )
        except sanity.NoLoss:
            # Lightning skips a batch whose training_step returns None: check the next one (still before any update)
            if self._model_tries >= MAX_MODEL_TRIES:
                self._model_done = True
                self.decline(
                    trainer,
                    f"SanityCheck skipped its model checks: `training_step` returned no loss on the first "
                    f"{self._model_tries} batches.",
                    "no_loss",
                )
            return
        self._model_done = True
        run_context(trainer).chance_loss = facts.get("chance_loss")
        self._judge(trainer, issues)

    def _judge(self, trainer: pl.Trainer, issues: list[Verdict]) -> None:
        for issue in issues:
            self.record(trainer, issue, key=issue.message)
        failing = [i for i in issues if fails(i.severity, self.fail_on)]
        if _distributed.any_rank(trainer, bool(failing)):
            listed = "; ".join(f"{i.code}: {i.message}" for i in failing) or "on another rank"
            raise SanityCheckError(
                f"SanityCheck found {len(failing)} problem(s) at or above '{self.fail_on}' before training: {listed} "
                "(set SanityCheck(fail_on='never') to train anyway)."
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "findings": self._findings_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = bool(state_dict.get("done", self.done))
        self._load_findings_state(state_dict)


#: Batches tried for the model checks when ``training_step`` returns no loss (Lightning skips those batches).
MAX_MODEL_TRIES = 8


def _no_loss(*_args: Any) -> None:
    return None


def _num_batches(trainer: pl.Trainer) -> int:
    n = trainer.num_training_batches
    return int(n) if isinstance(n, (int, float)) and n != float("inf") else 1 << 30


def _shuffled(trainer: pl.Trainer) -> bool | None:
    """Whether the training DataLoader shuffles (``None`` when it cannot be told: an iterable dataset, a custom
    sampler).
    """
    sampler = getattr(_lightning.train_loader(trainer), "sampler", None)
    if isinstance(sampler, torch.utils.data.RandomSampler):
        return True
    if isinstance(sampler, torch.utils.data.SequentialSampler):
        return False
    shuffle = getattr(sampler, "shuffle", None)  # DistributedSampler, which Lightning puts in under DDP
    return bool(shuffle) if isinstance(shuffle, bool) else None
