"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

  trim      T_i^ = T_i on its top-k% entries by |T_i|, 0 elsewhere
  elect     s = sign(sum_i T_i^) per entry; where that sum is exactly 0, the majority sign
            s* = sign(sum over all entries of s)                          (the authors' "majority")
  disjoint  A = {i : T_i^ != 0, sign(T_i^) = s};  tau_m = (1/|A|) sum_{i in A} T_i^   (0 if A empty)
  merge     theta = theta_0 + alpha * tau_m

`trim: global` (the paper and the authors' code, the default) ranks each task vector's entries over
the whole model flattened; `per_tensor` ranks them within each tensor. Exactly ceil(k% of n)
entries are kept (at least one); among equal magnitudes at the threshold the lower flat index wins
(flat order: tensors in theta_0's key order, each row-major). The global threshold is found
without flattening the model: a histogram of the magnitudes' leading bits, then the one bucket
that holds the threshold, so memory stays one tensor's worth. Computed in float64, returned in
theta_0's dtypes.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from ..io import StateDict, specs_of
from ..params_base import Strict
from ..task_vectors import per_tensor


class TiesParams(Strict):
    """TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint mean."""

    k: float = Field(default=20.0, gt=0, le=100, description="percent of each task vector's entries kept, by magnitude")
    trim: Literal["global", "per_tensor"] = Field(default="global", description="rank entries over the whole task vector (as published) or per tensor")
    alpha: float = Field(default=1.0, gt=0, description="scaling of the merged task vector")


PARAMS = TiesParams
NEEDS = frozenset()
BUCKET_SHIFT = 48  # float64 bits >> 48: sign, exponent and 4 mantissa bits -> 32768 buckets for |x|


def kept_count(k: float, numel: int) -> int:
    """ceil(k% of numel), at least 1: rounding up means a small tensor (or a small k) still keeps
    its largest entry. Rounded to 9 decimals first, so 16.1% of 1000 is 161 and not ceil(161.00000000000003)."""
    return min(numel, max(1, math.ceil(round(k * numel / 100.0, 9))))


def trim(delta: torch.Tensor, k: float) -> torch.Tensor:
    """The top-k% entries of `delta` by magnitude (ties at the threshold: the lower flat index)."""
    flat = delta.reshape(-1)
    order = torch.sort(flat.abs(), descending=True, stable=True).indices[: kept_count(k, flat.numel())]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.reshape(delta.shape)


def _buckets(magnitudes: torch.Tensor) -> torch.Tensor:
    return magnitudes.double().reshape(-1).view(torch.int64) >> BUCKET_SHIFT  # monotone in |x| >= 0


def global_thresholds(task_vector, keys: list[str], k: float) -> dict[str, tuple[float, int]]:
    """Per tensor of one task vector, (t, q): the global top-k% keeps its entries with |x| > t and
    the first q (in flat order) with |x| == t. Two reads of each tensor, one tensor at a time."""
    total = sum(task_vector[key].numel() for key in keys)
    wanted = kept_count(k, total)
    counts = torch.zeros(1 << (64 - BUCKET_SHIFT - 1), dtype=torch.int64)
    for key in keys:
        counts += torch.bincount(_buckets(task_vector[key].abs()), minlength=counts.numel())
    above = torch.flip(torch.cumsum(torch.flip(counts, [0]), 0), [0])  # entries in this bucket or higher
    bucket = int((above >= wanted).nonzero().max())  # the threshold's bucket
    higher = int(above[bucket] - counts[bucket])  # kept for sure: every entry of a higher bucket
    inside = torch.cat([task_vector[key].double().abs().reshape(-1)[_buckets(task_vector[key].abs()) == bucket] for key in keys])
    threshold = float(torch.sort(inside, descending=True).values[wanted - higher - 1])
    quota = wanted - higher - int((inside > threshold).sum())  # entries equal to the threshold still to keep
    out = {}
    for key in keys:
        equal = int((task_vector[key].double().abs() == threshold).sum())
        out[key] = (threshold, min(quota, equal))
        quota -= out[key][1]
    return out


def trim_at(delta: torch.Tensor, threshold: float, quota: int) -> torch.Tensor:
    """`delta` on its entries with |x| > threshold and the first `quota` with |x| == threshold."""
    magnitude = delta.abs()
    keep = magnitude > threshold
    if quota:
        equal = (magnitude == threshold).reshape(-1)
        first = equal.nonzero().reshape(-1)[:quota]
        keep = keep.reshape(-1).clone()
        keep[first] = True
        keep = keep.reshape(delta.shape)
    return torch.where(keep, delta, torch.zeros_like(delta))


def disjoint_mean(trimmed: torch.Tensor, majority: float) -> torch.Tensor:
    """Elect, then average the entries that agree; `trimmed` is (tasks, ...)."""
    elected = torch.sign(trimmed.sum(dim=0))
    elected = torch.where(elected == 0, torch.full_like(elected, majority), elected)
    agree = (trimmed != 0) & (torch.sign(trimmed) == elected)
    count = agree.sum(dim=0)
    total = torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(dim=0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def merged_vector(task_vectors: list[StateDict], params, inputs=None) -> StateDict:
    """tau_m (independent of alpha); `params` is a TiesParams."""
    keys = list(specs_of(task_vectors[0]))
    if params.trim == "global":
        limits = [global_thresholds(tv, keys, params.k) for tv in task_vectors]

        def trimmed(key: str) -> torch.Tensor:
            return torch.stack([trim_at(tv[key].double(), *limit[key]) for tv, limit in zip(task_vectors, limits)])
    else:

        def trimmed(key: str) -> torch.Tensor:
            return torch.stack([trim(tv[key].double(), params.k) for tv in task_vectors])

    # the majority sign is the whole model's: one more pass, summing each entry's elected sign
    votes = sum(float(torch.sign(trimmed(key).sum(dim=0)).sum()) for key in keys)
    majority = math.copysign(1.0, votes) if votes else 0.0  # no majority: such entries elect no sign
    specs = {key: (torch.float64, shape) for key, (_, shape) in specs_of(task_vectors[0]).items()}
    return per_tensor(specs, lambda key: disjoint_mean(trimmed(key), majority), task_vectors)
