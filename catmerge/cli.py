"""Shared entry-point behaviour of the stages: timing lines and clean one-line errors."""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .io import ArtifactError, HubUnavailable
from .params import Params, ParamsError
from .workspace_lock import workspace_lock

# Bad params or bad input files: the message says everything, a traceback would only hide it.
USER_ERRORS = (ParamsError, ArtifactError)


def check_task_argument(params: Params, task: str) -> str:
    """Per-task stages run only for tasks listed in params.yaml (as dvc.yaml's foreach does)."""
    if task not in params.tasks:
        raise ParamsError(f"task {task!r} is not in `tasks` of params.yaml: {', '.join(params.tasks)}")
    return task


def run_stage(name: str, main: Callable[..., None]) -> None:
    start = time.perf_counter()
    print(f"[{name}] start", flush=True)
    args = sys.argv[1:]
    try:
        inspect.signature(main).bind(*args)
    except TypeError:
        usage = " ".join(f"<{p}>" for p in inspect.signature(main).parameters)
        print(f"usage: python -m stages.{name} {usage}", file=sys.stderr)
        sys.exit(2)
    try:
        with workspace_lock(Path.cwd(), command=f"python -m stages.{name} {' '.join(args)}".strip()):
            main(*args)
    except HubUnavailable as exc:  # may pass: the Prefect flow retries these, and only these
        print(f"[{name}] transient error: {exc}", file=sys.stderr, flush=True)
        sys.exit(75)
    except USER_ERRORS as exc:
        print(f"[{name}] error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"[{name}] done in {time.perf_counter() - start:.1f}s", flush=True)
