"""What kind of layer a module is, by torch's public API (no private base class such as ``_NormBase``).

Normalisation layers with running statistics (BatchNorm, SyncBatchNorm, InstanceNorm, and user subclasses or other
families that follow the same protocol) are recognised by the attributes they all expose: ``track_running_stats``,
``running_mean`` and ``num_batches_tracked``. Layers that mix the samples of a batch in training mode are the
BatchNorm family.
"""

from __future__ import annotations

from torch import nn

__all__ = ["BATCH_MIXING", "is_norm_layer"]

#: Layers whose training-mode output for one sample depends on the other samples of the batch.
BATCH_MIXING: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
)


def is_norm_layer(module: nn.Module) -> bool:
    """A normalisation layer of the running-statistics kind (whether or not it tracks them now).

    Example:
        >>> is_norm_layer(nn.BatchNorm1d(4)), is_norm_layer(nn.InstanceNorm2d(3)), is_norm_layer(nn.LayerNorm(4))
        (True, True, False)
    """
    return all(
        hasattr(module, name) for name in ("track_running_stats", "running_mean", "num_batches_tracked")
    )
