"""A project's built artifacts (`data/`, layout in docs/artifacts.md), loaded on first use, for
the stages that build merged models and score them: select (validation), merge and evaluate (test).

Splits are read only when asked for, so a stage that never asks for "test" never opens a test file.
"""

from __future__ import annotations

import json
import os
import tempfile
from functools import cached_property
from pathlib import Path

from . import layout
from .data import read_split
from .features import load_features
from .io import WeightsFile, read_json, remove_orphaned_temps, save_weights
from .merging import MergeInputs, method_module, needs
from .merging import cat as cat_merge
from .params import Params
from .task_vectors import Weights, apply_task_vector

# The model code (open_clip, ~4 s to import) is imported only by the methods that score models.


class Workspace:
    def __init__(self, params: Params, root: str | Path = "."):
        self.params = params
        self.root = Path(root)
        self._splits: dict[tuple[str, str], object] = {}
        self._removals: dict[str, tuple] = {}
        self._layer_inputs: dict[int, tuple] = {}
        self._scratch_dir: tempfile.TemporaryDirectory | None = None
        self._last_vector: tuple = (None, None)  # (method and params but alpha, tau_m): one model's worth

    def path(self, relative: Path) -> Path:
        return self.root / relative

    @cached_property
    def pretrained(self) -> WeightsFile:
        return WeightsFile(layout.checked_pretrained(root=self.root))

    @cached_property
    def task_vectors(self) -> list[WeightsFile]:
        from .task_vectors import load_task_vector

        return [load_task_vector(self.pretrained, layout.checked_task_vector(t, self.root), t) for t in self.params.tasks]

    @cached_property
    def features(self) -> list:
        return [load_features(layout.checked_features(t, self.root), t) for t in self.params.tasks]

    def removals(self, cat_params) -> tuple:
        """CAT's (pieces, removals): the bases stage's when it used these bases params, else computed
        here from the features (a `select` grid over c or lambda)."""
        wanted = cat_merge.resolved_params(cat_params)
        key = repr(sorted(wanted.items()))
        if key not in self._removals:
            manifest = read_json(self.path(layout.BASES_DIR / cat_merge.MANIFEST))
            if manifest.get("params") == wanted:
                self._removals[key] = cat_merge.read_removals(self.path(layout.BASES_DIR), self.params.tasks)
            else:
                names = [str(self.path(layout.features_path(t))) for t in self.params.tasks]
                pieces, by_piece, *_ = cat_merge.compute_removals(
                    self.pretrained, self.task_vectors, self.features, cat_params, names, self.tower_device
                )
                self._removals[key] = (pieces, by_piece)
        return self._removals[key]

    def merge_inputs(self, method: str, method_params) -> MergeInputs:
        """What `method` NEEDS beyond theta_0 and the task vectors, from this project's artifacts:
        its exemplars (`<method>.exemplars` unlabeled train images per task, drawn as CAT's are)
        and the tower, each task's linear-layer inputs on them through its expert, CAT's removals."""
        wanted = needs(method)
        inputs = MergeInputs(names=[f"{self.path(layout.dataset_dir(t) / 'train.parquet')} (exemplars)" for t in self.params.tasks])
        if wanted & {"layer_inputs", "exemplars"}:
            inputs.model, inputs.exemplars = self.tower, self.exemplars(method_params.exemplars, f"{method}.exemplars")
        if "layer_inputs" in wanted:
            inputs.pieces, inputs.layer_inputs = self.expert_layer_inputs(method_params.exemplars, f"{method}.exemplars")
        if "removals" in wanted:
            inputs.removals = self.removals(method_params)
        return inputs

    def _scratch(self) -> Path:
        """A directory for this workspace's temporaries, removed with it (at exit at the latest)."""
        if self._scratch_dir is None:
            base = self.path(Path(".catmerge/tmp"))
            base.mkdir(parents=True, exist_ok=True)
            remove_orphaned_temps(base, "workspace")  # a killed run's: named like every temporary
            self._scratch_dir = tempfile.TemporaryDirectory(prefix=f".workspace.{os.getpid()}.", suffix=".tmp", dir=base)
        return Path(self._scratch_dir.name)

    def exemplars(self, count: int, param: str = "cat.exemplars") -> list:
        """Per task, `count` unlabeled train images, drawn with a seed from data_seed and the task
        (the features stage's draw: CAT's exemplars are the first of them)."""
        from .features import exemplar_indices

        out = []
        for task in self.params.tasks:
            train = self.split(task, "train")
            out.append(train.images[exemplar_indices(count, len(train.labels), self.params.data_seed, task, param)])
        return out

    def expert_layer_inputs(self, count: int, param: str = "regmean.exemplars") -> tuple[list, list]:
        """(linear pieces, q/k/v fused; per task its linear-layer inputs on `count` exemplars
        through its own expert), computed once per count."""
        if count not in self._layer_inputs:
            from .adapters import adapter_for
            from .features import capture, layer_inputs

            # each task's Gram matrices go to a file read back lazily: K tasks' worth of every
            # layer's d_in x d_in matrices (gigabytes at ViT-B/32) is never in memory at once
            spill = self._scratch() / f"layer-inputs-{count}"
            spill.mkdir()
            per_task = []
            for tv, images, task in zip(self.task_vectors, self.exemplars(count, param), self.params.tasks):
                tensors, _, _ = capture(self.tower, apply_task_vector(self.pretrained, tv), images)
                layer_inputs(tensors, f"{task} exemplars")  # checks: finite, known forms
                save_weights(tensors, spill / f"{task}.safetensors", {"task": task})
                del tensors
                per_task.append(load_features(spill / f"{task}.safetensors", task)[0])
            shapes = {k: shape for k, (dtype, shape) in self.pretrained.specs.items() if dtype.is_floating_point}
            pieces = [p for p in adapter_for(self.tower).pieces(shapes, "fused") if p.family == "linear"]
            self._layer_inputs[count] = (pieces, per_task)
        return self._layer_inputs[count]

    def check_inputs(self, chosen: dict, split: str | None = None) -> None:
        """Every input the merges of `chosen` ({method: its params}) and scoring on `split` read,
        checked before any work (headers and metadata, sha256s against their manifests, then what
        each method NEEDS, such as CAT's bases for its params), so a bad file stops the stage
        before it has spent time or replaced an output."""
        self.check_headers()
        self.task_vectors  # noqa: B018 - cached properties: each checks as it loads
        self.features  # noqa: B018
        if split is not None:
            self.heads  # noqa: B018
            for task in self.params.tasks:
                layout.checked_split(task, split, self.root)
        for method, method_params in chosen.items():
            if needs(method):
                self.merge_inputs(method, method_params)

    def check_headers(self) -> None:
        """The cheap checks of every task vector and features file (each says it is its task's, in
        the dtype it records, as its manifest does), before anything is hashed."""
        layout.check_headers(self.params.tasks, self.root)

    def checked_merged(self, method: str, method_params) -> WeightsFile:
        """data/merged/<method>.safetensors, vouched for by its manifest, and saying (in its
        metadata) that it is `method` with `method_params` over this run's tasks."""
        from .task_vectors import check_compatible

        path = layout.checked_merged(method, self.root)
        merged = WeightsFile(path)
        recorded = method_params.model_dump(by_alias=True) if method_params is not None else {}
        merged.check_claims(method=method, tasks=",".join(self.params.tasks), params=json.dumps(recorded, sort_keys=True))
        check_compatible(self.pretrained, merged, str(path))
        return merged

    def merged(self, method: str, method_params, keep_vector: bool = True) -> Weights:
        """The merged image tower of `method` with `method_params` (that method's params block),
        computed one tensor at a time as it is read (the inputs are files read lazily).
        For theta_0 + alpha * tau_m methods, tau_m is kept in memory for the other alphas of a
        grid (one model's worth) unless `keep_vector` is off (the merge stage: one alpha each)."""
        module = method_module(method)
        inputs = self.merge_inputs(method, method_params)
        if not hasattr(module, "merged_vector"):
            return module.merge(self.pretrained, self.task_vectors, method_params, inputs)
        if not keep_vector:
            return apply_task_vector(self.pretrained, module.merged_vector(self.task_vectors, method_params, inputs), method_params.alpha)
        key = (method, repr(sorted(method_params.model_dump(exclude={"alpha"}).items())))
        if key != self._last_vector[0]:
            self._last_vector = (None, None)  # the old one goes before the new one is built
            self._last_vector = (key, dict(module.merged_vector(self.task_vectors, method_params, inputs)))
        return apply_task_vector(self.pretrained, self._last_vector[1], method_params.alpha)

    # ---- scoring ------------------------------------------------------------------------------

    def split(self, task: str, name: str):
        if (task, name) not in self._splits:
            self._splits[task, name] = read_split(layout.checked_split(task, name, self.root))
        return self._splits[task, name]

    @cached_property
    def heads(self) -> dict:
        from .configs import model_config
        from .evaluation import load_head

        width = model_config(self.params.model)["embed_dim"]  # the tower's embedding width
        classes = {t: len(layout.checked_dataset_info(t, self.root)["class_names"]) for t in self.params.tasks}
        return {t: load_head(layout.checked_expert(t, "head.safetensors", self.root), classes[t], width) for t in self.params.tasks}

    @cached_property
    def tower(self):
        from .models import create_image_tower, resolve_device

        return create_image_tower(self.params.model).to(resolve_device(self.params.device, self.params.source))

    @property
    def tower_device(self) -> str:
        from .params import resolve_device

        return resolve_device(self.params.device, self.params.source).type

    def score(self, weights: Weights, split: str, tasks: list[str] | None = None) -> dict[str, float]:
        """Top-1 accuracy (%) of `weights` on each task's `split`."""
        from .evaluation import accuracy
        from .models import copy_weights

        copy_weights(self.tower, weights)
        out = {}
        for task in tasks or self.params.tasks:
            data = self.split(task, split)
            out[task] = accuracy(self.tower, self.heads[task], data.images, data.labels, self.params.evaluate.batch_size)
        return out
