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


def top_singular(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (m, r), s (r,), V (n, r)) of `delta`'s r largest singular values, computed without the
    full decomposition: the top r eigenpairs of the smaller Gram matrix (LAPACK's syevr computes
    only those), the other factor by one product. Directions of singular value 0 (to the Gram's
    precision) are zero columns."""
    d = delta.double()
    m, n = d.shape
    r = min(r, m, n)
    if r == 0:
        return d.new_zeros(m, 0), d.new_zeros(0), d.new_zeros(n, 0)
    wide = m <= n
    gram = (d @ d.T if wide else d.T @ d).numpy()
    size = gram.shape[0]
    values, vectors = scipy.linalg.eigh(gram, subset_by_index=[size - r, size - 1], driver="evr")
    values, vectors = torch.from_numpy(values[::-1].copy()), torch.from_numpy(vectors[:, ::-1].copy())
    # eigenvalues of the Gram below its rounding level are 0: the Gram squares the condition
    # number, so singular values under about 1e-7 of the largest are not resolved (and not needed:
    # these methods keep top directions)
    nonzero = values > values[0].clamp(min=0) * 10 * size * torch.finfo(torch.float64).eps
    s = values.clamp(min=0).sqrt()
    s = torch.where(nonzero, s, torch.zeros_like(s))
    vectors = vectors * nonzero
    other = (d.T @ vectors if wide else d @ vectors) / torch.where(nonzero, s, torch.ones_like(s))
    return (vectors, s, other) if wide else (other, s, vectors)


def polar(columns: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor P Q^T of `columns` = P Sigma Q^T (the closest matrix with
    orthonormal columns): how TSV-M and Iso-CTS orthogonalise stacked singular vectors."""
    p, _, qt = torch.linalg.svd(columns, full_matrices=False)
    return p @ qt


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
