"""Iso-C, isotropic merging in the common subspace (Marczak et al., ICML 2025, arXiv 2502.04959).

Per 2-D weight: Delta = sum_t Delta_t = U S V^T  ->  Delta_iso = mean(S) U V^T  (every singular
value replaced by their mean: a flat spectrum over the sum's directions).
Every other tensor: the mean of the task vectors. Merged: theta_0 + alpha * Delta_iso (alpha on
val; the authors search 0 to 3, FusionBench uses 1.5).
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..io import StateDict, specs_of
from ..params_base import Strict
from ..task_vectors import per_tensor
from ._spectral import is_matrix, mean_of


class IsoCParams(Strict):
    alpha: float = Field(default=1.5, gt=0, description="scaling of the merged task vector")


PARAMS = IsoCParams
NEEDS = frozenset()


def merge_matrix(deltas: list[torch.Tensor]) -> torch.Tensor:
    u, s, vt = torch.linalg.svd(sum(d.double() for d in deltas), full_matrices=False)
    return s.mean() * (u @ vt)


def merged_vector(task_vectors: list[StateDict], params=None, inputs=None) -> StateDict:
    specs = {key: (torch.float64, shape) for key, (_, shape) in specs_of(task_vectors[0]).items()}

    def merged(key: str) -> torch.Tensor:
        deltas = [tv[key].double() for tv in task_vectors]
        return merge_matrix(deltas) if is_matrix(specs[key][1]) else mean_of(deltas)

    return per_tensor(specs, merged, task_vectors)
