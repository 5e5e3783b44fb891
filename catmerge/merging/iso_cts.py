"""Iso-CTS, isotropic merging in common and task-specific subspaces (Marczak et al., ICML 2025,
arXiv 2502.04959).

Per 2-D weight (m x n, p = min(m, n)), T tasks, common fraction f:
  sizes     s = round((p - floor(f p)) / T)  directions per task,  k = p - T s  common ones
  common    U_c S_c V_c^T = the top k singular triplets of sum_t Delta_t
  specific  per task: Delta_t' = Delta_t - U_c U_c^T Delta_t, its top s singular triplets
  combine   U~ = [U_c, U'_1 ... U'_T], V~ likewise, S~ = [S_c, S'_1 ... S'_T]
            U^ = polar(U~), V^ = polar(V~), every singular value set to mean(S~)
  Delta     = mean(S~) U^ V^^T
Every other tensor: the mean of the task vectors. Merged: theta_0 + alpha * Delta. The rounding
of s follows the authors' code (Python's round: halves to even).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from ..io import StateDict
from ..params_base import Strict
from ._spectral import mean_of, per_matrix, polar, top_singular, top_singular_off_columns


class IsoCtsParams(Strict):
    common_fraction: float = Field(default=0.8, gt=0, le=1, description="share of the directions given to the common subspace")
    alpha: float = Field(default=1.5, gt=0, description="scaling of the merged task vector")


PARAMS = IsoCtsParams
NEEDS = frozenset()


def subspace_sizes(p: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common directions k, directions per task s), k + tasks * s = p."""
    per_task = round((p - math.floor(p * common_fraction)) / tasks)
    return p - per_task * tasks, per_task


def merge_matrix(deltas: list[torch.Tensor], common_fraction: float) -> torch.Tensor:
    deltas = [d.double() for d in deltas]
    p = min(deltas[0].shape)
    common, per_task = subspace_sizes(p, len(deltas), common_fraction)
    if common < 0:  # more tasks than directions: no common space fits
        return mean_of(deltas)
    u, s, v = top_singular(sum(deltas), common)
    us, ss, vs = [u], [s], [v]
    for d in deltas:
        ut, st, vt = top_singular_off_columns(d, u, per_task)  # of d - u u^T d
        us.append(ut)
        ss.append(st)
        vs.append(vt)
    return torch.cat(ss).mean() * (polar(torch.cat(us, dim=1)) @ polar(torch.cat(vs, dim=1)).T)


def merged_vector(task_vectors: list[StateDict], params, inputs=None) -> StateDict:
    return per_matrix(task_vectors, lambda deltas: merge_matrix(deltas, params.common_fraction))
