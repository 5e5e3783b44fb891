"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge. Per tensor:

  trim      T_i^ = T_i on its top-k% entries by |T_i|, 0 elsewhere
  elect     s = sign(sum_i T_i^)                                   (the sign of the total mass)
  disjoint  A = {i : T_i^ != 0, sign(T_i^) = s};  tau_m = (1/|A|) sum_{i in A} T_i^   (0 if A empty)
  merge     theta = theta_0 + alpha * tau_m

Computed in float64, returned in theta_0's dtypes.
"""

from __future__ import annotations

import math

import torch

from ..io import StateDict, specs_of
from ..task_vectors import apply_task_vector, per_tensor


def kept_count(k: float, numel: int) -> int:
    """ceil(k% of numel), at least 1: rounding up means a small tensor (or a small k) still keeps
    its largest entry. Rounded to 9 decimals first, so 16.1% of 1000 is 161 and not ceil(161.00000000000003)."""
    return min(numel, max(1, math.ceil(round(k * numel / 100.0, 9))))


def trim(delta: torch.Tensor, k: float) -> torch.Tensor:
    """The top-k% entries of `delta` by magnitude. Exactly kept_count entries survive: among equal
    magnitudes at the threshold the lower flat index wins (a stable descending sort keeps index order)."""
    flat = delta.reshape(-1)
    order = torch.sort(flat.abs(), descending=True, stable=True).indices[: kept_count(k, flat.numel())]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.reshape(delta.shape)


def merge_tensor(deltas: list[torch.Tensor], k: float) -> torch.Tensor:
    trimmed = torch.stack([trim(d.double(), k) for d in deltas])
    # An exact tie of the mass (sign 0) elects no sign: no task agrees and the entry stays theta_0.
    elected = torch.sign(trimmed.sum(dim=0))
    agree = (trimmed != 0) & (torch.sign(trimmed) == elected)
    count = agree.sum(dim=0)
    total = torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(dim=0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def merged_vector(task_vectors: list[StateDict], params) -> StateDict:
    """tau_m (independent of alpha); `params` is a TiesParams (k: percent kept per tensor and task)."""
    specs = {key: (torch.float64, shape) for key, (_, shape) in specs_of(task_vectors[0]).items()}
    return per_tensor(specs, lambda key: merge_tensor([tv[key] for tv in task_vectors], params.k), task_vectors)


def merge(pretrained: StateDict, task_vectors: list[StateDict], params) -> StateDict:
    return apply_task_vector(pretrained, merged_vector(task_vectors, params), params.alpha)
