"""Per-task layer inputs for CAT (and RegMean): captured rows, stored in the cheaper form.

For a linear layer CAT needs X_k (n, d_in) only through X_k T^T or X_k^T X_k: we keep the rows
when n < d_in, else the Gram matrix (d_in, d_in). For a norm scale it needs only the per-coordinate
sum of squares of x_hat (d). File layout: docs/artifacts.md.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .cat import LayerInput
from .io import ArtifactError, load_weights, read_metadata

ROWS, GRAM, SUM_SQUARES = "rows", "gram", "sum_squares"


def compress(captured: dict[str, torch.Tensor], norm_inputs: set[str]) -> dict[str, torch.Tensor]:
    """Captured rows -> what the bases need, keyed `<input>.<form>`."""
    out = {}
    for name, rows in captured.items():
        if name in norm_inputs:
            out[f"{name}.{SUM_SQUARES}"] = rows.double().square().sum(dim=0)
        elif rows.shape[0] < rows.shape[1]:
            out[f"{name}.{ROWS}"] = rows.contiguous()
        else:
            x = rows.double()
            out[f"{name}.{GRAM}"] = x.T @ x
    return out


def load_features(path: str | Path) -> tuple[dict[str, LayerInput], dict[str, torch.Tensor], dict]:
    """(linear inputs by name, norm sums of squares by name, metadata) of one task's features file."""
    tensors = load_weights(path)
    linear: dict[str, LayerInput] = {}
    sum_squares: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name, _, form = key.rpartition(".")
        if not torch.isfinite(value).all():
            raise ArtifactError(f"{path}: {key} contains NaN or Inf")
        if form == ROWS:
            linear[name] = LayerInput(rows=value.double())
        elif form == GRAM:
            linear[name] = LayerInput(gram=value.double())
        elif form == SUM_SQUARES:
            sum_squares[name] = value.double()
        else:
            raise ArtifactError(f"{path}: unexpected key {key!r} (expected <input>.rows, .gram or .sum_squares)")
    return linear, sum_squares, read_metadata(path)
