"""RegMean (Jin et al., ICLR 2023): per linear weight, the weight whose outputs best match every
expert's outputs on that expert's own inputs; every other parameter is averaged.

  G_i   = X_i^T X_i,  regularised  G_i <- s G_i + (1 - s) diag(G_i)       (s = nondiagonal_scale)
  W*    = argmin_W sum_i ||X_i W^T - X_i W_i^T||^2 = (sum_i W_i G_i)(sum_i G_i)^-1,   W_i = theta_0 + T_i
        = theta_0 + T*,  T* = (sum_i T_i G_i)(sum_i G_i)^-1          (sum_i G_i theta_0 cancels)
  other = theta_0 + (1/K) sum_i T_i
  merge = theta_0 + alpha * (T* on linear weights, (1/K) sum_i T_i elsewhere)   (alpha = 1: RegMean)

Computed in float64, returned in theta_0's dtypes.
"""

from __future__ import annotations

import scipy.linalg
import torch
from pydantic import Field

from ..adapters import Piece
from ..cat import LayerInput
from ..io import ArtifactError, StateDict, specs_of
from ..params_base import Strict
from ..task_vectors import per_tensor


class RegMeanParams(Strict):
    """RegMean (Jin et al., ICLR 2023): per linear layer, the weight that best matches every expert's
    outputs on its own inputs; other parameters averaged."""

    exemplars: int = Field(default=256, ge=1, description="unlabeled train inputs per task whose layer inputs give the Gram matrices (FusionBench's CLIP setup: 256)")
    nondiagonal_scale: float = Field(
        default=0.9, ge=0, le=1, description="off-diagonal entries of the Gram matrices are multiplied by this (1 = plain RegMean)"
    )
    alpha: float = Field(default=1.0, gt=0, description="scaling of the merged delta (1 = RegMean as published)")


PARAMS = RegMeanParams
NEEDS = frozenset({"layer_inputs"})


def check_params(params) -> None:
    check_exemplar_budget(params, "regmean")


def check_exemplar_budget(params, method: str) -> None:
    """`<method>.exemplars` fits in the train images datasets.max_train keeps."""
    count, cap = getattr(params, method).exemplars, params.datasets.max_train
    if cap is not None and count > cap:
        raise ValueError(f"{method}.exemplars = {count}: more than the {cap} train images per task that datasets.max_train keeps")


def _gram(piece: Piece, inputs: list[dict[str, LayerInput]], d_in: int, scale: float, names: list[str]) -> list[torch.Tensor]:
    grams = []
    for k, by_name in enumerate(inputs):
        if piece.input not in by_name:
            raise ArtifactError(f"{names[k]}: no RegMean input {piece.input!r} (needed by {piece.name})")
        x = by_name[piece.input]
        # Rows squared in float64 (a float32 Gram of float32 rows would lose digits).
        g = x.rows.double().T @ x.rows.double() if x.rows is not None else x.gram.double()
        if g.shape != (d_in, d_in):
            raise ArtifactError(
                f"{names[k]}: RegMean input {piece.input!r} of {piece.name} has Gram {tuple(g.shape)}, "
                f"the weight has d_in = {d_in}"
            )
        grams.append(scale * g + (1.0 - scale) * torch.diag(torch.diagonal(g)))
    return grams


# Below this reciprocal condition number of sum G, the Cholesky solve (error about eps / rcond)
# gives way to the pseudo-inverse.
CHOLESKY_MIN_RCOND = 1e-6


def solve(deltas: list[torch.Tensor], grams: list[torch.Tensor]) -> torch.Tensor:
    """T* = (sum_i T_i G_i)(sum_i G_i)^+ for (d_out, d_in) deltas, as the transposed system
    (sum G) T*^T = sum_i G_i T_i^T. sum G may be singular (fewer feature rows than d_in): the
    right-hand side lies in its range, and the minimum-norm solution has no component on its null
    space, so directions no task's input ever reaches keep theta_0. A well-conditioned sum G (LAPACK
    pocon's estimate) is solved by Cholesky; any other by its pseudo-inverse from one symmetric
    eigendecomposition, with the cutoff LAPACK's gelsd uses by default (|eigenvalue| <= eps * d_in
    * the largest). Either way the solution is gelsd's to about 1e-10 relative (tested), at a
    fraction of its time (gelsd: about 7 s at d_in = 3072 on 2 cores)."""
    total = sum(grams)
    rhs = sum(g @ d.T for g, d in zip(grams, deltas))
    factor, info = torch.linalg.cholesky_ex(total)
    if info == 0:
        rcond, _ = scipy.linalg.lapack.dpocon(factor.numpy().T, float(total.abs().sum(dim=0).max()), uplo="U")
        if rcond > CHOLESKY_MIN_RCOND:
            return torch.cholesky_solve(rhs, factor).T
    values, vectors = scipy.linalg.eigh(total.numpy(), driver="evd")  # evr (MRRR) put a null eigenvalue above the cutoff in a test
    values, vectors = torch.from_numpy(values), torch.from_numpy(vectors)
    cutoff = values.abs().max() * total.shape[0] * torch.finfo(total.dtype).eps
    inverse = torch.where(values.abs() > cutoff, 1.0 / values, torch.zeros_like(values))
    return ((vectors * inverse) @ (vectors.T @ rhs)).T


def merged_vector(task_vectors: list[StateDict], params, inputs) -> StateDict:
    """The merged delta (independent of alpha). `inputs.pieces` are the linear pieces (q/k/v fused),
    `inputs.layer_inputs[k]` task k's captured inputs by name, `inputs.names[k]` names them in
    errors (default "task k")."""
    pieces, layer_inputs = inputs.pieces, inputs.layer_inputs
    if len(layer_inputs) != len(task_vectors):
        raise ValueError(f"RegMean: {len(layer_inputs)} input sets for {len(task_vectors)} task vectors")
    names = inputs.names or [f"task {k}" for k in range(len(layer_inputs))]
    count = len(task_vectors)
    by_key: dict[str, list[Piece]] = {}
    for piece in pieces:
        if piece.family == "linear" and piece.input is not None:
            by_key.setdefault(piece.key, []).append(piece)

    def merged(key: str) -> torch.Tensor:
        full = [tv[key].double() for tv in task_vectors]
        out = sum(full) / count  # the average everywhere; the linear pieces' rows are then overwritten
        grams_by_input: dict[str, list[torch.Tensor]] = {}  # fused q/k/v share one input
        for piece in by_key.get(key, []):
            blocks = [piece.of(t) for t in full]
            shape = blocks[0].shape
            # A conv kernel (d_out, c, kh, kw) acts as a linear map on unfolded patches.
            deltas = [b.reshape(shape[0], -1) for b in blocks]
            if piece.input not in grams_by_input:
                grams_by_input[piece.input] = _gram(piece, layer_inputs, deltas[0].shape[1], params.nondiagonal_scale, names)
            grams = grams_by_input[piece.input]
            piece.of(out).copy_(solve(deltas, grams).reshape(shape))
        return out

    specs = {key: (torch.float64, shape) for key, (_, shape) in specs_of(task_vectors[0]).items()}
    return per_tensor(specs, merged, task_vectors)
