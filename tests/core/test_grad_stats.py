"""grad_stats against torch.nn.utils.get_total_norm and explicit concatenations."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_diag.core.grad_stats import (
    compute_grad_stats,
    group_index,
    group_name,
    grouped_norms,
    tensor_norms,
)


def tensors(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[list[str], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    names = ["enc.0.weight", "enc.0.bias", "enc.1.weight", "dec.weight", "dec.bias", "scale"]
    shapes = [(8, 4), (8,), (8, 8), (3, 8), (3,), ()]
    return names, [torch.randn(s, generator=g).to(dtype) for s in shapes]


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_total_matches_get_total_norm(norm_type: float, dtype: torch.dtype) -> None:
    names, grads = tensors(dtype=dtype)
    stats = compute_grad_stats(names, grads, norm_type)
    ref = torch.nn.utils.get_total_norm(grads, norm_type)
    assert stats.total_norm.item() == pytest.approx(
        ref.float().item(), rel=1e-2 if dtype == torch.bfloat16 else 1e-5
    )
    assert stats.norms.dtype == torch.float32 and stats.norms.shape == (len(grads),)
    assert not stats.nonfinite.item()


def test_grouped_norms_equal_the_norm_of_each_group() -> None:
    names, grads = tensors()
    for group_by, depth, expected in [
        ("module", 1, {"enc": [0, 1, 2], "dec": [3, 4], "(root)": [5]}),
        ("module", 2, {"enc.0": [0, 1], "enc.1": [2], "dec": [3, 4], "(root)": [5]}),
        ("parameter", 0, {n: [i] for i, n in enumerate(names)}),
        ("total", 0, {"total": list(range(6))}),
    ]:
        groups = group_index(names, group_by, depth, torch.device("cpu"))
        assert groups.names == tuple(expected)
        for p in (2.0, math.inf):
            got = grouped_norms(tensor_norms(grads, p), groups, p)
            for i, members in enumerate(expected.values()):
                ref = torch.linalg.vector_norm(torch.cat([grads[m].flatten() for m in members]), p)
                assert got[i].item() == pytest.approx(ref.item(), rel=1e-5), (group_by, depth, p)


def test_group_name_edges() -> None:
    assert group_name("a.b.c.weight", "module", 0) == "(root)"
    assert group_name("a.b.c.weight", "total", 3) == "total"
    assert group_name("a.b.c.weight", "parameter", 3) == "a.b.c.weight"


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_flag(bad: float) -> None:
    names, grads = tensors()
    grads[2][0, 0] = bad
    assert compute_grad_stats(names, grads).nonfinite.item()


def test_inverse_scale_unscales() -> None:
    names, grads = tensors()
    scaled = [g * 1024.0 for g in grads]
    stats = compute_grad_stats(names, scaled, 2.0, inv_scale=torch.tensor(1 / 1024.0))
    assert stats.total_norm.item() == pytest.approx(torch.nn.utils.get_total_norm(grads).item(), rel=1e-6)


def test_empty() -> None:
    stats = compute_grad_stats([], [])
    assert stats.norms.numel() == 0 and stats.total_norm.item() == 0.0 and not stats.nonfinite.item()


def test_total_norm_of_huge_finite_norms_does_not_overflow() -> None:
    from lightning_diag.core.grad_stats import total_from_norms

    norms = torch.tensor([3e20, 4e20], dtype=torch.float32)  # squares overflow float32, the total does not
    total = total_from_norms(norms)
    assert torch.isfinite(total) and float(total) == pytest.approx(5e20, rel=1e-6)
    assert total.dtype == torch.float32
