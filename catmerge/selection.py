"""Hyperparameter selection on validation data only.

Every candidate of `select.<method>` (a grid in params.yaml) is merged and scored on each task's
validation split (a pool of its own, disjoint from train, where the exemplars come from, and from
test); the best average wins, ties to the first candidate in grid order. Scores are cached by
content (method, its params, a digest of the inputs and of the code that merges and scores), so
extending a grid by one value costs one evaluation. Nothing here opens a test split.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from . import layout
from .io import ArtifactError, read_json, sha256_file, write_json
from .params import candidates, method_params, with_params

if TYPE_CHECKING:
    from .workspace import Workspace

SPLIT = "val"
PACKAGE = Path(__file__).resolve().parent
# The code a validation score depends on (besides the method's own module): dvc.yaml's `select`
# stage lists the same as deps. Editing anything else (the report, say) keeps the cache.
SCORING_CODE = ["adapters", "model_configs", "cat.py", "configs.py", "data.py", "evaluation.py", "features.py",
                "io.py", "merging/__init__.py", "models.py", "params.py", "selection.py", "task_vectors.py", "workspace.py"]


def _code_files(method: str) -> list[Path]:
    files = [PACKAGE / "merging" / f"{method}.py"]
    for name in SCORING_CODE:
        path = PACKAGE / name
        files += sorted(p for p in path.rglob("*") if p.suffix in (".py", ".json")) if path.is_dir() else [path]
    return files


def inputs_digest(ws: Workspace) -> str:
    """sha256 over the data a validation score depends on: weights, features, val splits, heads,
    the model config name and the evaluation batch size."""
    files = [ws.path(layout.PRETRAINED_TOWER)]
    for task in ws.params.tasks:
        files += [
            ws.path(layout.task_vector_path(task)),
            ws.path(layout.features_path(task)),
            ws.path(layout.dataset_dir(task) / f"{SPLIT}.parquet"),
            ws.path(layout.expert_dir(task) / "head.safetensors"),
        ]
    device = ws.tower_device  # CPU scores keep their old keys; scores from a GPU are cached apart
    digest = hashlib.sha256(f"{ws.params.model} {ws.params.evaluate.batch_size}{'' if device == 'cpu' else ' ' + device}".encode())
    for path in files:
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def code_digest(method: str) -> str:
    digest = hashlib.sha256()
    for path in _code_files(method):
        digest.update(f"{path.relative_to(PACKAGE)} {sha256_file(path)}".encode())
    return digest.hexdigest()


def _cache_path(cache_dir: Path, method: str, full_params: dict, digest: str, code: str) -> Path:
    # the method list is not a hyperparameter: adding a method must not invalidate Task Arithmetic
    key_params = {k: v for k, v in full_params.items() if k != "methods"}
    key = json.dumps({"method": method, "params": key_params, "inputs": digest, "code": code}, sort_keys=True)
    return cache_dir / f"{method}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def select(ws: Workspace, cache_dir: str | Path, log=print) -> dict:
    """{method: grid, candidates with their validation scores, chosen point and full params}."""
    cache_dir = Path(cache_dir)
    digest = inputs_digest(ws)
    out = {"split": SPLIT, "inputs_sha256": digest, "methods": {}}
    evaluated = cached = 0
    for method in ws.params.merge.methods:
        base = method_params(ws.params, method)
        code = code_digest(method)
        rows = []
        for point in candidates(ws.params, method):
            chosen_params = with_params(base, point) if base is not None else None
            full = chosen_params.model_dump(by_alias=True) if chosen_params is not None else {}
            path = _cache_path(cache_dir, method, full, digest, code)
            if path.is_file():
                scores = read_json(path)["scores"]
                cached += 1
            else:
                scores = ws.score(ws.merged(method, chosen_params), SPLIT)
                write_json({"method": method, "params": full, "inputs_sha256": digest, "scores": scores}, path)
                evaluated += 1
            rows.append({"point": point, "params": full, "scores": scores, "average": statistics.mean(scores.values())})
            log(f"{method} {point or '(fixed params)'}: {SPLIT} average {rows[-1]['average']:.2f}")
        best = max(range(len(rows)), key=lambda j: (rows[j]["average"], -j))
        grid = ws.params.select.get(method, {})
        chosen = rows[best]["point"]
        out["methods"][method] = {
            "grid": grid,
            "chosen": chosen,
            # chosen at the smallest or largest candidate: the best may lie outside the grid
            "at_grid_edge": [k for k, v in chosen.items() if _numeric(grid[k]) and v in (min(grid[k]), max(grid[k]))],
            "params": rows[best]["params"],
            "average": rows[best]["average"],
            "candidates": rows,
        }
    log(f"select: {evaluated} candidates evaluated, {cached} from the cache")
    return out


def _numeric(values: list) -> bool:
    return len(values) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def chosen_params(params, selection: dict, method: str):
    """`method`'s params block with the chosen point applied (None for weight averaging)."""
    base = method_params(params, method)
    if method not in selection["methods"]:
        raise ArtifactError(f"{layout.SELECTION}: no entry for {method}; rerun stage select (dvc repro)")
    return None if base is None else with_params(base, selection["methods"][method]["chosen"])


def alpha_curve(entry: dict) -> list[tuple[float, float]]:
    """(alpha, best validation average over the other params at that alpha), by alpha."""
    best: dict[float, float] = {}
    for row in entry["candidates"]:
        alpha = row["params"].get("alpha")
        if alpha is not None and "alpha" in row["point"]:
            best[alpha] = max(best.get(alpha, float("-inf")), row["average"])
    return sorted(best.items())
