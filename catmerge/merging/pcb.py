"""PCB-Merging (Du et al., NeurIPS 2024, arXiv 2410.02396): parameter competition balancing.

Follows the authors' release (github.com/duguodong7/pcb-merging, `pcb-merging.py`, which its
README names as the method; `nlp_source_code/utils/merge_utils.py`'s `task_para_att_merge` is the
same function). For N task vectors tau_i, each flattened over the WHOLE model (every
floating-point tensor; D entries), with c = clip_ratio, q = drop_ratio:

  clip     lo_i, hi_i = the floor(cD)-th and (floor((1-c)D) - 1)-th smallest |tau_i| (0-based)
           a_i = clamp(|tau_i|, lo_i, hi_i);  t_i = sign(tau_i) a_i      (the merged values)
           nu_i = (a_i - lo_i) / (hi_i - lo_i)                            (min-max of a_i, in [0, 1])
  intra    exp(N nu_i^2)
  inter    sum            tanh(tau_i . sum_j tau_j)                       (pcb-merging.py; unclipped tau)
           normalized_sum tanh(tau_i . sum_j sign(tau_j) nu_j)            (vision_source_code/pcb.py)
           pairwise       sum_j tanh(sign(tau_i) nu_i . sign(tau_j) nu_j) (vision_source_code/pcb_ES.py)
  score    s_i = intra_i . inter_i                                        (signed)
  drop     k_i = the floor(qD)-th smallest s_i, m_i = max s_i
           w_i = (clamp(s_i, k_i, m_i) - k_i) / (m_i - k_i)               (0 at and below k_i, 1 at the top)
  rescale  tau_m = sum_i w_i t_i / max(sum_i w_i, 1e-12)
  merge    theta = theta_0 + alpha tau_m

The release keeps the top pcb_ratio of the scores; drop_ratio = 1 - pcb_ratio. It scales each task
by its own lambda_i inside the weighted average (tau_m = sum_i w_i lambda_i t_i / sum_i w_i), with
lambda_i = 1.2 for all eight ViT-B/32 tasks in `vision_source_code/pcb.py` (or searched per task by
an evolution strategy in [0.8, 1.3], `pcb_ES.py`); with one lambda for all tasks that is
theta_0 + lambda tau_m, so alpha here is that lambda (the NLP code's non-ES path is literally
theta_0 + lambda tau_m over a lambda grid). Defaults: pcb-merging.py's c = 0.0001 and its script's
pcb_ratio = 0.05 (q = 0.95) and lambda = 1.2; the two vision scripts clip with c = 0.01.

Where the paper and the release disagree (the paper's equations, Sec. 3, as catmerge's earlier
reading quoted them; the paper's full text could not be read where this was written):
  - intra: the paper has Softmax(N Norm(tau_i . tau_i)); the code has exp(N Norm(|tau_i|)^2): no
    softmax denominator, and Norm is taken of |tau| (after clipping) before squaring;
  - inter: the paper has sum_j Softmax(Norm(tau_i . tau_j)); the code's three forms above use tanh,
    pcb-merging.py of the raw product with the summed task vectors, so the score is negative where
    tau_i disagrees with the sum and such entries drop first;
  - the code clips each task vector's magnitudes to its [c, 1 - c] quantiles before everything and
    merges the clipped values; the paper does not mention it;
  - drop: the paper zeroes the scores below the (1 - r)D-th sorted value and keeps the others as
    they are; the code raises them to that value and min-max normalises, so the weights are the
    scores' excess over the threshold divided by the maximum's (the threshold entry itself gets 0);
  - the final scale: the paper writes theta_0 + lambda tau_m; the code scales each task vector.
  Both flatten the whole model (the paper's D is the model's parameter count). Not implemented:
  the release's per-task lambda_i (one alpha here) and a magnitude mask commented out in
  vision_source_code/pcb.py ("if there is a validation dataset").

catmerge's earlier reading of the paper's equations, per tensor (Softmax over a tensor's entries,
the floor(q d) lowest scores dropped, the kept scores divided by their maximum), is gone: on the
demo benchmark its best validation average was 50.7 (test 50.5) against the release's 54.3
(test 54.2); the release's other inter forms scored 53.7 (normalized_sum) and 53.5 (pairwise).

Exactness and memory: the whole-model order statistics (lo_i, hi_i, k_i, m_i) are found exactly
without flattening the model: a radix select on the float64 bit patterns (16 bits per pass, for
every task at once), reading one tensor of each task vector at a time, until the value's bucket
holds at most GATHER_LIMIT entries, which are then sorted (a model that small is sorted whole).
That is about 2 passes over the
task vectors for the clip and 2 to 3 for the scores (each recomputes the scores tensor by tensor),
plus the merge; memory is one tensor per task, its scores' temporaries for at most CHUNK entries
at a time, the histograms and the gathered buckets. Those temporaries, freed between blocks that
live longer, leave holes in glibc's heap that grew the RSS pass after pass (to twice the live
data); `_heap.HeapGuard` hands the free pages back whenever the RSS has grown 512 MiB.
On the demo benchmark (8 tasks) a merge takes about 25 s on 2 shared cores, as the per-tensor
reading did.
Indices: floor(x) after rounding x to 9 decimals (the release's int() of the float product; they
differ only where float error puts the product just under an integer). Where the release divides
0 by 0 (hi_i = lo_i, or m_i = k_i) we give 0. Computed in float64 (the release in the checkpoints'
float32), returned in theta_0's dtypes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from pydantic import Field

from ..io import StateDict, specs_of
from ..params_base import Strict
from ..task_vectors import per_tensor
from ._heap import HeapGuard


class PcbParams(Strict):
    """PCB-Merging (Du et al., NeurIPS 2024): intra- and inter-task balancing, drop, rescale."""

    drop_ratio: float = Field(
        default=0.95, ge=0, lt=1, description="fraction of each task vector's entries dropped, lowest score first (the release's 1 - pcb_ratio)"
    )
    clip_ratio: float = Field(
        default=0.0001, ge=0, lt=0.5, description="each task vector's magnitudes clipped to their [c, 1 - c] quantiles over the model"
    )
    inter: Literal["sum", "normalized_sum", "pairwise"] = Field(
        default="sum", description="the inter-balancing form (pcb-merging.py, vision pcb.py, vision pcb_ES.py)"
    )
    alpha: float = Field(default=1.2, gt=0, description="scaling of the merged task vector (the release's lambda)")


PARAMS = PcbParams
NEEDS = frozenset()

GATHER_LIMIT = 1 << 22  # a bucket of at most this many entries is sorted (32 MiB of float64)
# Entries per task scored at once: the scores' temporaries (about ten N x CHUNK float64 arrays)
# stay near 0.7 GB at N = 8 whatever the largest tensor (a ViT-B/32 MLP weight has 2.4M entries).
CHUNK = 1 << 20
DIGIT_BITS = 16
SHIFTS = (48, 32, 16, 0)
LOW_BITS = 0x7FFF_FFFF_FFFF_FFFF
RESCALE_FLOOR = 1e-12  # the release's clamp of the summed weights


def floor_index(x: float) -> int:
    """floor(x) after rounding to 9 decimals, so 0.29 * 100 is 29 and not floor(28.999999999999996)."""
    return math.floor(round(x, 9))


# ---- exact order statistics over the whole model, one tensor at a time ------------------------


def ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """int64 keys in the order of the float64 values (-0.0 taken as +0.0)."""
    bits = (x.double() + 0.0).view(torch.int64)  # -0.0 + 0.0 = +0.0
    return bits ^ ((bits >> 63) & LOW_BITS)  # negatives: every bit but the sign flipped


def value_of(key: int) -> float:
    bits = key ^ LOW_BITS if key < 0 else key
    return float(torch.tensor([bits], dtype=torch.int64).view(torch.float64))


class _Query:
    """One wanted order statistic: the rank-th smallest (0-based) of row `row`."""

    def __init__(self, row: int, rank: int):
        self.row, self.rank = row, rank
        self.level = 0  # the digit the next histogram counts: bits SHIFTS[level] up
        self.prefix: int | None = None  # the wanted entry's key >> SHIFTS[level] + DIGIT_BITS (level > 0)
        self.gather = False  # next pass: sort the entries whose key >> SHIFTS[level] is `prefix`
        self.value: float | None = None

    def group(self) -> tuple:
        """Queries with the same group read the same entries in the next pass."""
        return (self.row, self.level, self.prefix, self.gather)

    def settle(self, counts: torch.Tensor) -> None:
        """After a histogram pass: the wanted entry's bucket, and the rank left inside it."""
        below = torch.cumsum(counts, 0)
        bucket = int(torch.searchsorted(below, self.rank, right=True))  # the first with below > rank
        self.rank -= int(below[bucket] - counts[bucket])
        digit = bucket - (1 << (DIGIT_BITS - 1)) if self.level == 0 else bucket
        self.prefix = digit if self.prefix is None else (self.prefix << DIGIT_BITS) | digit
        if SHIFTS[self.level] == 0:  # every bit known: that is the value
            self.value = value_of(self.prefix)
        elif int(counts[bucket]) <= GATHER_LIMIT:
            self.gather = True
        else:
            self.level += 1


def _histogram(bits: torch.Tensor, level: int, prefix: int | None) -> torch.Tensor:
    shift = SHIFTS[level]
    if prefix is not None:
        bits = bits[(bits >> (shift + DIGIT_BITS)) == prefix]
    if level == 0:
        digits = (bits >> shift) + (1 << (DIGIT_BITS - 1))  # the top digit holds the sign: signed
    else:
        digits = (bits >> shift) & ((1 << DIGIT_BITS) - 1)
    return torch.bincount(digits, minlength=1 << DIGIT_BITS)


def order_statistics(
    rows: Callable[[str], torch.Tensor], keys: Sequence[str], wanted: Sequence[Sequence[int]], numel: int
) -> list[list[float]]:
    """wanted[r]: 0-based ranks among the numel values of row r over every key, where rows(key) is
    an (R, d_key) float64 tensor (computed again on each pass). The exact values, in the order asked."""
    queries = [[_Query(r, rank) for rank in ranks] for r, ranks in enumerate(wanted)]
    heap = HeapGuard()
    pending = [q for row in queries for q in row]
    for q in pending:
        q.gather = numel <= GATHER_LIMIT  # small enough to sort whole: one pass
    while pending:
        # per group: the gathered entries (a list of pieces), or the histogram so far
        groups: dict[tuple, list | torch.Tensor] = {}
        for q in pending:
            groups[q.group()] = [] if q.gather else torch.zeros(1 << DIGIT_BITS, dtype=torch.int64)
        for key in keys:
            heap()
            values = rows(key).reshape(len(wanted), -1)
            bits = ordered_bits(values)
            for (row, level, prefix, gather), found in groups.items():
                if gather:
                    found.append(values[row] if prefix is None else values[row][(bits[row] >> SHIFTS[level]) == prefix])
                else:
                    found += _histogram(bits[row], level, prefix)
        for q in pending:
            found = groups[q.group()]
            if q.gather:
                q.value = float(torch.sort(torch.cat(found)).values[q.rank])
            else:
                q.settle(found)
        pending = [q for q in pending if q.value is None]
    return [[q.value for q in row] for row in queries]


# ---- scores and weights ---------------------------------------------------------------------------------


def clip_bounds(numel: int, ratio: float) -> tuple[int, int]:
    """The release's clamp(x, min_ratio=c, max_ratio=c) over numel sorted entries: the 0-based ranks
    of its lower and upper bound."""
    return min(numel - 1, floor_index(numel * ratio)), max(0, min(numel - 1, floor_index(numel * (1 - ratio)) - 1))


def scores_of(taus: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, inter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores s, clipped values t), both (N, d), for task vectors `taus` (N, d) with per-task clip
    bounds lo, hi (N, 1)."""
    n = taus.shape[0]
    magnitude = torch.clamp(taus.abs(), lo, hi)  # where lo > hi, hi (as torch.clamp)
    width, valid = _width(lo, hi)
    nu = (magnitude - lo) / width * valid
    intra = torch.exp(n * nu**2)
    sign = torch.sign(taus)
    signed = sign * nu
    if inter == "sum":
        cross = torch.tanh(taus * taus.sum(dim=0))
    elif inter == "normalized_sum":
        cross = torch.tanh(taus * signed.sum(dim=0))
    else:  # pairwise
        cross = torch.stack([torch.tanh(s * signed).sum(dim=0) for s in signed])
    return intra * cross, sign * magnitude


def _width(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per task (N, 1): high - low where positive, else 1; and 1.0 where it was positive, else 0.0."""
    valid = high > low
    return torch.where(valid, high - low, torch.ones_like(low)), valid.to(low.dtype)


def weights_of(scores: torch.Tensor, low: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """(clamp(s, low, top) - low) / (top - low) per task (0 where top == low)."""
    width, valid = _width(low, top)
    return (torch.clamp(scores, low, top) - low) / width * valid


def rescale(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return (weights * values).sum(dim=0) / weights.sum(dim=0).clamp(min=RESCALE_FLOOR)


# ---- the method ---------------------------------------------------------------------------------


def chunks_of(specs: dict) -> list[tuple[str, int, int]]:
    """(key, start, stop) slices of every tensor flattened, at most CHUNK entries each, in order."""
    out = []
    for key, (_, shape) in specs.items():
        numel = math.prod(shape)
        out += [(key, start, min(start + CHUNK, numel)) for start in range(0, max(numel, 1), CHUNK)]
    return out


def merged_vector(task_vectors: list[StateDict], params, inputs=None) -> StateDict:
    """tau_m (independent of alpha); `params` is a PcbParams."""
    specs = {key: (torch.float64, shape) for key, (_, shape) in specs_of(task_vectors[0]).items()}
    pieces = chunks_of(specs)
    n = len(task_vectors)
    numel = sum(math.prod(shape) for _, shape in specs.values())

    current: dict[str, list[torch.Tensor]] = {}  # the last key's tensors: its chunks come in a row

    def stacked(piece: tuple[str, int, int]) -> torch.Tensor:
        key, start, stop = piece
        if key not in current:
            current.clear()
            current[key] = [tv[key].reshape(-1) for tv in task_vectors]
        return torch.stack([flat[start:stop].double() for flat in current[key]])

    low_rank, high_rank = clip_bounds(numel, params.clip_ratio)
    bounds = order_statistics(lambda piece: stacked(piece).abs(), pieces, [[low_rank, high_rank]] * n, numel)
    bounds = torch.tensor(bounds, dtype=torch.float64)
    lo, hi = bounds[:, :1], bounds[:, 1:]

    def scores(piece: tuple[str, int, int]) -> torch.Tensor:
        return scores_of(stacked(piece), lo, hi, params.inter)[0]

    kept_from = min(numel - 1, floor_index(numel * params.drop_ratio))
    limits = torch.tensor(order_statistics(scores, pieces, [[kept_from, numel - 1]] * n, numel), dtype=torch.float64)
    low, top = limits[:, :1], limits[:, 1:]

    heap = HeapGuard()

    def merged(key: str) -> torch.Tensor:
        parts = []
        for piece in (p for p in pieces if p[0] == key):
            heap()
            s, clipped = scores_of(stacked(piece), lo, hi, params.inter)
            parts.append(rescale(weights_of(s, low, top), clipped))
        return torch.cat(parts).reshape(specs[key][1])

    return per_tensor(specs, merged, task_vectors)
