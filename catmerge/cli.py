"""Shared entry-point behaviour of the stages: timing lines, locks, confined writes and clean
one-line errors."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .io import ArtifactError, HubUnavailable, confined_writes
from .params import Params, ParamsError
from .workspace_lock import dvc_lock_while_running, workspace_lock

# Bad params or bad input files: the message says everything, a traceback would only hide it.
USER_ERRORS = (ParamsError, ArtifactError)
# Set by a Prefect flow for the stages it runs: {params file: sha256} as the flow set them.
PARAMS_DIGEST_ENV = "CATMERGE_PARAMS_SHA256"
PARAMS_CHANGED = "changed by another command during this run"  # the flow matches this text


class ParamsChanged(ArtifactError):
    """A params file differs from what the flow running this stage set."""


def check_task_argument(params: Params, task: str) -> str:
    """Per-task stages run only for tasks listed in params.yaml (as dvc.yaml's foreach does)."""
    if task not in params.tasks:
        raise ParamsError(f"task {task!r} is not in `tasks` of params.yaml: {', '.join(params.tasks)}")
    return task


def params_digests(root: Path, names: list[str]) -> dict[str, str]:
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in names if (root / name).is_file()}


def _check_params_unchanged(root: Path) -> None:
    """Under a flow: the params files are still as the flow set them (a command that slipped in
    between two of its stages may have rewritten them; the flow puts them back and asks again)."""
    expected = json.loads(os.environ.get(PARAMS_DIGEST_ENV) or "{}")
    changed = [name for name, digest in params_digests(root, list(expected)).items() if digest != expected[name]]
    changed += [name for name in expected if not (root / name).is_file()]
    if changed:
        raise ParamsChanged(f"{', '.join(sorted(set(changed)))}: {PARAMS_CHANGED} (not as the flow running this stage set it)")


def _os_error(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


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
    root = Path.cwd()
    log = lambda message: print(f"[{name}] {message}", file=sys.stderr, flush=True)
    try:
        from .hub import head_cache_dir

        with (
            workspace_lock(root, command=f"python -m stages.{name} {' '.join(args)}".strip()),
            dvc_lock_while_running(root, log=log),
            confined_writes(root, head_cache_dir()),  # the project, and the heads cache it shares with others
        ):
            _check_params_unchanged(root)
            main(*args)
    except HubUnavailable as exc:  # may pass: the Prefect flow retries these, and only these
        print(f"[{name}] transient error: {exc}", file=sys.stderr, flush=True)
        sys.exit(75)
    except USER_ERRORS as exc:
        print(f"[{name}] error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except OSError as exc:  # a full disk, a read-only directory: the file and the reason say it all
        print(f"[{name}] error: {_os_error(exc)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"[{name}] interrupted: outputs already in place are whole, the others were not written", file=sys.stderr, flush=True)
        sys.exit(130)
    print(f"[{name}] done in {time.perf_counter() - start:.1f}s", flush=True)
