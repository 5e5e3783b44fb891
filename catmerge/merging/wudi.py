"""WUDI-Merging, "Whoever Started the Interference Should End It" (Cheng et al., ICML 2025,
arXiv 2503.08099): data-free, no scaling coefficient.

Per 2-D weight, for T tasks with updates tau_i (m x n, rows = outputs, columns = inputs), the
merged update tau minimises the interference each task's own update predicts on its inputs,

  L(tau) = sum_i ||(tau - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2,

by `iterations` steps of Adam (Kingma & Ba; betas 0.9, 0.999, eps 1e-8, no weight decay: torch's
defaults, as the authors' and FusionBench's code use) with learning rate `lr`, from the sum
tau = sum_i tau_i (Task Arithmetic at alpha 1). Every other tensor (biases, norms, conv kernels,
scalars): the mean of the task vectors. Merged: theta_0 + alpha * tau with alpha 1 (WUDI has no
scaling; the authors' and FusionBench's code add tau as it is); alpha is exposed only so that the
method fits the merged_vector interface, and any other value leaves the published method.

The loss is quadratic, so its gradient is affine in tau and is computed in closed form:
  grad L(tau) = 2 sum_i (tau - tau_i) G_i / s_i,   G_i = tau_i^T tau_i (n x n), s_i = ||tau_i||_F^2
              = g_0 + D A2,   D = tau - sum_i tau_i,   A2 = 2 sum_i G_i / s_i,
              g_0 = 2 sum_i (sum_{j != i} tau_j) tau_i^T tau_i / s_i   (the gradient at the start).
(L is a convex quadratic: where sum_i G_i / s_i is invertible its minimiser is
tau* = (sum_i tau_i G_i / s_i)(sum_i G_i / s_i)^-1, RegMean's formula with the task vectors' own
Grams for the inputs'. Adam moves each entry by about lr per step, so the published budget is an
early stop on the way there: lr and iterations are part of the method.)
A2 and g_0 are built once; each Adam step is then one (m x n)(n x n) product (torch.addmm) and
one pass of torch's fused Adam kernel over m x n (from FUSED_FROM entries), instead of autograd's
2T products of (m x n)(n x m) forward, as many backward, and Adam's unfused elementwise passes.
What bounds the cost, per matrix: 2 m n^2 (iterations + T) flops of products (the steps, and A2),
plus at most 4 T m n min(m, n) for g_0, plus the Adam pass per step; memory: the T updates, A2
(n x n) and four m x n buffers (D, its gradient, Adam's two moments). Nothing is truncated or
approximated. Measured: 768 x 768 with 8 tasks, 400 steps, about 19 s on 2 cores shared with a
load of 5.6 (47 ms a step while one 768^3 float64 product took 25 ms; autograd's step: 617 ms).

Defaults: lr 1e-5 and 400 iterations, FusionBench 0.2.33's shipped configuration
(`method/wudi/wudi.yaml`: iter_num 400; lr 1e-5 fixed in its code; its function's default is
300). The authors' released RoBERTa script (nathanielyvo/WUDI-Merging, nlp_roberta/lamassu.py)
runs 300 steps at lr 2e-5; their ViT script and the paper's text could not be read here.
Computed in float64 like catmerge's other methods (the authors and FusionBench run in the
checkpoints' dtype, float32, on a GPU; on float32 task vectors the two agree to about 1e-6 of the
largest entry after 400 steps), deterministic on the CPU: no randomness, a fixed order of
operations.

Where this differs from the authors' code: a task whose update of a weight is exactly 0 (a frozen
weight) has a loss term 0/0 there (FusionBench gets NaN everywhere in that weight); here it adds
nothing to the loss, and stays in the (unchanged) starting sum.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..io import StateDict, specs_of
from ..params_base import Strict
from ..task_vectors import per_tensor
from ._spectral import is_matrix, mean_of

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # Adam's (torch's defaults, which the authors use)
# Weights this large use torch's fused Adam kernel: 2.5 to 6 times faster per step than the plain
# path at 256 x 256 and up (2 cores); on tiny ones its parallel region alone costs more than the
# step on a busy machine (ms). Both are torch's Adam; they differ by rounding (~1e-17 per step).
FUSED_FROM = 4096


class WudiParams(Strict):
    alpha: float = Field(default=1.0, gt=0, description="scaling of the merged task vector; WUDI as published has none (1.0)")
    iterations: int = Field(default=400, ge=0, description="Adam steps per 2-D weight (0: the sum of the task vectors)")
    lr: float = Field(default=1e-5, gt=0, description="Adam's learning rate")


PARAMS = WudiParams
NEEDS = frozenset()


def loss(tau: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
    """L(tau) = sum_i ||(tau - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2 (tasks with tau_i = 0 left out)."""
    total = tau.new_zeros(())
    for d in deltas:
        s = d.square().sum()
        if s > 0:
            total = total + ((tau - d) @ d.T).square().sum() / s
    return total


def gradient_terms(deltas: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tau_0, g_0, A2): the start tau_0 = sum_i tau_i, the gradient there and the fixed matrix, so
    that grad L(tau_0 + D) = g_0 + D @ A2. Float64."""
    deltas = [d.double() for d in deltas]
    m, n = deltas[0].shape
    start = deltas[0].clone()
    for d in deltas[1:]:
        start += d
    g0 = start.new_zeros(m, n)
    a2 = start.new_zeros(n, n)
    for d in deltas:
        s = float(d.square().sum())
        if s == 0.0:
            continue
        others = start - d  # sum_{j != i} tau_j: what interferes with task i
        if m <= n:
            a2.addmm_(d.T, d, alpha=2.0 / s)
            g0.addmm_(others @ d.T, d, alpha=2.0 / s)  # (others tau_i^T) tau_i: 4 m^2 n
        else:
            gram = d.T @ d
            a2.add_(gram, alpha=2.0 / s)
            g0.addmm_(others, gram, alpha=2.0 / s)  # others (tau_i^T tau_i): 2 m n^2 more
    return start, g0, a2


def gradient(tau: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
    """grad L(tau) in closed form (float64)."""
    start, g0, a2 = gradient_terms(deltas)
    return torch.addmm(g0, tau.double() - start, a2)


def merge_matrix(deltas: list[torch.Tensor], iterations: int = 400, lr: float = 1e-5) -> torch.Tensor:
    """tau after `iterations` Adam steps on L from sum_i tau_i (float64)."""
    start, g0, a2 = gradient_terms(deltas)
    moved = torch.zeros_like(start)  # D = tau - tau_0, kept apart so that rounding stays at D's scale
    moved.grad = torch.empty_like(start)
    # torch's Adam; from FUSED_FROM entries its fused CPU kernel, the whole update in one
    # elementwise pass (one parallel region, not one per op; below, the plain path never goes parallel)
    adam = torch.optim.Adam([moved], lr=lr, betas=(BETA1, BETA2), eps=EPS, fused=moved.numel() >= FUSED_FROM)
    for _ in range(iterations):
        torch.addmm(g0, moved, a2, out=moved.grad)
        adam.step()
    return start + moved


def merged_vector(task_vectors: list[StateDict], params=None, inputs=None) -> StateDict:
    params = params or WudiParams()
    specs = {key: (torch.float64, shape) for key, (_, shape) in specs_of(task_vectors[0]).items()}

    def merged(key: str) -> torch.Tensor:
        deltas = [tv[key].double() for tv in task_vectors]
        return merge_matrix(deltas, params.iterations, params.lr) if is_matrix(specs[key][1]) else mean_of(deltas)

    return per_tensor(specs, merged, task_vectors)
