"""Sparse (``nn.Embedding(sparse=True)``) and complex gradients through the core math: the same numbers as the
dense/real reference, no crash."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_diag.core.clipping import agc_, apply_coefficient_, clip_value_, unitwise_norm
from lightning_diag.core.grad_stats import compute_grad_stats, max_abs, normable, strided, tensor_norms


def sparse_grad() -> torch.Tensor:
    emb = nn.Embedding(10, 3, sparse=True)
    (emb(torch.tensor([[1, 1, 4]])) * torch.arange(1.0, 4.0)).sum().backward()  # row 1 twice: uncoalesced
    assert emb.weight.grad is not None and emb.weight.grad.is_sparse and not emb.weight.grad.is_coalesced()
    return emb.weight.grad


def complex_grad() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(4, 3, dtype=torch.cfloat)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, math.inf])
def test_norms_of_sparse_and_complex_gradients_equal_the_dense_reference(norm_type: float) -> None:
    grads = [sparse_grad(), complex_grad(), torch.randn(5)]
    dense = [grads[0].to_dense(), grads[1], grads[2]]
    expected = torch.stack([torch.linalg.vector_norm(g, norm_type) for g in dense]).float()
    assert torch.allclose(tensor_norms(grads, norm_type), expected, rtol=1e-6)
    stats = compute_grad_stats(["a", "b", "c"], grads, norm_type)
    assert torch.allclose(stats.total_norm, torch.linalg.vector_norm(expected.double(), norm_type).float())


def test_max_abs_and_non_finite_of_sparse_gradients() -> None:
    g = sparse_grad()
    assert torch.equal(max_abs([g]), g.to_dense().abs().max().view(1))
    bad = g.coalesce()
    bad.values()[0, 0] = float("nan")
    assert torch.isnan(max_abs([bad])).all()
    assert strided(bad).shape == (2, 3) and normable(complex_grad()).dtype == torch.float32


def test_clip_value_clamps_sparse_values_and_complex_parts() -> None:
    g, c = sparse_grad(), complex_grad() * 5
    clip_value_([g, c], 1.5)
    assert g.to_dense().abs().max() <= 1.5
    assert torch.view_as_real(c).abs().max() <= 1.5
    reference = sparse_grad().to_dense().clamp(-1.5, 1.5)
    assert torch.equal(g.to_dense(), reference)  # duplicates summed first, then clamped


def test_clip_value_with_an_infinite_bound_is_a_no_op() -> None:
    g = torch.tensor([1.0, -float("inf"), 3.0])
    clip_value_([g], torch.tensor(math.inf))
    assert torch.equal(g, torch.tensor([1.0, -float("inf"), 3.0]))


def test_coefficient_and_agc_on_sparse_and_complex_gradients() -> None:
    g, c = sparse_grad(), complex_grad()
    before = g.to_dense().clone()
    apply_coefficient_([g, c], torch.tensor(0.5))
    assert torch.equal(g.to_dense(), before * 0.5)
    w = torch.randn(4, 3, dtype=torch.cfloat)
    assert unitwise_norm(w).dtype == torch.float32 and torch.allclose(
        unitwise_norm(w).flatten(), torch.linalg.vector_norm(w, dim=1)
    )
    agc_([torch.zeros(10, 3), w], [g, c], factor=0.01)  # sparse units left alone, complex clipped
    assert torch.equal(g.to_dense(), before * 0.5)
    assert (
        torch.linalg.vector_norm(c, dim=1) <= 0.01 * torch.linalg.vector_norm(w, dim=1) * (1 + 1e-5)
    ).all()
