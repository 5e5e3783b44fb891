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

from .progress import progress

Tensor = torch.Tensor
# Above this output width a full eigendecomposition costs seconds; an iterative top-c solver does not.
DENSE_EIGH_MAX = 1024
# Linear weights wider than this, with feature rows, take the all-tasks route (`removal_bases`).
ROWS_ROUTE_MIN_WIDTH = 256
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


def top_c(scores: Tensor, c: int, drop_nonpositive: bool, scale: float | None = None, tolerance: float = ZERO_TOLERANCE) -> Tensor:
    """Indices of the c largest scores, largest first, ties to the lowest index; with
    drop_nonpositive, scores not above tolerance * scale (default: the largest |score|)
    are never chosen."""
    order = torch.sort(scores, descending=True, stable=True).indices[:c]
    if drop_nonpositive:
        if scale is None:
            scale = float(scores.abs().max()) if scores.numel() else 0.0
        order = order[scores[order] > tolerance * scale]
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
    return Removal(_canonical_signs(vectors[:, chosen]), None, values[chosen].tolist(), trace)


def removal_bases(
    deltas: list[Tensor], inputs: list[LayerInput], lam: float, c: int, drop_nonpositive: bool = True, device: str = "cpu"
) -> tuple[list[Removal], list[dict]]:
    """B_k of Eq. 11 for every task k of one linear weight, with the Eq. 10 terms of every pair
    (as `conflict_terms`). A wide layer with feature rows works from the products

        Y_ki = X_k T_i^T (n_k, d_out):   G_k = sum_{i != k} Y_ki^T Y_ki - lambda Y_ii^T Y_ii     (Eq. 10)

    The own products Y_ii serve every k; each k adds its K - 1 products Y_ki; the Eq. 10 terms
    are their squared norms, before and along B_k. G_k (rank <= 2 (K-1) n) is never needed whole
    when it is wide: `_top_eigenpairs_of_factors` picks the cheaper exact route for its shape."""
    count, d_out = len(deltas), deltas[0].shape[0]
    if c == 0 or d_out <= ROWS_ROUTE_MIN_WIDTH or any(x.rows is None for x in inputs):
        deltas = [d.double() for d in deltas]  # this route is float64 whatever the precision
        removals = [removal_basis(k, deltas, inputs, lam, c, drop_nonpositive) for k in range(count)]
        return removals, [conflict_terms(k, deltas, inputs, r.basis) for k, r in enumerate(removals)]
    deltas = [d.to(device) for d in deltas]
    rows = [x.rows.to(device=device, dtype=deltas[0].dtype) for x in inputs]
    sizes = [x.shape[0] for x in rows]
    own = torch.cat([rows[i] @ deltas[i].T for i in range(count)])  # Y_ii stacked: every k shares them
    own_energies = own.square().sum(dim=1).split(sizes)
    buffer = own.new_empty((count - 1) * max(sizes), d_out)  # one allocation for every k
    # an eigenvalue counts as zero below round-off of the precision used (float32: ~1e-5 of the scale)
    tolerance = max(ZERO_TOLERANCE, 100 * torch.finfo(own.dtype).eps)
    removals, terms = [], []
    for k in range(count):
        others = [i for i in range(count) if i != k]
        shifts = buffer[: sizes[k] * len(others)]
        for j, i in enumerate(others):
            torch.matmul(rows[k], deltas[i].T, out=shifts[j * sizes[k] : (j + 1) * sizes[k]])  # Y_ki
        # G_k = shifts^T shifts - lambda own^T diag(own_weights) own: task k's own rows weigh 0
        own_weights = torch.cat([own.new_full((n,), 0.0 if i == k else -lam) for i, n in enumerate(sizes)])
        blocks = [(shifts, shifts.new_ones(shifts.shape[0])), (own, own_weights)]
        shift_energies = shifts.square().sum(dim=1).split(sizes[k])
        # |eigenvalue| <= the trace of either PSD part: what "not above zero" is measured against
        positive = sum(float(e.sum()) for e in shift_energies)
        negative = lam * sum(float(own_energies[i].sum()) for i in others)
        values, vectors = _top_eigenpairs_of_factors(blocks, c, with_null_space=not drop_nonpositive)
        chosen = top_c(values, c, drop_nonpositive, max(positive, negative), tolerance)
        basis = _canonical_signs(vectors[:, chosen].to(own))
        shifts_along = (shifts @ basis).square().sum(dim=1).split(sizes[k])
        own_along = (own @ basis).square().sum(dim=1).split(sizes)
        terms.append({
            i: {"conflict": float(shift_energies[j].sum()), "conflict_removed": float(shifts_along[j].sum()),
                "own": float(own_energies[i].sum()), "own_removed": float(own_along[i].sum())}
            for j, i in enumerate(others)
        })  # fmt: skip
        removals.append(Removal(basis.double().cpu(), None, values[chosen].double().tolist(), positive - negative))
    return removals, terms


def _top_eigenpairs_of_factors(blocks: list[tuple[Tensor, Tensor]], c: int, with_null_space: bool) -> tuple[Tensor, Tensor]:
    """The top-c eigenpairs (at least) of G = sum_b U_b^T diag(w_b) U_b for blocks (U_b (m_b, d), w_b).
    Few rows in all: exactly, through their m-dimensional row space. Else Lanczos (ARPACK) on
    v -> sum_b U_b^T (w_b * (U_b v)), never forming G: measured on ViT-B/32 layers, 3 to 14 times
    faster than forming G and asking LAPACK for its top c only. On a GPU: G formed and decomposed whole."""
    m, d = sum(u.shape[0] for u, _ in blocks), blocks[0][0].shape[1]
    if m < d and (m <= 256 or 8 * m <= d):
        return _top_eigenpairs_factored(torch.cat([u for u, _ in blocks]), torch.cat([w for _, w in blocks]), with_null_space)

    def dense() -> tuple[Tensor, Tensor]:
        return torch.linalg.eigh(sum(u.T @ (w[:, None] * u) for u, w in blocks))

    if c >= d - 1 or blocks[0][0].device.type != "cpu":
        return dense()
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
    from threadpoolctl import threadpool_limits

    def matvec(v: np.ndarray) -> np.ndarray:
        # in torch, not numpy: two BLAS thread pools (torch's and numpy's) would fight over the cores
        x = torch.from_numpy(np.ascontiguousarray(v).reshape(-1))
        return sum(u.T @ (w * (u @ x)) for u, w in blocks).numpy()

    dtype = blocks[0][0].numpy().dtype
    operator = LinearOperator((d, d), matvec=matvec, dtype=dtype)
    tol = 1e-10 if dtype == np.float64 else 1e-5
    try:  # a fixed start vector keeps it deterministic
        ncv = min(d, max(2 * c + 1, 40))
        # ARPACK's own BLAS calls are small; their threads, spinning between calls, took the cores
        # from torch's products (one thread: ViT-B/32's bases at K = 8 in 33 s instead of 73 s)
        with threadpool_limits(limits=1, user_api="blas"):
            values, vectors = eigsh(operator, k=c, which="LA", v0=np.ones(d, dtype=dtype), ncv=ncv, tol=tol, maxiter=50)
    except ArpackNoConvergence:  # 50 restarts (~2000 products; 2 or 3 are usual): a degenerate top
        return dense()
    return torch.from_numpy(values), torch.from_numpy(vectors)


def _canonical_signs(basis: Tensor) -> Tensor:
    """Eigenvectors are defined up to sign: fix it (largest entry positive) so the bytes are canonical."""
    signs = torch.sign(basis.gather(0, basis.abs().argmax(dim=0, keepdim=True)))
    return (basis * torch.where(signs == 0, 1.0, signs)).contiguous()


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
    (the B_k are not mutually orthogonal, so the order is the task order).

    The product of those projections, (I - B_K B_K^T) ... (I - B_1 B_1^T), is kept as I - W V^T
    with W, V of width sum_k c: T_i is then read twice, not twice per task."""
    w = v = None
    trimmed = delta
    for k, removal in enumerate(removals):
        if k == i:
            continue
        if removal.basis is not None and removal.basis.shape[1]:
            basis = removal.basis.double()
            if w is None:
                w, v = basis, basis
            else:  # (I - B B^T)(I - W V^T) = I - [W, B] [V, B - V (W^T B)]^T
                w, v = torch.cat([w, basis], dim=1), torch.cat([v, basis - v @ (w.T @ basis)], dim=1)
        elif removal.mask is not None and removal.mask.numel():
            trimmed = trimmed.clone()
            trimmed[removal.mask] = 0
    if w is not None:
        w, v = w.to(delta.dtype), v.to(delta.dtype)
        trimmed = delta - w @ (v.T @ delta)
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
    precision: str = "float64"  # of the linear weights' products and eigenproblems


def _as_matrix(piece, delta: Tensor) -> Tensor:
    """A linear piece as (d_out, d_in): a convolution kernel acts on its unfolded patches."""
    return delta.reshape(delta.shape[0], -1) if piece.family == "linear" else delta


def model_removals(
    pieces, task_vectors: list, features: list, settings: Settings, device: str = "cpu"
) -> tuple[dict[str, list[Removal]], dict[str, list[dict]]]:
    """(every task's removal for every piece, the Eq. 10 terms of every linear piece and task
    pair). `features[k]` is task k's (linear inputs, norm sums of squares) by input name, as
    `catmerge.features.load_features` returns them. One parameter at a time: each task vector's
    tensor is read once for all the pieces it holds (q, k, v), then dropped."""
    removals, terms = {}, {}
    dtype = getattr(torch, settings.precision)
    by_key: dict[str, list] = {}
    for piece in pieces:
        by_key.setdefault(piece.key, []).append(piece)
    tasks = range(len(task_vectors))
    for group in progress(list(by_key.values()), "bases"):
        if all(piece.family == "other" for piece in group):
            continue
        full = [tv[group[0].key] for tv in task_vectors]
        for piece in group:
            deltas = [_as_matrix(piece, piece.of(f).to(dtype if piece.family == "linear" else torch.float64)) for f in full]
            if piece.family == "linear":
                inputs = [features[k][0][piece.input] for k in tasks]
                removals[piece.name], terms[piece.name] = removal_bases(
                    deltas, inputs, settings.lam, settings.c, settings.drop_nonpositive, device
                )
            elif piece.family == "norm_scale":
                sums = [features[k][1][piece.input] for k in tasks]
                removals[piece.name] = [
                    norm_scale_mask(k, deltas, sums, settings.lambda_norm, settings.c_norm, settings.drop_nonpositive) for k in tasks
                ]
            elif piece.family == "shift":
                removals[piece.name] = [shift_mask(k, deltas, settings.c_shift, settings.shift_score) for k in tasks]
    return removals, terms


def _trimmed_piece(i: int, piece, full: Tensor, removals: dict[str, list[Removal]], rescale: bool) -> Tensor:
    """Task i's trimmed rows of one piece, from its full parameter tensor ("other" pieces untouched)."""
    delta = piece.of(full)
    if piece.family == "other":
        return delta
    scale_back = rescale and piece.family in ("linear", "norm_scale")
    return trim(i, _as_matrix(piece, delta), removals[piece.name], scale_back).reshape(delta.shape)


def _by_key(pieces, task_vectors: list) -> tuple[dict[str, list], dict]:
    """(pieces grouped by parameter, the specs of the parameters that have pieces)."""
    from .io import specs_of

    by_key: dict[str, list] = {}
    for piece in pieces:
        by_key.setdefault(piece.key, []).append(piece)
    return by_key, {key: spec for key, spec in specs_of(task_vectors[0]).items() if key in by_key}


def trimmed_vectors(pieces, task_vectors: list, removals: dict[str, list[Removal]], rescale: bool) -> list:
    """Every trimmed T_i, parameter by parameter. With task vectors read lazily (files), each
    tensor is trimmed when read: memory for a layer, not K models (the merge uses trimmed_sum)."""
    from .task_vectors import per_tensor

    by_key, specs = _by_key(pieces, task_vectors)

    def trimmed(i: int):
        def compute(key: str) -> Tensor:
            full = task_vectors[i][key]
            out = torch.empty_like(full)
            for piece in by_key[key]:
                piece.of(out).copy_(_trimmed_piece(i, piece, full, removals, rescale))
            return out

        return per_tensor(specs, compute, task_vectors)

    return [trimmed(i) for i in range(len(task_vectors))]


def trimmed_sum(pieces, task_vectors: list, removals: dict[str, list[Removal]], rescale: bool):
    """sum_i trimmed T_i, parameter by parameter, summed in task order (one model's worth of sums;
    computed as each parameter is read when the task vectors are files read lazily)."""
    from .task_vectors import per_tensor

    by_key, specs = _by_key(pieces, task_vectors)

    def summed(key: str) -> Tensor:
        full = [tv[key] for tv in task_vectors]
        total = torch.empty_like(full[0])
        for piece in by_key[key]:
            trimmed = [_trimmed_piece(i, piece, f, removals, rescale) for i, f in enumerate(full)]
            piece_sum = trimmed[0].clone()
            for t in trimmed[1:]:
                piece_sum += t
            piece.of(total).copy_(piece_sum)
        return total

    return per_tensor(specs, summed, task_vectors)
