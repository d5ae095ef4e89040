"""NaNGuard's core: the escalation policy (:mod:`.policy`), the judgement of a step's numbers (:mod:`.judge`) and
the words of its findings (:mod:`.verdicts`). Where a non-finite value began is :mod:`lightning_diag.core.nan_trace`.
"""

from lightning_diag.core.guard.judge import ROW, StepJudge, StepWindow
from lightning_diag.core.guard.policy import (
    ACTIONS,
    Action,
    Decision,
    GuardPolicy,
    StepFlags,
    back_off_lr,
    never_rolls_back,
    never_skips,
    no_rollback_text,
    no_skip_text,
)
from lightning_diag.core.guard.verdicts import (
    CODE_OF_PHASE,
    BadStep,
    Origin,
    bad_step,
    crashed_on_input_verdict,
    describe_action,
    escalation,
    non_finite_verdict,
    overflow_verdict,
    spike_verdict,
    step_verdicts,
)

__all__ = [
    "ACTIONS",
    "CODE_OF_PHASE",
    "ROW",
    "Action",
    "BadStep",
    "Decision",
    "GuardPolicy",
    "Origin",
    "StepFlags",
    "StepJudge",
    "StepWindow",
    "back_off_lr",
    "bad_step",
    "crashed_on_input_verdict",
    "describe_action",
    "escalation",
    "never_rolls_back",
    "never_skips",
    "no_rollback_text",
    "no_skip_text",
    "non_finite_verdict",
    "overflow_verdict",
    "spike_verdict",
    "step_verdicts",
]
