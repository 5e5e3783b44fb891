"""A built pipeline (a project's `data/` after `dvc repro`) for the benchmark scripts: the
library's `Workspace`, under the names these scripts use. Every file is read as the stages read it
(checked against its manifest), and every merge is the one the `select` and `merge` stages compute
(`Workspace.merged`), so these scripts follow the pipeline when either changes."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from catmerge.params import load_params, method_params, with_params
from catmerge.workspace import Workspace


@dataclass
class BuiltProject:
    workspace: Workspace

    @classmethod
    def load(cls, project: Path) -> BuiltProject:
        return cls(Workspace(load_params(Path(project) / "params.yaml"), project))

    @property
    def params(self):
        return self.workspace.params

    @property
    def data(self) -> Path:
        return self.workspace.root / "data"

    @property
    def theta0(self) -> dict:
        return self.workspace.pretrained

    @property
    def task_vectors(self) -> list:
        return self.workspace.task_vectors

    def merged(self, method: str, **update):
        """The merged weights of `method` with its params block from params.yaml, `update` applied
        (e.g. alpha=0.3); weight averaging takes none."""
        base = method_params(self.params, method)
        return self.workspace.merged(method, None if base is None else with_params(base, update))

    def scorer(self):
        """score(weights, split, only=None) -> {task: accuracy %} with one reused tower."""
        return self.workspace.score


def mean_sd(values: list[float]) -> str:
    """"mean ± sample sd" of the values, one decimal (sd 0 for a single value)."""
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"
