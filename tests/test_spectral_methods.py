"""TSV-M, Iso-C and Iso-CTS (catmerge/merging/{tsv_m,iso_c,iso_cts}.py, _spectral.py): the
partial decomposition against the full one, and properties the formulas imply."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from catmerge.merging import iso_c, iso_cts, merge_method, tsv_m
from catmerge.merging._spectral import (
    GRAM_MAX_CONDITION,
    polar,
    polar_and_singular_values,
    top_singular,
    top_singular_off_columns,
)
from catmerge.merging.iso_c import IsoCParams
from catmerge.merging.iso_cts import IsoCtsParams
from catmerge.merging.tsv_m import TsvMParams

SETTINGS = settings(max_examples=25, deadline=None)
F64 = torch.float64


def randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=F64)


@SETTINGS
@given(seed=st.integers(0, 10_000), m=st.integers(1, 30), n=st.integers(1, 30), r=st.integers(1, 30))
def test_top_singular_triplets_are_the_full_decompositions(seed, m, n, r):
    g = torch.Generator().manual_seed(seed)
    delta = randn(g, m, n)
    u, s, v = top_singular(delta, r)
    r = min(r, m, n)
    full_u, full_s, full_vt = torch.linalg.svd(delta, full_matrices=False)
    torch.testing.assert_close(s, full_s[:r], rtol=1e-9, atol=1e-10)
    # the same rank-r truncation (singular vectors are unique up to sign for distinct values)
    torch.testing.assert_close((u * s) @ v.T, (full_u[:, :r] * full_s[:r]) @ full_vt[:r], rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(u.T @ u, torch.eye(r, dtype=F64), rtol=0, atol=1e-8)
    torch.testing.assert_close(v.T @ v, torch.eye(r, dtype=F64), rtol=0, atol=1e-8)


def test_top_singular_of_a_rank_deficient_matrix_gives_zero_columns_past_its_rank():
    g = torch.Generator().manual_seed(0)
    delta = randn(g, 6, 2) @ randn(g, 2, 5)  # rank 2
    u, s, v = top_singular(delta, 4)
    assert torch.all(s[2:] == 0) and torch.all(u[:, 2:] == 0) and torch.all(v[:, 2:] == 0)
    torch.testing.assert_close((u * s) @ v.T, delta, rtol=1e-9, atol=1e-10)


@SETTINGS
@given(seed=st.integers(0, 10_000), m=st.integers(2, 20), k=st.integers(1, 20))
def test_polar_factor_is_orthonormal_and_closest(seed, m, k):
    g = torch.Generator().manual_seed(seed)
    a = randn(g, m, min(k, m))
    p = polar(a)
    torch.testing.assert_close(p.T @ p, torch.eye(a.shape[1], dtype=F64), rtol=0, atol=1e-10)
    q, _ = torch.linalg.qr(randn(g, m, a.shape[1]))  # any other matrix with orthonormal columns is farther
    assert torch.linalg.norm(a - p) <= torch.linalg.norm(a - q) + 1e-12


@SETTINGS
@given(seed=st.integers(0, 10_000), m=st.integers(1, 30), n=st.integers(1, 30), k=st.integers(0, 12), r=st.integers(1, 30))
def test_top_singular_off_columns_is_that_of_the_projected_matrix(seed, m, n, k, r):
    """The Gram shortcut (no P delta formed) gives the triplets of P delta itself, tall or wide."""
    g = torch.Generator().manual_seed(seed)
    delta = randn(g, m, n)
    basis, _ = torch.linalg.qr(randn(g, m, min(k, m)))
    u, s, v = top_singular_off_columns(delta, basis, r)
    projected = delta - basis @ (basis.T @ delta)
    ref_u, ref_s, ref_v = top_singular(projected, r)
    torch.testing.assert_close(s, ref_s, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close((u * s) @ v.T, (ref_u * ref_s) @ ref_v.T, rtol=1e-7, atol=1e-8)
    assert torch.allclose(basis.T @ u, torch.zeros(basis.shape[1], u.shape[1], dtype=F64), atol=1e-8)


@SETTINGS
@given(seed=st.integers(0, 10_000), m=st.integers(1, 40), n=st.integers(1, 40), log_cond=st.floats(0, 8))
def test_polar_from_the_gram_is_the_svds_at_any_condition(seed, m, n, log_cond):
    """Well-conditioned matrices take the Gram route, ill-conditioned ones (past GRAM_MAX_CONDITION)
    the SVD: either way the polar factor and singular values are the SVD's."""
    g = torch.Generator().manual_seed(seed)
    p = min(m, n)
    left, _ = torch.linalg.qr(randn(g, m, p))
    right, _ = torch.linalg.qr(randn(g, n, p))
    sigma = torch.logspace(0, -log_cond, p, dtype=F64)
    x = (left * sigma) @ right.T
    factor, s = polar_and_singular_values(x)
    torch.testing.assert_close(s, sigma, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(factor, left @ right.T, rtol=0, atol=1e-7)


def test_a_singular_matrix_takes_the_svd_route():
    g = torch.Generator().manual_seed(1)
    x = randn(g, 9, 2) @ randn(g, 2, 6)  # rank 2: the Gram route would divide by 0
    factor, s = polar_and_singular_values(x)
    u, ref_s, vt = torch.linalg.svd(x, full_matrices=False)
    assert torch.isfinite(factor).all() and GRAM_MAX_CONDITION < float("inf")
    torch.testing.assert_close(s, ref_s)
    torch.testing.assert_close(factor, u @ vt)


def orthogonal_updates(g, tasks: int, m: int, n: int, rank: int):
    """Updates of rank `rank` in mutually orthogonal row and column spaces."""
    u, _ = torch.linalg.qr(randn(g, m, tasks * rank))
    v, _ = torch.linalg.qr(randn(g, n, tasks * rank))
    return [(u[:, t * rank:(t + 1) * rank] * (1 + torch.rand(rank, generator=g, dtype=F64))) @ v[:, t * rank:(t + 1) * rank].T
            for t in range(tasks)]


@SETTINGS
@given(seed=st.integers(0, 10_000), tasks=st.integers(1, 4), alpha=st.floats(0.1, 3.0))
def test_tsv_m_of_updates_in_orthogonal_subspaces_is_their_sum(seed, tasks, alpha):
    """When every task's top directions are already mutually orthogonal, decorrelation changes
    nothing: TSV-M is Task Arithmetic. Other tensors are averaged."""
    g = torch.Generator().manual_seed(seed)
    m, n = 12, 16
    rank = min(m, n) // tasks
    deltas = orthogonal_updates(g, tasks, m, n, rank)
    biases = [randn(g, m) for _ in range(tasks)]
    theta0 = {"w": randn(g, m, n), "b": randn(g, m)}
    out = merge_method("tsv_m")(theta0, [{"w": d, "b": b} for d, b in zip(deltas, biases)], TsvMParams(alpha=alpha))
    torch.testing.assert_close(out["w"], theta0["w"] + alpha * sum(deltas), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(out["b"], theta0["b"] + alpha * sum(biases) / tasks, rtol=1e-12, atol=1e-12)


def test_tsv_m_keeps_each_tasks_share_of_singular_values():
    g = torch.Generator().manual_seed(1)
    deltas = [randn(g, 8, 6) for _ in range(3)]  # r = 6 // 3 = 2 directions each
    merged = tsv_m.merge_matrix(deltas)
    kept = torch.cat([torch.linalg.svdvals(d)[:2] for d in deltas]).sort(descending=True).values
    torch.testing.assert_close(torch.linalg.svdvals(merged), kept, rtol=1e-9, atol=1e-10)  # orthonormal factors


@SETTINGS
@given(seed=st.integers(0, 10_000), tasks=st.integers(1, 5), m=st.integers(2, 12), n=st.integers(2, 12))
@example(seed=12, tasks=5, m=12, n=12)  # condition number near GRAM_MAX_CONDITION: 1.5e-8 relative off the SVD
def test_iso_c_flattens_the_spectrum_of_the_sum(seed, tasks, m, n):
    """To the Gram route's documented accuracy (about 1e-8 relative below GRAM_MAX_CONDITION)."""
    g = torch.Generator().manual_seed(seed)
    deltas = [randn(g, m, n) for _ in range(tasks)]
    merged = iso_c.merge_matrix(deltas)
    total = sum(deltas)
    values = torch.linalg.svdvals(merged)
    torch.testing.assert_close(values, torch.full_like(values, float(torch.linalg.svdvals(total).mean())), rtol=1e-7, atol=1e-9)
    # the same singular directions as the sum: merged = c * polar(sum)
    u, _, vt = torch.linalg.svd(total, full_matrices=False)
    torch.testing.assert_close(merged, values[0] * (u @ vt), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(("p", "tasks", "fraction", "expected"), [(768, 8, 0.8, (616, 19)), (10, 3, 0.8, (10 - 3 * 1, 1)),
                                                                   (12, 8, 0.8, (12, 0)), (6, 4, 1.0, (6, 0))])
def test_iso_cts_subspace_sizes_fill_the_matrix(p, tasks, fraction, expected):
    common, per_task = iso_cts.subspace_sizes(p, tasks, fraction)
    assert (common, per_task) == expected and common + tasks * per_task == p


@SETTINGS
@given(seed=st.integers(0, 10_000), tasks=st.integers(1, 4), alpha=st.floats(0.1, 3.0))
def test_iso_cts_with_only_a_common_space_is_iso_c(seed, tasks, alpha):
    g = torch.Generator().manual_seed(seed)
    theta0 = {"w": randn(g, 9, 7), "b": randn(g, 9)}
    deltas = [{"w": randn(g, 9, 7), "b": randn(g, 9)} for _ in range(tasks)]
    common_only = merge_method("iso_cts")(theta0, deltas, IsoCtsParams(common_fraction=1.0, alpha=alpha))
    plain = merge_method("iso_c")(theta0, deltas, IsoCParams(alpha=alpha))
    for key in theta0:
        torch.testing.assert_close(common_only[key], plain[key], rtol=1e-8, atol=1e-9)


def test_iso_cts_spectrum_is_flat_and_spans_common_and_task_directions():
    g = torch.Generator().manual_seed(3)
    deltas = [randn(g, 10, 8) for _ in range(2)]
    merged = iso_cts.merge_matrix(deltas, 0.5)  # p = 8: 4 common, 2 per task
    values = torch.linalg.svdvals(merged)
    assert torch.allclose(values, values[0].expand_as(values), rtol=1e-9)  # full rank, flat
    assert not torch.allclose(merged / values[0], iso_c.merge_matrix(deltas) / torch.linalg.svdvals(iso_c.merge_matrix(deltas))[0])
