"""Merge methods. Each is one module here with a `merge(pretrained, task_vectors, params)` function
(`cat` also takes the bases stage's removals).

Modules are imported on first use, so validating params (which names the methods) does not
import torch.
"""

import importlib
from collections.abc import Callable

METHOD_NAMES = ("weight_averaging", "task_arithmetic", "cat")


def merge_method(name: str) -> Callable:
    if name not in METHOD_NAMES:
        raise KeyError(f"unknown merge method {name!r}; known: {', '.join(METHOD_NAMES)}")
    return importlib.import_module(f"{__name__}.{name}").merge
