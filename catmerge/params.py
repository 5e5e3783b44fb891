"""Typed, validated view of `params.yaml`. Errors name the key, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .benchmark.tasks import TASKS
from .configs import known_configs
from .merging import METHOD_NAMES


def _known_and_unique(names: list[str], known: list[str], kind: str) -> list[str]:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown {kind}(s) {unknown}; known: {', '.join(known)}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate {kind}(s) {duplicates}")
    return names


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetParams(Strict):
    # Caps on split sizes (first N of a seeded shuffle); null keeps the whole split.
    max_train: int | None = Field(default=None, ge=1)
    max_val: int | None = Field(default=None, ge=1)
    max_test: int | None = Field(default=None, ge=1)


class TrainingParams(Strict):
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    warmup_steps: int = Field(ge=0)


class PretrainParams(TrainingParams):
    # What pretraining captions name: the image source only, or also the digit of MNIST images.
    captions: Literal["source", "source_and_digit"] = "source"


class TaskVectorParams(Strict):
    # float64 makes theta_0 + T_k == theta_k exact; float32 halves the disk space.
    dtype: Literal["float64", "float32"] = "float64"


class MergeParams(Strict):
    methods: list[str] = Field(min_length=1)
    alpha: float = Field(gt=0, description="task-vector scaling of task_arithmetic")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        return _known_and_unique(methods, list(METHOD_NAMES), "merge method")


class CatParams(Strict):
    """CAT Merging (catmerge/cat.py). Stages: features (exemplars, feature_alpha), bases (c ...
    shift_score), merge (alpha, rescale)."""

    exemplars: int = Field(default=2, ge=1, description="unlabeled train images per task whose tokens are the feature rows")
    feature_alpha: float = Field(default=1.0, gt=0, description="features come from theta_0 + feature_alpha * T_k")
    c: int = Field(default=2, ge=0, description="removal directions per linear weight and task (Eq. 11)")
    lambda_: float = Field(default=1.0, ge=0, alias="lambda", description="weight of task i's own signal in Eq. 10")
    c_norm: int | None = Field(default=None, ge=0, description="coordinates masked per norm scale (Eq. 14); null = c")
    lambda_norm: float | None = Field(default=None, ge=0, description="lambda of Eq. 13; null = lambda")
    c_shift: int | None = Field(default=None, ge=0, description="coordinates masked per shift (Eq. 17); null = c")
    qkv: Literal["split", "fused"] = "split"
    conv: bool = Field(default=False, description="treat the patch embedding as a linear map on unfolded patches")
    drop_nonpositive: bool = True
    shift_score: Literal["others", "own"] = "others"
    rescale: bool = Field(default=True, description="scale each trimmed linear weight / norm scale back to its norm")
    alpha: float = Field(default=0.4, gt=0, description="scaling of the summed trimmed task vectors")


class EvaluateParams(Strict):
    batch_size: int = Field(default=512, ge=1)


class Params(Strict):
    tasks: list[str] = Field(min_length=1)
    source: Literal["builtin"] = "builtin"
    model: str
    seed: int = Field(ge=0, description="seed of pretraining and expert fine-tuning")
    data_seed: int = Field(ge=0, description="seed of the train/val/test split of the source images")
    datasets: DatasetParams = DatasetParams()
    pretrain: PretrainParams
    finetune: TrainingParams
    task_vectors: TaskVectorParams = TaskVectorParams()
    merge: MergeParams
    cat: CatParams = CatParams()
    evaluate: EvaluateParams = EvaluateParams()

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        return _known_and_unique(tasks, list(TASKS), "builtin task")

    @field_validator("model")
    @classmethod
    def _known_model(cls, model: str) -> str:
        if model not in known_configs():
            raise ValueError(f"unknown model config {model!r}; known: {', '.join(known_configs())}")
        return model


class ParamsError(ValueError):
    pass


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"missing params file: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [f"invalid params in {path}:"]
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<root>"
            value = err.get("input")
            lines.append(f"  {key} = {value!r}: {err['msg']}")
        raise ParamsError("\n".join(lines)) from None
