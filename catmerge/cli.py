"""Shared entry-point behaviour of the stages: quiet libraries, clean one-line errors."""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

from .io import ArtifactError
from .params import ParamsError

USER_ERRORS = (ParamsError, ArtifactError, ValueError, FileNotFoundError)


def run_stage(name: str, main: Callable[..., None]) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    datasets.disable_progress_bars()

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    print(f"[{name}] start", flush=True)
    try:
        main(*sys.argv[1:])
    except USER_ERRORS as exc:
        print(f"[{name}] error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"[{name}] done in {time.perf_counter() - start:.1f}s", flush=True)
