"""Merge methods. Each is one module here with a `merge(pretrained, task_vectors, params)` function
(`cat` also takes the bases stage's removals, `regmean` the layer inputs). Methods of the form
theta_0 + alpha * tau_m also have `merged_vector(task_vectors, params, ...)` -> tau_m, so a grid
over alpha computes tau_m once.

Modules are imported on first use, so validating params (which names the methods) does not
import torch.
"""

import importlib
from collections.abc import Callable

METHOD_NAMES = ("weight_averaging", "task_arithmetic", "ties", "regmean", "pcb", "cat")


def method_module(name: str):
    if name not in METHOD_NAMES:
        raise KeyError(f"unknown merge method {name!r}; known: {', '.join(METHOD_NAMES)}")
    return importlib.import_module(f"{__name__}.{name}")


def merge_method(name: str) -> Callable:
    return method_module(name).merge
