"""Per-task layer inputs for CAT (and RegMean): captured rows, stored in the cheaper form.

For a linear layer CAT needs X_k (n, d_in) only through X_k T^T or X_k^T X_k: we keep the rows
when n < d_in, else the Gram matrix (d_in, d_in). For a norm scale it needs only the per-coordinate
sum of squares of x_hat (d). File layout: docs/artifacts.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from .cat import LayerInput
from .io import ArtifactError, WeightsFile, specs_of

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


def exemplar_indices(count: int, available: int, data_seed: int, task: str, param: str = "cat.exemplars") -> torch.Tensor:
    """The `count` train images task `task` takes as exemplars (sorted), drawn with a seed from
    `data_seed` and the task name: the same images whatever the other tasks are. `param` names
    the setting that asked for `count`, for the error when the split is smaller."""
    from .benchmark.training import task_seed
    from .params import ParamsError

    if count > available:
        raise ParamsError(f"{param} = {count}: task {task}'s train split has only {available} images (lower {param})")
    generator = torch.Generator().manual_seed(task_seed(data_seed, task))
    return torch.randperm(available, generator=generator)[:count].sort().values


def capture(tower, weights: dict[str, torch.Tensor], images: torch.Tensor) -> tuple[dict[str, torch.Tensor], list, dict]:
    """(compressed layer inputs, pieces, {"adapter", "rows"}) of `tower` loaded with `weights` on
    raw `images` (or a text encoder's tokenized batch): every token of every input is a row. Raises if the adapter missed a layer input
    a piece needs."""
    from .adapters import adapter_for
    from .models import copy_weights, normalize_images

    copy_weights(tower, weights)
    adapter = adapter_for(tower)
    device = next(tower.parameters()).device
    if isinstance(images, Mapping):  # a text encoder's tokenized batch (input_ids, attention_mask, ...)
        batch = {k: v.to(device) for k, v in images.items()}
    else:  # uint8 images (N, H, W, 3), evaluation preprocessing
        batch = normalize_images(images).to(device)
    captured = {k: v.cpu() for k, v in adapter.capture_inputs(tower, batch).items()}
    shapes = {k: shape for k, (dtype, shape) in specs_of(weights).items() if dtype.is_floating_point}
    pieces = adapter.pieces(shapes, qkv="fused")
    missing = sorted({p.input for p in pieces if p.input is not None} - set(captured))
    if missing:
        raise RuntimeError(f"{adapter.NAME} adapter captured no rows for {missing}")
    rows = max(x.shape[0] for x in captured.values())  # tokens x images (the patch embedding sees no class token)
    tensors = compress(captured, {p.input for p in pieces if p.family == "norm_scale"})
    return tensors, pieces, {"adapter": adapter.NAME, "rows": rows}


def load_features(path: str | Path, task: str | None = None) -> tuple[Mapping[str, LayerInput], Mapping[str, torch.Tensor], dict]:
    """(linear inputs by name, norm sums of squares by name, metadata) of one task's features file
    (whose metadata must say `task`, when given). Each is read from the file when asked for: K
    tasks' rows for every layer of a large model need not be in memory at once."""
    weights = WeightsFile(path)
    if task is not None:
        weights.check_claims(task=task)
    keys: dict[str, dict[str, str]] = {ROWS: {}, GRAM: {}, SUM_SQUARES: {}}
    for key, (dtype, _) in weights.specs.items():
        name, _, form = key.rpartition(".")
        if form not in keys:
            raise ArtifactError(f"{path}: unexpected key {key!r} (expected <input>.rows, .gram or .sum_squares)")
        if not dtype.is_floating_point:
            raise ArtifactError(f"{path}: {key} is {dtype}, expected floating point")
        keys[form][name] = key
    linear = _StoredInputs(weights, {**keys[ROWS], **keys[GRAM]})
    return linear, _StoredInputs(weights, keys[SUM_SQUARES]), weights.metadata


class _StoredInputs(Mapping):
    """Layer inputs of a features file by input name, read (and checked) on access."""

    def __init__(self, weights: WeightsFile, keys: dict[str, str]):
        self._weights, self._keys = weights, keys

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._keys

    def stored_shape(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(key, shape) of input `name` as the file's header gives it: nothing is read."""
        key = self._keys[name]
        return key, self._weights.specs[key][1]

    def __getitem__(self, name: str):
        key = self._keys[name]
        value = self._weights[key]
        if not torch.isfinite(value).all():
            raise ArtifactError(f"{self._weights.path}: {key} contains NaN or Inf")
        form = key.rpartition(".")[2]
        if form == SUM_SQUARES:
            return value.double()
        return LayerInput(rows=value.double()) if form == ROWS else LayerInput(gram=value.double())

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def layer_inputs(tensors: dict[str, torch.Tensor], source: str) -> tuple[dict[str, LayerInput], dict[str, torch.Tensor]]:
    """Compressed features (from `capture`, or the features file `source`, named in errors) ->
    (linear inputs, norm sums of squares)."""
    linear: dict[str, LayerInput] = {}
    sum_squares: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name, _, form = key.rpartition(".")
        if not torch.isfinite(value).all():
            raise ArtifactError(f"{source}: {key} contains NaN or Inf")
        if form == ROWS:
            linear[name] = LayerInput(rows=value.double())
        elif form == GRAM:
            linear[name] = LayerInput(gram=value.double())
        elif form == SUM_SQUARES:
            sum_squares[name] = value.double()
        else:
            raise ArtifactError(f"{source}: unexpected key {key!r} (expected <input>.rows, .gram or .sum_squares)")
    return linear, sum_squares
