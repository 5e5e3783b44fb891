"""Merge methods: one module here per method, all of one shape.

A method module declares
  PARAMS  its params block (a pydantic model; params.yaml key = the module name), or None;
  NEEDS   what it reads beyond theta_0 and the task vectors: a subset of
          {"layer_inputs"}  each task's linear-layer inputs on `params.exemplars` unlabeled train
                            inputs of that task, through its expert (RegMean),
          {"exemplars"}     those inputs themselves and the architecture, to run models the method
                            builds (RegMean++),
          {"removals"}      CAT's removal bases and masks (the bases stage, or computed from features);
and either
  merged_vector(task_vectors, params, inputs) -> tau_m   for theta_0 + params.alpha * tau_m methods
                                                         (a grid over alpha then computes tau_m once), or
  merge(pretrained, task_vectors, params, inputs) -> the merged weights.
`inputs` is a MergeInputs holding what NEEDS asked for. Optionally `check_params(params)` checks
the method's block against the rest of params.yaml (the model, the data).

Adding a method is one new module plus its block (and grid) in params.yaml: the pipeline, the
library API (`catmerge.merge`) and the report find it here.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from functools import cache
from types import ModuleType

NEEDS_KINDS = frozenset({"layer_inputs", "exemplars", "removals"})
# Found without importing them (validating params names the methods before torch is needed).
METHOD_NAMES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


@dataclass
class MergeInputs:
    """What a method reads besides theta_0 and the task vectors (each None unless it NEEDS it)."""

    pieces: list | None = None  # linear pieces (q/k/v fused) whose inputs `layer_inputs` holds
    layer_inputs: list | None = None  # per task: {input name: LayerInput}
    removals: tuple | None = None  # CAT: (pieces, removals by piece name)
    model: object | None = None  # the architecture (an nn.Module), for methods that run models
    exemplars: list | None = None  # per task: its unlabeled inputs (uint8 images or a tokenized batch)
    names: list[str] | None = None  # how errors name each task's inputs


def method_module(name: str) -> ModuleType:
    if name not in METHOD_NAMES:
        raise KeyError(f"unknown merge method {name!r}; known: {', '.join(METHOD_NAMES)}")
    module = importlib.import_module(f"{__name__}.{name}")
    _check_shape(module)
    return module


@cache
def _check_shape(module: ModuleType) -> None:
    name = module.__name__.rpartition(".")[2]
    missing = [attr for attr in ("PARAMS", "NEEDS") if not hasattr(module, attr)]
    if missing or not (hasattr(module, "merged_vector") or hasattr(module, "merge")):
        raise TypeError(f"merge method module {name}: needs PARAMS, NEEDS and merged_vector or merge (missing {missing or 'both functions'})")
    if not set(module.NEEDS) <= NEEDS_KINDS:
        raise TypeError(f"merge method module {name}: NEEDS {sorted(module.NEEDS)} not among {sorted(NEEDS_KINDS)}")
    if hasattr(module, "merged_vector") and (module.PARAMS is None or "alpha" not in module.PARAMS.model_fields):
        raise TypeError(f"merge method module {name}: merged_vector methods scale by params.alpha; PARAMS has no alpha")


def params_class(name: str):
    """The method's params block class, or None (no hyperparameters)."""
    return method_module(name).PARAMS


def needs(name: str) -> frozenset[str]:
    return frozenset(method_module(name).NEEDS)


def merge(method: str, pretrained, task_vectors: list, params=None, inputs: MergeInputs | None = None):
    """Merged weights of `method`: theta_0 + params.alpha * merged_vector(...), or the module's merge."""
    from ..task_vectors import apply_task_vector

    module = method_module(method)
    inputs = inputs or MergeInputs()
    if hasattr(module, "merged_vector"):
        return apply_task_vector(pretrained, module.merged_vector(task_vectors, params, inputs), params.alpha)
    return module.merge(pretrained, task_vectors, params, inputs)


def merge_method(name: str):
    """`(pretrained, task_vectors, params, inputs=None) -> merged weights` for method `name`."""
    return lambda pretrained, task_vectors, params=None, inputs=None: merge(name, pretrained, task_vectors, params, inputs)
