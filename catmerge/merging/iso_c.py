"""Iso-C, isotropic merging in the common subspace (Marczak et al., ICML 2025, arXiv 2502.04959).

Per 2-D weight: Delta = sum_t Delta_t = U S V^T  ->  Delta_iso = mean(S) U V^T  (every singular
value replaced by their mean: a flat spectrum over the sum's directions). U V^T is Delta's polar
factor, computed from the eigendecomposition of its smaller Gram matrix (_spectral.py).
Every other tensor: the mean of the task vectors. Merged: theta_0 + alpha * Delta_iso (alpha on
val; the authors search 0 to 3, FusionBench uses 1.5).
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..io import StateDict
from ..params_base import Strict
from ._spectral import per_matrix, polar_and_singular_values


class IsoCParams(Strict):
    alpha: float = Field(default=1.5, gt=0, description="scaling of the merged task vector")


PARAMS = IsoCParams
NEEDS = frozenset()


def merge_matrix(deltas: list[torch.Tensor]) -> torch.Tensor:
    direction, s = polar_and_singular_values(sum(d.double() for d in deltas))
    return s.mean() * direction


def merged_vector(task_vectors: list[StateDict], params=None, inputs=None) -> StateDict:
    return per_matrix(task_vectors, merge_matrix)
