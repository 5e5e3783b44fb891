"""A built pipeline (a project's `data/` after `dvc repro`) loaded for the benchmark scripts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from catmerge.data import read_split
from catmerge.evaluation import accuracy
from catmerge.io import load_weights
from catmerge.models import create_image_tower
from catmerge.params import Params, load_params


@dataclass
class BuiltProject:
    params: Params
    data: Path
    theta0: dict
    task_vectors: list
    heads: dict
    splits: dict

    @classmethod
    def load(cls, project: Path, splits: tuple[str, ...] = ("val", "test")) -> BuiltProject:
        params = load_params(project / "params.yaml")
        data = project / "data"
        tasks = params.tasks
        return cls(
            params=params,
            data=data,
            theta0=load_weights(data / "pretrained/image_tower.safetensors"),
            task_vectors=[load_weights(data / f"task_vectors/{t}.safetensors") for t in tasks],
            heads={t: load_weights(data / f"experts/{t}/head.safetensors")["weight"] for t in tasks},
            splits={(t, s): read_split(data / f"datasets/{t}/{s}.parquet") for t in tasks for s in splits},
        )

    def scorer(self):
        """score(weights, split, only=None) -> {task: accuracy %} with one reused tower."""
        tower = create_image_tower(self.params.model)

        def score(weights, split: str, only: list[str] | None = None) -> dict[str, float]:
            tower.load_state_dict(weights)
            tasks = only or self.params.tasks
            return {t: accuracy(tower, self.heads[t], self.splits[t, split].images, self.splits[t, split].labels) for t in tasks}

        return score
