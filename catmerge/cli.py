"""Shared entry-point behaviour of the stages: timing lines and clean one-line errors."""

from __future__ import annotations

import sys
import time
from typing import Callable

from .io import ArtifactError
from .params import ParamsError

USER_ERRORS = (ParamsError, ArtifactError, ValueError, FileNotFoundError)


def run_stage(name: str, main: Callable[..., None]) -> None:
    start = time.perf_counter()
    print(f"[{name}] start", flush=True)
    try:
        main(*sys.argv[1:])
    except USER_ERRORS as exc:
        print(f"[{name}] error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"[{name}] done in {time.perf_counter() - start:.1f}s", flush=True)
