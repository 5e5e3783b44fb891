"""Linear algebra shared by the spectral methods (TSV-M, Iso-C, Iso-CTS). Not a method itself."""

from __future__ import annotations

from collections.abc import Callable

import scipy.linalg
import torch

from ..io import StateDict, specs_of
from ..task_vectors import per_tensor


def is_matrix(shape) -> bool:
    """The tensors the spectral methods treat as matrices: every 2-D one, as their authors do."""
    return len(shape) == 2


def gram(x: torch.Tensor, side: str) -> torch.Tensor:
    """x^T x (side "right", n x n) or x x^T (side "left", m x m). A plain product: BLAS's syrk
    (half the flops) measured no faster here than torch's product."""
    return x.T @ x if side == "right" else x @ x.T


def eigh(symmetric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All eigenpairs, ascending, by LAPACK's divide and conquer (scipy's syevd measured about 2x
    faster than torch.linalg.eigh at 768 x 768)."""
    values, vectors = scipy.linalg.eigh(symmetric.numpy(), driver="evd")
    return torch.from_numpy(values), torch.from_numpy(vectors)


def top_eigenpairs(gram_matrix: torch.Tensor, r: int, scale: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(s (r,), vectors (size, r)) for the r largest eigenvalues of a Gram matrix: s =
    sqrt(eigenvalue), the singular values of the matrix it is the Gram of, largest first. LAPACK's
    syevr computes only those r when r is a small share; syevd computes all (faster than syevr's
    subset from about half). Eigenvalues of the Gram below its rounding level
    are 0: the Gram squares the condition number, so singular values under about 1e-7 of the
    largest are not resolved (and not needed: these methods keep top directions); their vectors are
    zero columns. `scale`: a larger eigenvalue to measure that level against, for a Gram computed
    as a difference whose rounding is relative to its terms'."""
    size = gram_matrix.shape[0]
    if 2 * r < size:
        values, vectors = scipy.linalg.eigh(gram_matrix.numpy(), subset_by_index=[size - r, size - 1], driver="evr")
        values, vectors = torch.from_numpy(values), torch.from_numpy(vectors)
    else:
        values, vectors = eigh(gram_matrix)
        values, vectors = values[size - r:], vectors[:, size - r:]
    values, vectors = values.flip(0), vectors.flip(1)
    nonzero = values > values[0].clamp(min=scale) * 10 * size * torch.finfo(torch.float64).eps
    s = torch.where(nonzero, values.clamp(min=0).sqrt(), torch.zeros_like(values))
    return s, vectors * nonzero


def top_singular(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (m, r), s (r,), V (n, r)) of `delta`'s r largest singular values, computed without the
    full decomposition: the top r eigenpairs of the smaller Gram matrix, the other factor by one
    product. Directions of singular value 0 (to the Gram's precision) are zero columns."""
    d = delta.double()
    m, n = d.shape
    r = min(r, m, n)
    if r == 0:
        return d.new_zeros(m, 0), d.new_zeros(0), d.new_zeros(n, 0)
    wide = m <= n
    s, vectors = top_eigenpairs(gram(d, "left" if wide else "right"), r)
    other = (d.T @ vectors if wide else d @ vectors) / torch.where(s > 0, s, torch.ones_like(s))
    return (vectors, s, other) if wide else (other, s, vectors)


def top_singular_off_columns(delta: torch.Tensor, basis: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """top_singular(P delta, r) with P = I - basis basis^T (basis: m x k, orthonormal columns, or
    zero columns), without forming P delta where that costs more than its Gram: on the smaller side
    the Gram of P delta is delta^T delta - W^T W with W = basis^T delta (tall delta), or P (delta
    delta^T) P (wide delta)."""
    d = delta.double()
    m, n = d.shape
    r = min(r, m, n)
    if r == 0:
        return d.new_zeros(m, 0), d.new_zeros(0), d.new_zeros(n, 0)
    if m <= n:  # the Gram is m x m: project it
        g = gram(d, "left")
        gb = g @ basis
        bgb = basis.T @ gb
        projected = g - gb @ basis.T - basis @ gb.T + basis @ bgb @ basis.T
        s, u = top_eigenpairs(projected, r, scale=float(g.trace()))
        u = u - basis @ (basis.T @ u)  # exactly in P's range, as P delta's own vectors are
        v = d.T @ u / torch.where(s > 0, s, torch.ones_like(s))
        return u, s, v
    w = basis.T @ d
    g = gram(d, "right")
    s, v = top_eigenpairs(g - gram(w, "right"), r, scale=float(g.trace()))
    u = (d @ v - basis @ (w @ v)) / torch.where(s > 0, s, torch.ones_like(s))
    return u, s, v


# Above this condition number (largest over smallest singular value) the Gram route's error,
# about eps * cond^2 relative, would pass 1e-8: the full SVD is used instead.
GRAM_MAX_CONDITION = 1e4


def polar_and_singular_values(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P Q^T, sigma) for `x` = P Sigma Q^T (thin SVD, float64): the orthonormal polar factor and the
    singular values, largest first. From one eigendecomposition of the smaller Gram matrix,
    x^T x = Q Sigma^2 Q^T -> P Q^T = x Q Sigma^-1 Q^T (or x x^T on the other side): measured 1.3x
    (3072 x 768) to 3x (768 x 3072) faster than torch's SVD. A matrix too ill-conditioned for the Gram's
    precision (cond > GRAM_MAX_CONDITION, singular ones included) takes the full SVD, so the result
    is the SVD's to about 1e-8 relative in every case."""
    x = x.double()
    m, n = x.shape
    tall = m >= n
    values, vectors = eigh(gram(x, "right" if tall else "left"))
    values, vectors = values.flip(0), vectors.flip(1)
    if values[0] <= 0 or values[-1] < values[0] / GRAM_MAX_CONDITION**2:
        p, s, qt = torch.linalg.svd(x, full_matrices=False)
        return p @ qt, s
    s = values.sqrt()
    inverse_root = (vectors / s) @ vectors.T
    return (x @ inverse_root if tall else inverse_root @ x), s


def polar(columns: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor P Q^T of `columns` = P Sigma Q^T (the closest matrix with
    orthonormal columns): how TSV-M and Iso-CTS orthogonalise stacked singular vectors."""
    return polar_and_singular_values(columns)[0]


def mean_of(deltas: list[torch.Tensor]) -> torch.Tensor:
    return sum(d.double() for d in deltas) / len(deltas)


def per_matrix(task_vectors: list[StateDict], merge_matrix: Callable[[list[torch.Tensor]], torch.Tensor]) -> StateDict:
    """`merge_matrix(deltas)` on every 2-D tensor, the mean of the task vectors on the others,
    one tensor at a time (float64)."""
    specs = {key: (torch.float64, shape) for key, (_, shape) in specs_of(task_vectors[0]).items()}

    def merged(key: str) -> torch.Tensor:
        deltas = [tv[key].double() for tv in task_vectors]
        return merge_matrix(deltas) if is_matrix(specs[key][1]) else mean_of(deltas)

    return per_tensor(specs, merged, task_vectors)
