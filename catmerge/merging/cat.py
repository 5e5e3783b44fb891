"""CAT Merging: theta_0 + alpha * sum of the task vectors trimmed by the bases stage's removals.

The algorithm is in `catmerge/cat.py`; this module stores its removals (the bases stage's output,
layout in docs/artifacts.md) and applies them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import cat
from ..adapters import Piece
from ..io import (
    ArtifactError,
    StateDict,
    atomic_dir,
    file_record,
    load_weights,
    read_json,
    save_weights,
    sha256_file,
    write_json,
)
from ..task_vectors import apply_task_vector

MANIFEST = "manifest.json"
DIAGNOSTICS = "diagnostics.json"


def merge(pretrained: StateDict, task_vectors: list[StateDict], params, removals) -> StateDict:
    """`params` has `alpha` and `rescale`; `removals` is (pieces, removals by piece name)."""
    pieces, by_piece = removals
    return apply_task_vector(pretrained, cat.trimmed_sum(pieces, task_vectors, by_piece, params.rescale), params.alpha)


def write_removals(directory: str | Path, tasks: list[str], pieces: list[Piece], by_piece: dict, info: dict) -> None:
    """One safetensors file per task (`<piece>.basis` / `<piece>.mask`), the piece list and the
    diagnostics (kept eigenvalues or scores, objective captured, trace), written as one directory."""
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
        diagnostics = {
            name: {task: {"kept": r.kept, "objective": r.objective, "trace": r.trace} for task, r in zip(tasks, rs)}
            for name, rs in by_piece.items()
        }
        write_json(diagnostics, out / DIAGNOSTICS)
        files = [file_record(out / f"{task}.safetensors", out, "bases") for task in tasks]
        write_json({**info, "tasks": tasks, "pieces": [p.to_json() for p in pieces], "files": files}, out / MANIFEST)


def read_removals(directory: str | Path, tasks: list[str]) -> tuple[list[Piece], dict[str, list[cat.Removal]]]:
    """The bases stage's removals for `tasks` (in that order), checked against the manifest."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    manifest = read_json(manifest_path)
    missing = [key for key in ("tasks", "pieces", "files") if key not in manifest]
    if missing:
        raise ArtifactError(f"{manifest_path}: missing keys {missing}")
    if manifest["tasks"] != list(tasks):
        raise ArtifactError(f"{manifest_path}: bases were computed for tasks {manifest['tasks']}, not {list(tasks)}")
    for record in manifest["files"]:
        if sha256_file(directory / record["path"]) != record["sha256"]:
            raise ArtifactError(f"{directory / record['path']}: sha256 does not match {manifest_path}")
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
            removals.append(cat.Removal(basis, mask, [], 0.0))
        by_piece[piece.name] = removals
    return pieces, by_piece
