"""CAT Merging: Conflict-Aware Task Merging (Sun, Li, Geng, Li; ICML 2025, arXiv 2505.06977).

Every other task's vector moves task k's features; CAT trims from each T_i (i != k) the part that
moves task k's features most while costing task i least, layer by layer, then adds the trimmed
vectors as Task Arithmetic does. All removals are computed from the ORIGINAL task vectors.

Per piece (a linear weight W (d_out, d_in), a norm scale or a shift vector) and task k:

  linear weights, Sec. 5.1
    G_k = sum_{i != k} T_i (X_k^T X_k - lambda X_i^T X_i) T_i^T                     (Eq. 10)
    B_k = eigenvectors of the c largest eigenvalues of G_k                            (Eq. 11)
    T_i <- T_i - B_k B_k^T T_i, for every i != k
  norm scales (x_hat * gamma), Sec. 5.2
    g_k[z] = sum_{i != k} T_i[z]^2 (sum_rows x_hat_k[:, z]^2 - lambda sum_rows x_hat_i[:, z]^2)  (Eq. 13)
    m_k = the c top coordinates of g_k; T_i[m_k] <- 0, for every i != k              (Eq. 14)
  shifts (norm and linear biases), Sec. 5.3
    s_k = sum_{i != k} T_i^2 (or T_k^2 with shift_score "own")                        (Eq. 16)
    m_k = the c top coordinates of s_k; T_i[m_k] <- 0, for every i != k              (Eq. 17)
  merge
    theta = theta_0 + alpha * sum_i trimmed T_i                                        (Eq. 2 on trimmed T)

Choices where the paper is silent (documented in docs/cat.md): directions or coordinates whose
score is not positive are dropped by default (they would not lower Eq. 10); each trimmed linear
weight or norm scale may be rescaled to its original Frobenius norm; ties go to the lowest index.
Everything is computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

Tensor = torch.Tensor
# Above this output width a full eigendecomposition costs seconds; an iterative top-c solver does not.
DENSE_EIGH_MAX = 1024
# Relative size below which an eigenvalue counts as zero (G_k is low-rank; round-off is not signal).
ZERO_TOLERANCE = 1e-12


@dataclass(frozen=True)
class LayerInput:
    """Task k's input rows X_k (n, d_in) of one layer, or only their Gram matrix X_k^T X_k."""

    rows: Tensor | None = None
    gram: Tensor | None = None

    def gram_matrix(self) -> Tensor:
        return self.gram if self.gram is not None else self.rows.T @ self.rows


@dataclass(frozen=True)
class Removal:
    """What task k removes from the other tasks' vectors in one piece."""

    basis: Tensor | None  # B_k (d_out, c') for a linear weight
    mask: Tensor | None  # indices zeroed, for a norm scale or a shift
    kept: list[float]  # eigenvalues (or scores) of the kept directions, largest first
    trace: float  # Tr(G_k) (or the sum of all scores): what the kept part is a share of

    @property
    def objective(self) -> float:
        """Eq. 10's value captured: Tr(B_k^T G_k B_k) = the sum of the kept eigenvalues."""
        return float(sum(self.kept))


# ---- linear weights (Sec. 5.1) -------------------------------------------------------------


def conflict_matrix(k: int, deltas: list[Tensor], inputs: list[LayerInput], lam: float) -> Tensor:
    """G_k of Eq. 10 as a (d_out, d_out) matrix (the Gram form, for many feature rows)."""
    gram_k = inputs[k].gram_matrix()
    return sum(
        deltas[i] @ (gram_k - lam * inputs[i].gram_matrix()) @ deltas[i].T for i in range(len(deltas)) if i != k
    )


def conflict_factors(k: int, deltas: list[Tensor], inputs: list[LayerInput], lam: float) -> tuple[Tensor, Tensor]:
    """G_k of Eq. 10 as U^T diag(w) U with U = [X_k T_i^T; X_i T_i^T]_{i != k} (m, d_out), w = [+1; -lambda].

    m = sum_{i != k} (n_k + n_i) rows: with few exemplars far fewer than d_out.
    """
    blocks, weights = [], []
    for i in range(len(deltas)):
        if i == k:
            continue
        for rows, weight in ((inputs[k].rows, 1.0), (inputs[i].rows, -lam)):
            blocks.append(rows @ deltas[i].T)
            weights.append(torch.full((rows.shape[0],), weight, dtype=rows.dtype))
    return torch.cat(blocks), torch.cat(weights)


def conflict_terms(k: int, deltas: list[Tensor], inputs: list[LayerInput], basis: Tensor) -> dict[int, dict[str, float]]:
    """The two terms of Eq. 10 for each i != k, in full and along B_k (what trimming removes):
    conflict = ||X_k T_i^T||_F^2, the shift T_i causes in task k's features;
    own      = ||X_i T_i^T||_F^2, task i's own signal, which the trim costs task i."""

    def energy(x: LayerInput, delta: Tensor) -> tuple[float, float]:
        if x.rows is not None:
            shift = x.rows @ delta.T
            return float(shift.square().sum()), float((shift @ basis).square().sum())
        moved = delta @ x.gram @ delta.T
        return float(moved.trace()), float((basis.T @ moved @ basis).trace())

    out = {}
    for i in range(len(deltas)):
        if i != k:
            (conflict, conflict_removed), (own, own_removed) = energy(inputs[k], deltas[i]), energy(inputs[i], deltas[i])
            out[i] = {"conflict": conflict, "conflict_removed": conflict_removed, "own": own, "own_removed": own_removed}
    return out


def _top_eigenpairs_factored(factors: Tensor, weights: Tensor, with_null_space: bool) -> tuple[Tensor, Tensor]:
    """Eigenpairs of U^T diag(w) U through the m-dimensional space U spans: U^T = Q R, so
    G = Q (R diag(w) R^T) Q^T and only an (m, m) eigenproblem is left. The rest of R^d_out is
    G's null space (eigenvalue 0), added only when zero directions may be chosen."""
    m = factors.shape[0]
    q, r = torch.linalg.qr(factors.T, mode="complete" if with_null_space else "reduced")
    values, vectors = torch.linalg.eigh((r[:m] * weights) @ r[:m].T)
    values_all = torch.cat([values, values.new_zeros(q.shape[1] - m)])
    return values_all, torch.cat([q[:, :m] @ vectors, q[:, m:]], dim=1)


def _top_eigenpairs_dense(matrix: Tensor, c: int) -> tuple[Tensor, Tensor]:
    d = matrix.shape[0]
    if d <= DENSE_EIGH_MAX or c >= d - 1:
        return torch.linalg.eigh(matrix)
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    # Lanczos for the c largest (algebraic) eigenvalues; a fixed start vector keeps it deterministic.
    try:
        values, vectors = eigsh(matrix.numpy(), k=c, which="LA", v0=np.ones(d) / np.sqrt(d))
    except ArpackNoConvergence:  # e.g. fewer than c positive eigenvalues: a cluster at 0
        return torch.linalg.eigh(matrix)
    return torch.from_numpy(values), torch.from_numpy(vectors)


def top_c(scores: Tensor, c: int, drop_nonpositive: bool, scale: float | None = None) -> Tensor:
    """Indices of the c largest scores, largest first, ties to the lowest index; with
    drop_nonpositive, scores not above ZERO_TOLERANCE * scale (default: the largest |score|)
    are never chosen."""
    order = torch.sort(scores, descending=True, stable=True).indices[:c]
    if drop_nonpositive:
        if scale is None:
            scale = float(scores.abs().max()) if scores.numel() else 0.0
        order = order[scores[order] > ZERO_TOLERANCE * scale]
    return order


def removal_basis(
    k: int, deltas: list[Tensor], inputs: list[LayerInput], lam: float, c: int, drop_nonpositive: bool = True
) -> Removal:
    """B_k of Eq. 11 for one linear weight, by whichever route is cheaper for its size."""
    d_out = deltas[k].shape[0]
    if c == 0:
        return Removal(torch.zeros(d_out, 0, dtype=deltas[k].dtype), None, [], 0.0)
    scale = None
    have_rows = all(x.rows is not None for x in inputs)
    rows = sum(inputs[k].rows.shape[0] + inputs[i].rows.shape[0] for i in range(len(inputs)) if i != k) if have_rows else None
    if rows is not None and rows < d_out:
        factors, weights = conflict_factors(k, deltas, inputs, lam)
        values, vectors = _top_eigenpairs_factored(factors, weights, with_null_space=not drop_nonpositive)
        trace = float((factors.square().sum(dim=1) * weights).sum())
    else:
        matrix = conflict_matrix(k, deltas, inputs, lam)
        values, vectors = _top_eigenpairs_dense(matrix, c)
        trace = float(matrix.trace())
        if len(values) < d_out:  # only the top c came back: measure "zero" against ||G||_F >= max |eigenvalue|
            scale = float(matrix.norm())
    chosen = top_c(values, c, drop_nonpositive, scale)
    basis = vectors[:, chosen]
    # Eigenvectors are defined up to sign: fix it (largest entry positive) so the bytes are canonical.
    signs = torch.sign(basis.gather(0, basis.abs().argmax(dim=0, keepdim=True)))
    basis = basis * torch.where(signs == 0, 1.0, signs)
    return Removal(basis.contiguous(), None, values[chosen].tolist(), trace)


# ---- norm scales (Sec. 5.2) and shifts (Sec. 5.3) ------------------------------------------


def norm_scale_mask(
    k: int, deltas: list[Tensor], sum_squares: list[Tensor], lam: float, c: int, drop_nonpositive: bool = True
) -> Removal:
    """m_k of Eq. 14 from the scores of Eq. 13; sum_squares[i][z] = sum over rows of x_hat_i[:, z]^2."""
    scores = sum(deltas[i].square() * (sum_squares[k] - lam * sum_squares[i]) for i in range(len(deltas)) if i != k)
    chosen = top_c(scores, c, drop_nonpositive)
    return Removal(None, chosen, scores[chosen].tolist(), float(scores.sum()))


def shift_mask(k: int, deltas: list[Tensor], c: int, score: str = "others") -> Removal:
    """m_k of Eq. 17 from the scores of Eq. 16 (sum of the others' squares, or task k's own)."""
    if score == "own":
        scores = deltas[k].square()
    else:
        scores = sum(deltas[i].square() for i in range(len(deltas)) if i != k)
    chosen = top_c(scores, c, drop_nonpositive=True)  # a zero score marks a coordinate no one moved
    return Removal(None, chosen, scores[chosen].tolist(), float(scores.sum()))


# ---- trimming and merging ------------------------------------------------------------------


def trim(i: int, delta: Tensor, removals: list[Removal], rescale: bool) -> Tensor:
    """Task i's vector for one piece after every other task's removal, applied one after another
    (the B_k are not mutually orthogonal, so the order is the task order)."""
    trimmed = delta
    for k, removal in enumerate(removals):
        if k == i:
            continue
        if removal.basis is not None and removal.basis.shape[1]:
            basis = removal.basis.to(trimmed.dtype)
            trimmed = trimmed - basis @ (basis.T @ trimmed)
        elif removal.mask is not None and removal.mask.numel():
            trimmed = trimmed.clone()
            trimmed[removal.mask] = 0
    if rescale and trimmed is not delta:
        norm = trimmed.norm()
        if norm > 0:
            trimmed = trimmed * (delta.norm() / norm)
    return trimmed


# ---- a whole model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The bases stage's CAT params, with the norm and shift defaults resolved."""

    c: int
    lam: float
    c_norm: int
    lambda_norm: float
    c_shift: int
    drop_nonpositive: bool = True
    shift_score: str = "others"


def _as_matrix(piece, delta: Tensor) -> Tensor:
    """A linear piece as (d_out, d_in): a convolution kernel acts on its unfolded patches."""
    return delta.reshape(delta.shape[0], -1) if piece.family == "linear" else delta


def model_removals(pieces, task_vectors: list[dict[str, Tensor]], features: list, settings: Settings) -> dict[str, list[Removal]]:
    """Every task's removal for every piece. `features[k]` is task k's (linear inputs, norm sums
    of squares) by input name, as `catmerge.features.load_features` returns them."""
    out = {}
    for piece in pieces:
        deltas = [_as_matrix(piece, piece.of(tv[piece.key]).double()) for tv in task_vectors]
        tasks = range(len(deltas))
        if piece.family == "linear":
            inputs = [features[k][0][piece.input] for k in tasks]
            out[piece.name] = [removal_basis(k, deltas, inputs, settings.lam, settings.c, settings.drop_nonpositive) for k in tasks]
        elif piece.family == "norm_scale":
            sums = [features[k][1][piece.input] for k in tasks]
            out[piece.name] = [
                norm_scale_mask(k, deltas, sums, settings.lambda_norm, settings.c_norm, settings.drop_nonpositive) for k in tasks
            ]
        elif piece.family == "shift":
            out[piece.name] = [shift_mask(k, deltas, settings.c_shift, settings.shift_score) for k in tasks]
    return out


def _trimmed_pieces(pieces, task_vectors: list[dict[str, Tensor]], removals: dict[str, list[Removal]], rescale: bool):
    """(piece, [trimmed T_i for that piece]) one piece at a time ("other" pieces untouched)."""
    for piece in pieces:
        deltas = [piece.of(tv[piece.key]) for tv in task_vectors]
        if piece.family == "other":
            yield piece, deltas
        else:
            scale_back = rescale and piece.family in ("linear", "norm_scale")
            yield piece, [trim(i, _as_matrix(piece, d), removals[piece.name], scale_back).reshape(d.shape) for i, d in enumerate(deltas)]


def trimmed_vectors(pieces, task_vectors: list[dict[str, Tensor]], removals: dict[str, list[Removal]], rescale: bool) -> list[dict[str, Tensor]]:
    """Every trimmed T_i, parameter by parameter (K models in memory: for analysis; the merge uses trimmed_sum)."""
    out = [{} for _ in task_vectors]
    for piece, trimmed in _trimmed_pieces(pieces, task_vectors, removals, rescale):
        for vector, tv, piece_delta in zip(out, task_vectors, trimmed):
            if piece.key not in vector:
                vector[piece.key] = torch.empty_like(tv[piece.key])
            piece.of(vector[piece.key]).copy_(piece_delta)
    return out


def trimmed_sum(pieces, task_vectors: list[dict[str, Tensor]], removals: dict[str, list[Removal]], rescale: bool) -> dict[str, Tensor]:
    """sum_i trimmed T_i, parameter by parameter, summed in task order (one model's worth of sums)."""
    total = {}
    for piece, trimmed in _trimmed_pieces(pieces, task_vectors, removals, rescale):
        piece_sum = trimmed[0].clone()
        for t in trimmed[1:]:
            piece_sum += t
        if piece.key not in total:
            total[piece.key] = torch.empty_like(task_vectors[0][piece.key])
        piece.of(total[piece.key]).copy_(piece_sum)
    return total
