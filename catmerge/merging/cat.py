"""CAT Merging: theta_0 + alpha * sum of the task vectors trimmed by the bases stage's removals.

The algorithm is in `catmerge/cat.py`; this module stores its removals (the bases stage's output,
layout in docs/artifacts.md) and applies them.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import ConfigDict, Field

from .. import cat
from ..adapters import Piece, get_adapter
from ..features import GRAM, ROWS
from ..io import (
    ArtifactError,
    StateDict,
    WeightsFile,
    atomic_dir,
    file_record,
    load_weights,
    read_json,
    save_weights,
    specs_of,
    verify_manifest,
    write_json,
)
from ..params_base import ParamsError, Strict

# The CAT params the bases stage reads (dvc.yaml lists the same); the others are read by features or merge.
BASES_PARAMS = ("c", "lambda", "c_norm", "lambda_norm", "c_shift", "qkv", "conv", "drop_nonpositive", "shift_score", "precision")
MANIFEST = "manifest.json"
DIAGNOSTICS = "diagnostics.json"


class CatParams(Strict):
    """CAT Merging (catmerge/cat.py). Stages: features (exemplars, feature_alpha), bases (c ...
    shift_score), merge (alpha, rescale). `lambda` is also accepted as `lambda_` (a Python keyword)."""

    model_config = ConfigDict(populate_by_name=True)

    exemplars: int = Field(default=2, ge=1, description="unlabeled train images per task whose tokens are the feature rows")
    feature_alpha: float = Field(default=1.0, gt=0, description="features come from theta_0 + feature_alpha * T_k")
    c: int = Field(default=2, ge=0, description="removal directions per linear weight and task (Eq. 11)")
    lambda_: float = Field(default=1.0, ge=0, alias="lambda", description="weight of task i's own signal in Eq. 10")
    c_norm: int | None = Field(default=None, ge=0, description="coordinates masked per norm scale (Eq. 14); null = c")
    lambda_norm: float | None = Field(default=None, ge=0, description="lambda of Eq. 13; null = lambda")
    c_shift: int | None = Field(default=None, ge=0, description="coordinates masked per shift (Eq. 17); null = c")
    qkv: Literal["split", "fused"] = "split"
    conv: bool = Field(default=False, description="treat the patch embedding as a linear map on unfolded patches")
    drop_nonpositive: bool = True
    precision: Literal["float64", "float32"] = Field(default="float64", description="bases: precision of the linear weights' products and eigenproblems (float32: half the time, for large models)")
    shift_score: Literal["others", "own"] = "others"
    rescale: bool = Field(default=True, description="scale each trimmed linear weight / norm scale back to its norm")
    alpha: float = Field(default=0.4, gt=0, description="scaling of the summed trimmed task vectors")


PARAMS = CatParams
NEEDS = frozenset({"removals"})


def merged_vector(task_vectors: list[StateDict], params, inputs) -> StateDict:
    """sum_i trimmed T_i (independent of alpha); `inputs.removals` is (pieces, removals by piece name)."""
    pieces, by_piece = inputs.removals
    return cat.trimmed_sum(pieces, task_vectors, by_piece, params.rescale)


def check_params(params) -> None:
    """CAT's block (and grid) against the model and the data: exemplars the train split has, and
    c's that leave something of each layer."""
    from ..configs import model_config

    p = params.cat
    if params.datasets.max_train is not None and p.exemplars > params.datasets.max_train:
        raise ValueError(f"cat.exemplars = {p.exemplars}: more than the {params.datasets.max_train} train images per task "
                         f"that datasets.max_train keeps")
    vision = model_config(params.model).get("vision_cfg", {})
    width = vision.get("width", vision.get("hidden_size"))  # open_clip / transformers names
    if width is None:
        return  # the bases stage checks each layer's width itself
    grid = params.select.get("cat", {})
    for key in ("c", "c_norm", "c_shift"):
        for where, value in [(f"cat.{key}", getattr(p, key))] + [(f"select.cat.{key}", v) for v in grid.get(key, [])]:
            if not isinstance(value, int):
                continue
            if key == "c" and value >= width:  # B_k would span every direction: nothing of T_i would be kept
                raise ValueError(f"{where} = {value}: must be less than {width}, the output width of the narrowest linear "
                                 f"layer CAT trims in model {params.model}")
            if value > width:
                raise ValueError(f"{where} = {value}: more than the {width} coordinates of the narrowest norm scale "
                                 f"or shift CAT masks in model {params.model}")


def settings(p) -> cat.Settings:
    """`cat` params -> the algorithm's settings, with the norm and shift defaults resolved."""
    return cat.Settings(
        c=p.c,
        lam=p.lambda_,
        c_norm=p.c if p.c_norm is None else p.c_norm,
        lambda_norm=p.lambda_ if p.lambda_norm is None else p.lambda_norm,
        c_shift=p.c if p.c_shift is None else p.c_shift,
        drop_nonpositive=p.drop_nonpositive,
        shift_score=p.shift_score,
        precision=p.precision,
    )


def resolved_params(p) -> dict:
    """The bases params with defaults resolved, as recorded in the manifest."""
    resolved = dataclasses.asdict(settings(p))
    resolved["lambda"] = resolved.pop("lam")
    return {**resolved, "qkv": p.qkv, "conv": p.conv}


def compute_removals(pretrained, task_vectors: list, features: list, p, names: list[str], device: str = "cpu"):
    """(pieces, removals by piece, manifest info, Eq. 10 terms by linear piece) for `cat` params
    `p`. `features[k]` is task k's `load_features` triple and `names[k]` its file (for errors)."""
    adapter_names = {meta.get("adapter") for _, _, meta in features}
    if len(adapter_names) != 1:
        raise ArtifactError(f"features {names} come from different adapters: {sorted(map(str, adapter_names))}")
    adapter = get_adapter(adapter_names.pop())
    shapes = {k: shape for k, (dtype, shape) in specs_of(pretrained).items() if dtype.is_floating_point}
    pieces = adapter.pieces(shapes, p.qkv, p.conv)
    for piece in pieces:
        width = piece.stop - piece.start
        if piece.family == "linear" and p.c >= width:
            raise ParamsError(f"cat.c = {p.c}: must be below the output width {width} of {piece.name}")
        for key, value in (("c_norm", p.c_norm), ("c_shift", p.c_shift)):
            if value is not None and value > width and piece.family == ("norm_scale" if key == "c_norm" else "shift"):
                raise ParamsError(f"cat.{key} = {value}: more than the {width} coordinates of {piece.name}")
        for name, (linear, sums, _) in zip(names, features):
            if piece.input is not None and piece.input not in (linear if piece.family == "linear" else sums):
                raise ArtifactError(f"{name}: no features for {piece.input} (needed by {piece.name})")
            if piece.family == "linear":
                _check_input_width(linear, piece, math.prod(shapes[piece.key][1:]), name)  # a conv: unfolded patches
    inputs = [(linear, sums) for linear, sums, _ in features]
    removals, terms = cat.model_removals(pieces, task_vectors, inputs, settings(p), device)
    return pieces, removals, {"adapter": adapter.NAME, "params": resolved_params(p)}, terms


def _check_input_width(inputs, piece: Piece, d_in: int, source: str) -> None:
    """Refuse, before any work, a task's rows (n, d) or Gram matrix (d, d) of a width other than
    the d_in of the weight they feed. A features file answers from its header, without reading."""
    shape_of = getattr(inputs, "stored_shape", None)
    if shape_of is not None:
        key, shape = shape_of(piece.input)
    else:
        x = inputs[piece.input]
        key, shape = (f"{piece.input}.{ROWS}", tuple(x.rows.shape)) if x.rows is not None else (f"{piece.input}.{GRAM}", tuple(x.gram.shape))
    if len(shape) != 2 or shape[1] != d_in or (key.endswith(GRAM) and shape[0] != d_in):
        raise ArtifactError(f"{source}: {key} is {shape}; the weight {piece.key} it feeds takes inputs of width {d_in}")


def write_removals(
    directory: str | Path, tasks: list[str], pieces: list[Piece], by_piece: dict, info: dict, terms: dict | None = None
) -> None:
    """One safetensors file per task (`<piece>.basis` / `<piece>.mask`), the piece list and the
    diagnostics (kept eigenvalues or scores, objective captured, trace, and for linear pieces the
    Eq. 10 terms per task pair from `compute_removals`), written as one directory."""
    with atomic_dir(directory) as out:
        for k, task in enumerate(tasks):
            tensors = {}
            for piece in pieces:
                if piece.name not in by_piece:
                    continue
                removal = by_piece[piece.name][k]
                if removal.basis is not None:
                    tensors[f"{piece.name}.basis"] = removal.basis
                else:
                    tensors[f"{piece.name}.mask"] = removal.mask.to(torch.int64)
            save_weights(tensors, out / f"{task}.safetensors", {"task": task})
        terms = terms or {}
        diagnostics = {}
        for name, rs in by_piece.items():
            diagnostics[name] = {}
            for k, (task, r) in enumerate(zip(tasks, rs)):
                entry = {"kept": r.kept, "objective": r.objective, "trace": r.trace}
                if name in terms:
                    entry["pairs"] = {tasks[i]: values for i, values in terms[name][k].items()}
                diagnostics[name][task] = entry
        write_json(diagnostics, out / DIAGNOSTICS)
        files = [file_record(out / f"{task}.safetensors", out, "bases") for task in tasks] + [file_record(out / DIAGNOSTICS, out, "bases")]
        write_json({**info, "tasks": tasks, "pieces": [p.to_json() for p in pieces], "files": files}, out / MANIFEST)


def read_removals(directory: str | Path, tasks: list[str]) -> tuple[list[Piece], dict[str, list[cat.Removal]]]:
    """The bases stage's removals for `tasks` (in that order), checked against the manifest."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    # the cheap checks first (the manifest's task list, each file's own `task`), then the sha256s
    if not directory.is_dir():
        raise ArtifactError(f"missing directory: {directory}")
    manifest = read_json(manifest_path)
    missing = [key for key in ("tasks", "pieces") if key not in manifest] if isinstance(manifest, dict) else ["tasks", "pieces"]
    if missing:
        raise ArtifactError(f"{manifest_path}: missing keys {missing}")
    if manifest["tasks"] != list(tasks):
        raise ArtifactError(f"{manifest_path}: bases were computed for tasks {manifest['tasks']}, not {list(tasks)}")
    for task in tasks:  # a basis file copied over another task's still says its own task
        WeightsFile(directory / f"{task}.safetensors").check_claims(task=task)
    manifest = verify_manifest(directory, MANIFEST)
    pieces = [Piece.from_json(p) for p in manifest["pieces"]]
    stored = [load_weights(directory / f"{task}.safetensors") for task in tasks]
    by_piece = {}
    for piece in pieces:
        if piece.family == "other":
            continue
        removals = []
        for task, tensors in zip(tasks, stored):
            path = directory / f"{task}.safetensors"
            basis, mask = tensors.get(f"{piece.name}.basis"), tensors.get(f"{piece.name}.mask")
            if basis is None and mask is None:
                raise ArtifactError(f"{path}: no removal for {piece.name}")
            width = piece.stop - piece.start
            if (basis is not None and (basis.dim() != 2 or basis.shape[0] != width)) or (
                mask is not None and (mask.dim() != 1 or (mask.numel() and int(mask.max()) >= width))
            ):
                raise ArtifactError(f"{path}: removal for {piece.name} does not fit its {width} rows")
            if basis is not None and not torch.isfinite(basis).all():
                raise ArtifactError(f"{path}: {piece.name}.basis contains NaN or Inf")
            if mask is not None and mask.numel() and int(mask.min()) < 0:
                raise ArtifactError(f"{path}: {piece.name}.mask has a negative index ({int(mask.min())})")
            removals.append(cat.Removal(basis, mask, [], 0.0))
        by_piece[piece.name] = removals
    return pieces, by_piece
