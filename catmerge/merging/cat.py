"""CAT Merging: theta_0 + alpha * sum of the task vectors trimmed by the bases stage's removals.

The algorithm is in `catmerge/cat.py`; this module stores its removals (the bases stage's output,
layout in docs/artifacts.md) and applies them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import cat
from ..adapters import Piece
from ..io import ArtifactError, StateDict, atomic_dir, file_record, load_weights, read_json, save_weights, write_json
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
    directory = Path(directory)
    manifest = read_json(directory / MANIFEST)
    if manifest.get("tasks") != list(tasks):
        raise ArtifactError(f"{directory / MANIFEST}: bases were computed for tasks {manifest.get('tasks')}, not {list(tasks)}")
    pieces = [Piece.from_json(p) for p in manifest["pieces"]]
    stored = [load_weights(directory / f"{task}.safetensors") for task in tasks]
    by_piece = {}
    for piece in pieces:
        if piece.family == "other":
            continue
        removals = []
        for task, tensors in zip(tasks, stored):
            basis, mask = tensors.get(f"{piece.name}.basis"), tensors.get(f"{piece.name}.mask")
            if basis is None and mask is None:
                raise ArtifactError(f"{directory / (task + '.safetensors')}: no removal for {piece.name}")
            removals.append(cat.Removal(basis, mask, [], 0.0))
        by_piece[piece.name] = removals
    return pieces, by_piece
