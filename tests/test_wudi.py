"""WUDI-Merging (catmerge/merging/wudi.py): the closed-form gradient against autograd, the Adam
loop against torch's Adam on the autograd loss, and properties the objective implies."""

from __future__ import annotations

import pytest
import torch

import catmerge
from catmerge.merging import merge_method, method_module
from catmerge.merging.wudi import FUSED_FROM, WudiParams, gradient, loss, merge_matrix, merged_vector
from catmerge.params_base import ParamsError

F64 = torch.float64


def randn(g, *shape, scale=1.0):
    return scale * torch.randn(shape, generator=g, dtype=F64)


def updates(seed: int, tasks: int, m: int, n: int, scale: float = 0.05) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [randn(g, m, n, scale=scale * (1 + t)) for t in range(tasks)]


def reference(deltas: list[torch.Tensor], iterations: int, lr: float) -> torch.Tensor:
    """The objective as written, differentiated by autograd, stepped by torch.optim.Adam."""
    tau = torch.nn.Parameter(sum(deltas).clone())
    optimizer = torch.optim.Adam([tau], lr=lr)
    for _ in range(iterations):
        optimizer.zero_grad()
        loss(tau, deltas).backward()
        optimizer.step()
    return tau.detach()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(("m", "n", "tasks"), [(7, 11, 3), (11, 7, 4), (9, 9, 1), (5, 30, 2)])
def test_closed_form_gradient_is_autograds(m, n, tasks):
    """Both branches (m <= n: (R tau_i^T) tau_i; m > n: R (tau_i^T tau_i)), away from the start."""
    deltas = updates(m * n + tasks, tasks, m, n)
    for tau in (sum(deltas), randn(torch.Generator().manual_seed(1), m, n, scale=0.1)):
        tau = tau.clone().requires_grad_(True)
        loss(tau, deltas).backward()
        torch.testing.assert_close(gradient(tau.detach(), deltas), tau.grad, rtol=1e-11, atol=1e-14)


def test_a_task_with_a_zero_update_adds_nothing():
    """A weight one expert did not change: its term is 0/0 in the objective; it is left out, and
    the merge is the other tasks' merge, bit for bit."""
    deltas = updates(3, 3, 6, 8)
    with_zero = deltas[:1] + [torch.zeros(6, 8, dtype=F64)] + deltas[1:]
    assert torch.equal(merge_matrix(with_zero, 50, 1e-3), merge_matrix(deltas, 50, 1e-3))
    tau = randn(torch.Generator().manual_seed(2), 6, 8).requires_grad_(True)
    loss(tau, with_zero).backward()
    torch.testing.assert_close(gradient(tau.detach(), with_zero), tau.grad, rtol=1e-11, atol=1e-14)
    assert torch.equal(merge_matrix([torch.zeros(3, 4, dtype=F64)] * 2, 10, 1e-3), torch.zeros(3, 4, dtype=F64))


@pytest.mark.parametrize(("m", "n", "iterations", "lr"), [(10, 8, 400, 1e-5), (10, 8, 60, 1e-3), (64, 64, 20, 1e-3)])
def test_adam_steps_are_torchs_adam_on_the_autograd_loss(m, n, iterations, lr):
    """64 x 64 reaches FUSED_FROM: torch's fused Adam kernel, the same steps to rounding."""
    assert (m * n >= FUSED_FROM) == (m == 64)
    deltas = updates(4, 3, m, n)
    ours, theirs = merge_matrix(deltas, iterations, lr), reference(deltas, iterations, lr)
    assert rel(ours, theirs) < 1e-10
    assert rel(ours, sum(deltas)) > 1e-3  # it moved


def test_loss_decreases():
    deltas = updates(5, 4, 12, 9)
    start = float(loss(sum(deltas), deltas))
    at_default = float(loss(merge_matrix(deltas), deltas))
    assert at_default < 0.99 * start
    losses = [float(loss(merge_matrix(deltas, k, 1e-3), deltas)) for k in (0, 20, 100, 400)]
    assert losses[0] == start and losses == sorted(losses, reverse=True) and losses[-1] < 0.5 * start


@pytest.mark.parametrize(("m", "n", "tasks"), [(10, 6, 3), (6, 10, 3)])
def test_enough_steps_reach_the_closed_form_minimiser(m, n, tasks):
    """L is a convex quadratic: its minimiser solves tau A = B, A = sum_i G_i / s_i,
    B = sum_i tau_i G_i / s_i (RegMean's formula with the task vectors' own Grams in place of the
    inputs'); invertible when T m >= n. The published budget (400 steps of 1e-5) is an early stop
    on the way there; many larger steps arrive."""
    deltas = updates(6, tasks, m, n)
    a = sum(d.T @ d / d.square().sum() for d in deltas)
    b = sum(d @ d.T @ d / d.square().sum() for d in deltas)
    minimiser = torch.linalg.solve(a, b.T).T
    start = sum(deltas)
    assert float((merge_matrix(deltas) - minimiser).norm()) < float((start - minimiser).norm())
    assert float((merge_matrix(deltas, 3000, 1e-3) - minimiser).norm()) < 1e-3 * float((start - minimiser).norm())


def test_one_task_is_that_task():
    """With one task the start is its own update, where the loss and its gradient are exactly 0:
    Adam takes steps of 0 and the merge is the expert."""
    deltas = updates(7, 1, 9, 5)
    for iterations, lr in ((400, 1e-5), (100, 1e-2)):
        assert torch.equal(merge_matrix(deltas, iterations, lr), deltas[0])
    theta0 = {"w": randn(torch.Generator().manual_seed(8), 9, 5), "b": torch.ones(9, dtype=F64)}
    tv = {"w": deltas[0], "b": torch.full((9,), 0.25, dtype=F64)}
    out = merge_method("wudi")(theta0, [tv], WudiParams())
    assert all(torch.equal(out[k], theta0[k] + tv[k]) for k in theta0)


def test_updates_on_orthogonal_inputs_merge_to_their_sum():
    """Tasks whose updates read mutually orthogonal input directions (row spaces; here disjoint
    input columns) do not interfere: (tau - tau_i) tau_i^T = sum_{j != i} tau_j tau_i^T = 0 at the
    start, the gradient is exactly 0, and WUDI is Task Arithmetic at alpha 1. Rotating the inputs
    (tau_i Q) leaves rounding-level gradients, which Adam's normalisation (by sqrt(v) + eps) blows
    up to a jitter below lr, not beyond. Orthogonal outputs are not enough: updates on disjoint
    rows that read the same inputs do interfere, and WUDI moves them."""
    g = torch.Generator().manual_seed(9)
    m, n, tasks = 8, 12, 3
    deltas = []
    for t in range(tasks):
        d = torch.zeros(m, n, dtype=F64)
        d[:, 4 * t:4 * (t + 1)] = randn(g, m, 4, scale=0.1)
        deltas.append(d)
    assert float(loss(sum(deltas), deltas)) == 0.0
    assert torch.equal(merge_matrix(deltas, 200, 1e-3), sum(deltas))
    q, _ = torch.linalg.qr(randn(g, n, n))
    rotated = [d @ q for d in deltas]
    for iterations, lr in ((200, 1e-3), (400, 1e-5)):
        assert float((merge_matrix(rotated, iterations, lr) - sum(rotated)).abs().max()) < lr
    rows = []
    for t in range(tasks):
        d = torch.zeros(m, n, dtype=F64)
        d[2 * t:2 * (t + 1)] = randn(g, 2, n, scale=0.1)
        rows.append(d)
    assert float(loss(sum(rows), rows)) > 0 and rel(merge_matrix(rows, 200, 1e-3), sum(rows)) > 1e-2


def test_other_tensors_are_averaged_and_zero_iterations_is_the_sum():
    g = torch.Generator().manual_seed(10)
    shapes = {"w": (6, 5), "b": (6,), "k": (2, 3, 2, 2), "s": ()}
    tvs = [{k: randn(g, *s, scale=0.1) for k, s in shapes.items()} for _ in range(3)]
    out = merged_vector(tvs, WudiParams(iterations=0))
    assert all(v.dtype == F64 for v in out.values())
    torch.testing.assert_close(out["w"], sum(tv["w"] for tv in tvs), rtol=0, atol=1e-15)
    for key in ("b", "k", "s"):
        torch.testing.assert_close(out[key], sum(tv[key] for tv in tvs) / 3, rtol=0, atol=1e-15)
    assert not torch.equal(merged_vector(tvs, WudiParams())["w"], out["w"])


def test_deterministic_bytes():
    g = torch.Generator().manual_seed(11)
    tvs = [{"a": randn(g, 40, 24, scale=0.02), "b": randn(g, 64, 80, scale=0.02), "c": randn(g, 24, scale=0.02)} for _ in range(4)]
    params = WudiParams(iterations=30)  # "b" takes the fused Adam kernel, "a" the plain path
    first, second = merged_vector(tvs, params), merged_vector(tvs, params)
    assert all(first[k].numpy().tobytes() == second[k].numpy().tobytes() for k in first)


def test_registry_params_and_library_call():
    module = method_module("wudi")
    assert module.NEEDS == frozenset() and module.PARAMS is WudiParams
    defaults = WudiParams()
    assert (defaults.alpha, defaults.iterations, defaults.lr) == (1.0, 400, 1e-5)
    for bad in ({"iterations": -1}, {"lr": 0.0}, {"alpha": 0.0}, {"iterations": 1.5}, {"nope": 1}):
        with pytest.raises(ValueError):
            WudiParams(**bad)
    g = torch.Generator().manual_seed(12)
    theta0 = {"w": randn(g, 6, 4).float(), "b": randn(g, 6).float()}
    experts = {t: {k: v + randn(g, *v.shape, scale=0.05).float() for k, v in theta0.items()} for t in "abc"}
    out = catmerge.merge("wudi", theta0, experts, iterations=50)
    assert set(out) == set(theta0) and all(out[k].dtype == torch.float32 for k in out)
    assert not torch.equal(out["w"], catmerge.merge("wudi", theta0, experts, iterations=0)["w"])
    with pytest.raises(ParamsError, match=r"wudi.lr = -1.0"):
        catmerge.merge("wudi", theta0, experts, lr=-1.0)
