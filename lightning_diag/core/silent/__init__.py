"""SilentBugDetector's core partner: the bugs that raise nothing and produce no NaN.

- :mod:`~lightning_diag.core.silent.checks`: the rules (check schedule, samples and fingerprints, the mode rule,
  checksums, the noise-scale estimator and its judgement, the consecutive-check counter).
- :mod:`~lightning_diag.core.silent.probes`: the hooks that watch one optimizer step at a check.
- :mod:`~lightning_diag.core.silent.verdicts`: the words of every finding, as ``Verdict``s.

Pure torch + stdlib: nothing here imports Lightning.

Why one callback: the six checks share the sampling schedule, the per-check bookkeeping (the probes of the
optimizer step, the one cross-rank gather) and one cost budget; none fits an existing callback's job
(GradNormMonitor logs gradient norms, NaNGuard guards non-finite values, SanityCheck runs once before training),
and each can be switched off alone.
"""

from lightning_diag.core.silent import verdicts
from lightning_diag.core.silent.checks import (
    MAX_FINGERPRINT_TENSORS,
    NOISE_FLOOR,
    NoiseSample,
    NoiseScale,
    Streak,
    all_stale,
    batch_over_noise_scale,
    bn_batches_tracked,
    bn_updates,
    checksums,
    divergent_entries,
    diverging_tensors,
    fingerprint,
    flat_sample,
    holds_dtensors,
    is_check_step,
    is_mode_sensitive,
    mode_problems,
    model_parallel,
    no_op_seen,
    noise_row,
    noise_sample,
    noise_scale_terms,
    replica_checksums,
    replicated_buffers,
    same_batch,
    same_on_every_rank,
    unheld_names,
)
from lightning_diag.core.silent.probes import (
    PROBE_TENSORS,
    STALE_TENSORS,
    NoiseMeter,
    NoOpProbe,
    SquareProbe,
    StaleProbe,
    StaleWatch,
    per_group,
    spread,
)

__all__ = [
    "MAX_FINGERPRINT_TENSORS",
    "NOISE_FLOOR",
    "PROBE_TENSORS",
    "STALE_TENSORS",
    "NoOpProbe",
    "NoiseMeter",
    "NoiseSample",
    "NoiseScale",
    "SquareProbe",
    "StaleProbe",
    "StaleWatch",
    "Streak",
    "all_stale",
    "batch_over_noise_scale",
    "bn_batches_tracked",
    "bn_updates",
    "checksums",
    "divergent_entries",
    "diverging_tensors",
    "fingerprint",
    "flat_sample",
    "holds_dtensors",
    "is_check_step",
    "is_mode_sensitive",
    "mode_problems",
    "model_parallel",
    "no_op_seen",
    "noise_row",
    "noise_sample",
    "noise_scale_terms",
    "per_group",
    "replica_checksums",
    "replicated_buffers",
    "same_batch",
    "same_on_every_rank",
    "spread",
    "unheld_names",
    "verdicts",
]
