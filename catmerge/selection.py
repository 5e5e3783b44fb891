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
import time
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
                "io.py", "merging/__init__.py", "models.py", "params.py", "params_base.py", "selection.py", "task_vectors.py", "workspace.py"]


def _code_files(method: str) -> list[Path]:
    files = [PACKAGE / "merging" / f"{method}.py", *sorted((PACKAGE / "merging").glob("_*.py"))]  # its shared helpers too
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
            ws.path(layout.dataset_dir(task) / "train.parquet"),  # the exemplars of RegMean and RegMean++
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
    key = json.dumps({"method": method, "params": _key_params(full_params), "inputs": digest, "code": code}, sort_keys=True)
    return cache_dir / f"{method}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _key_params(full_params: dict) -> dict:
    return {k: v for k, v in full_params.items() if k != "methods"}


def _entry_checksum(entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def cache_entry(method: str, full_params: dict, digest: str, code: str, tasks: list[str], scores: dict, seconds: float) -> dict:
    """What a cache file holds: the key's parts in full, the scores, and a checksum of it all."""
    entry = {"method": method, "params": _key_params(full_params), "inputs_sha256": digest, "code_sha256": code,
             "tasks": list(tasks), "scores": scores, "seconds": round(seconds, 3)}
    return {**entry, "sha256": _entry_checksum(entry)}


def cached_scores(path: Path, method: str, full_params: dict, digest: str, code: str, tasks: list[str]) -> tuple[dict | None, str]:
    """(the scores of a cache file, "") when it is whole and was made for exactly this candidate,
    inputs, code and task set; else (None, why not). Nothing in the cache is trusted unchecked."""
    if not path.is_file():
        return None, ""
    try:
        entry = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"unreadable: {exc.__class__.__name__}: {exc}"
    if not isinstance(entry, dict):
        return None, "not a JSON object"
    if entry.get("sha256") != _entry_checksum(entry):
        return None, "its checksum does not match its content: edited or damaged"
    expected = {"method": method, "params": _key_params(full_params), "inputs_sha256": digest, "code_sha256": code, "tasks": list(tasks)}
    differ = [key for key, value in expected.items() if entry.get(key) != value]
    if differ:
        return None, f"recorded {', '.join(differ)} differ from this run's"
    scores = entry.get("scores")
    if (not isinstance(scores, dict) or list(scores) != list(tasks)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 100 for v in scores.values())):
        return None, "its scores are not one accuracy in [0, 100] per task"
    return scores, ""


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def cost_estimate(cache_dir: Path, to_score: dict[str, int], threshold: int) -> str | None:
    """With more than `threshold` candidates to score, the line that says how long they will take:
    per method, its count times the median `seconds` its entries in the cache record (entries of
    other inputs or code too: a time, not a score, is all that is read), before any scoring."""
    total = sum(to_score.values())
    if total <= threshold:
        return None
    times: dict[str, list[float]] = {}
    for path in sorted(cache_dir.glob("*.json")) if cache_dir.is_dir() else []:
        try:
            entry = json.loads(path.read_text())
            method, seconds = entry["method"], entry["seconds"]
        except (OSError, ValueError, TypeError, KeyError):
            continue
        if isinstance(method, str) and method in to_score and isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and 0 < seconds < 1e7:
            times.setdefault(method, []).append(float(seconds))
    known = {m: statistics.median(times[m]) for m in to_score if to_score[m] and m in times}
    parts = [f"{m} {n} x {known[m]:.1f} s" for m, n in to_score.items() if n and m in known]
    unknown = [f"{m} {n}" for m, n in to_score.items() if n and m not in known]
    line = f"select: {total} candidates to score (more than select_limits.warn_candidates = {threshold})"
    if known:
        estimate = sum(to_score[m] * seconds for m, seconds in known.items())
        line += f"; about {_duration(estimate)} at the times {cache_dir} records ({', '.join(parts)})"
    if unknown:
        line += f"; {', '.join(unknown)}: no time recorded yet, known after the first candidate"
    return line


def select(ws: Workspace, cache_dir: str | Path, log=print) -> dict:
    """{method: grid, candidates with their validation scores, chosen point and full params}."""
    cache_dir = Path(cache_dir)
    ws.check_inputs({}, SPLIT)  # the files the digest covers: manifests first, so a bad one is named
    digest = inputs_digest(ws)
    tasks = ws.params.tasks
    out = {"split": SPLIT, "inputs_sha256": digest, "methods": {}}
    # every candidate's cache file is looked at first: the cost of the rest is said before any work
    plan = []
    for method in ws.params.merge.methods:
        base = method_params(ws.params, method)
        code = code_digest(method)
        for point in candidates(ws.params, method):
            chosen_params = with_params(base, point) if base is not None else None
            full = chosen_params.model_dump(by_alias=True) if chosen_params is not None else {}
            path = _cache_path(cache_dir, method, full, digest, code)
            scores, problem = cached_scores(path, method, full, digest, code, tasks)
            if problem:
                log(f"select: cache entry {path} ignored ({problem}); scoring again")
            plan.append((method, point, chosen_params, full, code, path, scores))
    to_score = sum(scores is None for *_, scores in plan)
    log(f"select: {len(plan)} candidates, {len(plan) - to_score} from the cache, {to_score} to score on {SPLIT}")
    counts = {m: sum(scores is None for method, *_, scores in plan if method == m) for m in ws.params.merge.methods}
    estimate = cost_estimate(cache_dir, counts, ws.params.select_limits.warn_candidates)
    if estimate:
        log(estimate)
    # what each method needs beyond the task vectors (CAT's bases ...), checked before any scoring
    ws.check_inputs({method: chosen for method, _, chosen, *_, scores in reversed(plan) if scores is None}, SPLIT)
    evaluated = 0
    rows_by_method: dict[str, list] = {m: [] for m in ws.params.merge.methods}
    for method, point, chosen_params, full, code, path, scores in plan:
        if scores is None:
            start = time.perf_counter()
            scores = ws.score(ws.merged(method, chosen_params), SPLIT)
            seconds = time.perf_counter() - start
            write_json(cache_entry(method, full, digest, code, tasks, scores, seconds), path)
            evaluated += 1
            if evaluated == 1 and to_score > 1:
                log(f"select: {seconds:.1f} s for the first candidate; about {_duration(seconds * (to_score - 1))} "
                    f"for the other {to_score - 1}")
        rows = rows_by_method[method]
        rows.append({"point": point, "params": full, "scores": scores, "average": statistics.mean(scores.values())})
        log(f"{method} {point or '(fixed params)'}: {SPLIT} average {rows[-1]['average']:.2f}")
    for method, rows in rows_by_method.items():
        best = max(range(len(rows)), key=lambda j: (rows[j]["average"], -j))
        grid = ws.params.select.get(method, {})
        chosen = rows[best]["point"]
        out["methods"][method] = {
            "grid": grid,
            "chosen": chosen,
            # chosen at the smallest or largest candidate: the best may lie outside the grid, unless
            # that candidate is the param's own limit (TIES k = 100, RegMean nondiagonal_scale = 0)
            "at_grid_edge": [k for k, v in chosen.items() if _numeric(grid[k]) and v in (min(grid[k]), max(grid[k]))
                             and v not in _closed_limits(method, k)],
            "at_param_limit": [k for k, v in chosen.items() if _numeric(grid[k]) and v in _closed_limits(method, k)],
            "params": rows[best]["params"],
            "average": rows[best]["average"],
            "candidates": rows,
        }
    log(f"select: {evaluated} candidates evaluated, {len(plan) - evaluated} from the cache")
    return out


def _closed_limits(method: str, key: str) -> set:
    """The values `<method>.<key>` may not go beyond (its params field's ge / le), so a grid cannot
    be widened past them."""
    from annotated_types import Ge, Le

    from .merging import params_class

    field = params_class(method).model_fields.get(key)
    metadata = field.metadata if field is not None else []
    return {m.ge for m in metadata if isinstance(m, Ge)} | {m.le for m in metadata if isinstance(m, Le)}


def _numeric(values: list) -> bool:
    return len(values) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def read_selection(params, path: str | Path = layout.SELECTION) -> dict:
    """metrics/selection.json, checked to be `select`'s choice for these params: every method of
    `merge.methods` chosen, on the grid params.yaml has now, with values its params block accepts."""
    path = Path(path)
    rerun = "run stage select first (dvc repro select)"
    if not path.is_file():
        raise ArtifactError(f"missing {path} (written by stage select): {rerun}")
    selection = read_json(path)
    methods = selection.get("methods") if isinstance(selection, dict) else None
    if not isinstance(methods, dict):
        raise ArtifactError(f"{path}: expected a key 'methods' mapping each method to its choice; {rerun}")
    for method in params.merge.methods:
        entry = methods.get(method)
        if not isinstance(entry, dict) or not isinstance(entry.get("chosen"), dict):
            raise ArtifactError(f"{path}: no choice for {method}; {rerun}")
        grid = params.select.get(method, {})
        if entry.get("grid") != grid:
            raise ArtifactError(f"{path}: chosen on the grid {entry.get('grid')} for {method}, params.yaml has {grid} now; {rerun}")
        base = method_params(params, method)
        if base is not None:
            try:
                with_params(base, entry["chosen"])
            except ValueError as exc:  # pydantic's ValidationError is a ValueError
                raise ArtifactError(f"{path}: the choice {entry['chosen']} for {method} is not valid: "
                                    f"{str(exc).splitlines()[-1].strip()}; {rerun}") from None
    return selection


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
