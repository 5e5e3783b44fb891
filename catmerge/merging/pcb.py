"""PCB-Merging (Du et al., NeurIPS 2024, arXiv 2410.02396): parameter competition balancing.
For N task vectors, per tensor (flattened to its d entries):

  intra    beta_intra_i = Softmax(N * Norm(tau_i . tau_i))
  inter    beta_inter_i = sum_{j=1..N} Softmax(Norm(tau_i . tau_j))          (j = i included)
  PCB      beta_i = beta_intra_i . beta_inter_i
  drop     beta^_i = beta_i on all but its floor(r d) lowest entries, 0 there  (r = drop_ratio)
           beta^_i <- beta^_i / max(beta^_i)                                    (per task, see below)
  rescale  tau_m = sum_i (beta^_i . tau_i) / sum_i beta^_i                     (0 where the sum is 0)
  merge    theta = theta_0 + alpha * tau_m

From the paper: the four formulas, N as the intra temperature, the j = i term, and a drop of the
ratio r of lowest scores per task vector. Chosen here (the formulas leave them open):
  - the unit is one tensor, not the whole model: Norm, Softmax and the drop run over its entries;
  - Norm is min-max scaling to [0, 1] over those entries (0 everywhere for a constant tensor);
  - Softmax is over those entries, so each Softmax sums to 1 over the tensor;
  - the drop removes exactly floor(r d) entries (so one always stays, r < 1); among equal scores
    the higher flat index goes first (a stable descending sort keeps the lower index);
  - each task's kept scores are divided by their maximum before the weighted average. A softmax
    over a tensor's entries divides task i's scores by a sum that belongs to task i alone, which
    would weigh whole tasks against each other at every entry; after this scaling that sum
    cancels, and each task's most important entry has weight 1 (the authors' release also scales
    each task's scores to [0, 1] after the drop).
Computed in float64, returned in theta_0's dtypes.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from ..io import StateDict, specs_of
from ..params_base import Strict
from ..task_vectors import per_tensor


class PcbParams(Strict):
    """PCB-Merging (Du et al., NeurIPS 2024): intra- and inter-task balancing, drop, rescale."""

    drop_ratio: float = Field(default=0.9, ge=0, lt=1, description="fraction of each task vector's entries dropped, lowest balance first")
    alpha: float = Field(default=1.0, gt=0, description="scaling of the merged task vector")


PARAMS = PcbParams
NEEDS = frozenset()


def norm(x: torch.Tensor) -> torch.Tensor:
    low, high = x.min(), x.max()
    return (x - low) / (high - low) if high > low else torch.zeros_like(x)


def balance(taus: torch.Tensor) -> torch.Tensor:
    """beta (N, d) for task vectors `taus` (N, d)."""
    n = taus.shape[0]
    intra = torch.stack([torch.softmax(n * norm(t * t), dim=0) for t in taus])
    inter = torch.stack([sum(torch.softmax(norm(ti * tj), dim=0) for tj in taus) for ti in taus])
    return intra * inter


def drop(beta: torch.Tensor, ratio: float) -> torch.Tensor:
    """beta with each row's floor(ratio d) lowest entries set to 0 (ties: the higher index drops)."""
    d = beta.shape[1]
    # Rounded first so that 0.29 of 100 entries drops 29 and not floor(28.999999999999996).
    dropped = math.floor(round(ratio * d, 9))
    order = torch.sort(beta, dim=1, descending=True, stable=True).indices
    kept = torch.zeros_like(beta, dtype=torch.bool).scatter_(1, order[:, : d - dropped], True)
    return torch.where(kept, beta, torch.zeros_like(beta))


def scaled(beta: torch.Tensor) -> torch.Tensor:
    """Each row divided by its maximum (rows of zeros stay zero)."""
    top = beta.max(dim=1, keepdim=True).values
    return beta / torch.where(top > 0, top, torch.ones_like(top))


def merge_tensor(deltas: list[torch.Tensor], ratio: float) -> torch.Tensor:
    taus = torch.stack([d.double().reshape(-1) for d in deltas])
    beta = scaled(drop(balance(taus), ratio))
    weight = beta.sum(dim=0)
    merged = (beta * taus).sum(dim=0) / torch.where(weight > 0, weight, torch.ones_like(weight))
    return merged.reshape(deltas[0].shape)


def merged_vector(task_vectors: list[StateDict], params, inputs=None) -> StateDict:
    """tau_m (independent of alpha); `params` is a PcbParams (drop_ratio: fraction dropped per tensor and task)."""
    specs = {key: (torch.float64, shape) for key, (_, shape) in specs_of(task_vectors[0]).items()}
    return per_tensor(specs, lambda key: merge_tensor([tv[key] for tv in task_vectors], params.drop_ratio), task_vectors)

