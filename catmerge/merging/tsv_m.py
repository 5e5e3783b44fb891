"""TSV-M, Task Singular Vectors merging (Gargiulo et al., CVPR 2025, arXiv 2412.00081).

Per 2-D weight, for T tasks with updates Delta_t = U_t S_t V_t^T (m x n):
  r        = floor(min(m, n) / T)                      each task's share of the directions
  stack    U~ = [U_1[:, :r] ... U_T[:, :r]],  S~ = [S_1[:r] ... S_T[:r]],  V~ likewise
  decorrelate  U^ = polar(U~),  V^ = polar(V~)          (U~ = P Sigma Q^T -> P Q^T)
  Delta    = U^ diag(S~) V^^T
Every other tensor: the mean of the task vectors. Merged: theta_0 + alpha * Delta (the authors
choose alpha on val; FusionBench uses 1.0). Only each task's top r singular triplets are computed.
When T > min(m, n) (r = 0), the weight gets the mean too.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..io import StateDict
from ..params_base import Strict
from ._spectral import mean_of, per_matrix, polar, top_singular


class TsvMParams(Strict):
    alpha: float = Field(default=1.0, gt=0, description="scaling of the merged task vector")


PARAMS = TsvMParams
NEEDS = frozenset()


def merge_matrix(deltas: list[torch.Tensor]) -> torch.Tensor:
    m, n = deltas[0].shape
    r = min(m, n) // len(deltas)
    if r == 0:
        return mean_of(deltas)
    us, ss, vs = zip(*(top_singular(d, r) for d in deltas))
    u, s, v = polar(torch.cat(us, dim=1)), torch.cat(ss), polar(torch.cat(vs, dim=1))
    return (u * s) @ v.T


def merged_vector(task_vectors: list[StateDict], params=None, inputs=None) -> StateDict:
    return per_matrix(task_vectors, merge_matrix)
