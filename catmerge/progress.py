"""Progress bars: shown on a terminal, hidden in logs, forced with CATMERGE_PROGRESS=always
(set by the Prefect flows, which pass a stage's output through to the person watching)."""

from __future__ import annotations

import os

from tqdm import tqdm


def progress(iterable, desc: str, **kwargs):
    forced = os.environ.get("CATMERGE_PROGRESS") == "always"
    return tqdm(iterable, desc=desc, leave=False, disable=False if forced else None, **kwargs)
