"""Typed, validated view of `params.yaml`. Errors name the key, the value and what is allowed."""

from __future__ import annotations

import os
import re
from itertools import product
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from .benchmark.tasks import TASKS
from .configs import is_known, our_configs
from .merging import METHOD_NAMES, method_module
from .params_base import ParamsError, Strict

# A name that becomes a file or directory name (a task, a method): letters, digits, `_`, `-` and
# inner dots; no separator, no leading dot, so never `..`, a hidden file or an absolute path.
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def check_plain_name(name: object, where: str) -> str:
    """`name` if it is a plain name (PLAIN_NAME), else a ValueError naming `where`."""
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name):
        raise ValueError(f"{where}: {name!r} is not a plain name (letters, digits, '_', '-', '.'; "
                         f"starting with a letter or digit; no '/'): it becomes a file name")
    return name


def check_relative_pattern(pattern: object, where: str) -> str:
    """A path (or glob) inside a repository: relative, no `..` component, no backslash."""
    parts = str(pattern).replace("\\", "/").split("/")
    if not isinstance(pattern, str) or not pattern or pattern.startswith(("/", "~")) or "\\" in pattern or ".." in parts:
        raise ValueError(f"{where}: {pattern!r} must be a relative path inside the repository (no leading '/' or '~', no '..')")
    return pattern


def _known_and_unique(names: list[str], known: list[str], kind: str) -> list[str]:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown {kind}(s) {unknown}; known: {', '.join(known)}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate {kind}(s) {duplicates}")
    return names


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
    # What pretraining captions name: the image source only, also the digit of MNIST images, or
    # (web) each image's content with probability name_rate, in other words than the prompts'.
    captions: Literal["source", "source_and_digit", "web"] = "source"
    name_rate: float = Field(default=0.3, ge=0, le=1, description="captions web: share of captions that name the content")


class TaskVectorParams(Strict):
    # float64 makes theta_0 + T_k == theta_k exact; float32 halves the disk space.
    dtype: Literal["float64", "float32"] = "float64"


class MergeParams(Strict):
    methods: list[str] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _moved_alpha(cls, data: Any) -> Any:
        if isinstance(data, dict) and "alpha" in data:
            raise ValueError("merge.alpha is now task_arithmetic.alpha (each method's params live in its own block)")
        return data

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        return _known_and_unique(methods, list(METHOD_NAMES), "merge method")


SHA256 = r"^[0-9a-fA-F]{64}$"


class HubModel(Strict):
    repo: str = Field(min_length=1, description="hub repo id (e.g. openai/clip-vit-base-patch32) or a local directory / file")
    tag: str | None = Field(default=None, description="source open_clip: open_clip's pretrained tag (e.g. openai), instead of repo")
    revision: str = Field(default="main", min_length=1, description="branch, tag or commit")
    sha256: str | None = Field(default=None, pattern=SHA256, description="pin of the weights file; a mismatch stops the stage")


class HubExperts(Strict):
    repo: str = Field(default="tanganke/clip-vit-base-patch32_{task}", description="repo id or local path; {task} is the task name")
    revision: str = Field(default="main", min_length=1)
    revisions: dict[str, str] = Field(default={}, description="per-task revision, overriding `revision`")
    sha256: dict[str, str] = Field(default={}, description="per-task pin of the expert weights file")

    @field_validator("revisions", "sha256")
    @classmethod
    def _plain_task_names(cls, by_task: dict[str, str], info) -> dict[str, str]:
        for task in by_task:
            check_plain_name(task, f"hub.experts.{info.field_name} key")
        return by_task

    @field_validator("sha256")
    @classmethod
    def _hex(cls, pins: dict[str, str]) -> dict[str, str]:
        bad = {t: v for t, v in pins.items() if not re.fullmatch(SHA256, v)}
        if bad:
            raise ValueError(f"not 64 hex digits: {bad}")
        return pins


class HubParams(Strict):
    """Where `source: hf` takes models and datasets from (catmerge/hf_clip.py, catmerge/hub_datasets.py)."""

    pretrained: HubModel = HubModel(repo="openai/clip-vit-base-patch32")
    experts: HubExperts = HubExperts()
    allow_pickle: bool = Field(default=False, description="convert a pytorch_model.bin-only repo (a pickle) once to safetensors")
    val_fraction: float = Field(default=0.1, gt=0, lt=1, description="share of each train split held out for validation")
    datasets: dict[str, dict[str, Any]] = Field(default={}, description="per-task overrides of catmerge/hub_datasets.py HUB_TASKS")

    @field_validator("datasets")
    @classmethod
    def _known_fields(cls, overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from .hub_datasets import HUB_TASK_FIELDS

        for task, fields in overrides.items():
            check_plain_name(task, "hub.datasets key (a task name)")
            unknown = sorted(set(fields) - set(HUB_TASK_FIELDS))
            if unknown:
                raise ValueError(f"{task}: unknown field(s) {unknown}; allowed: {', '.join(HUB_TASK_FIELDS)}")
            for key, value in fields.items():  # strictly of the type HubTask declares
                try:
                    _hub_task_field(key).validate_python(value)
                except ValidationError as exc:
                    raise ValueError(f"hub.datasets.{task}.{key} = {value!r}: {exc.errors()[0]['msg']}") from None
            if "files" in fields:
                check_relative_pattern(fields["files"], f"hub.datasets.{task}.files")
            for split in (fields.get("splits") or {}).values():  # formatted into the files pattern
                check_plain_name(split, f"hub.datasets.{task}.splits value")
        return overrides


def _hub_task_field(name: str):
    """A strict validator (a pydantic TypeAdapter) of field `name` of catmerge/hub_datasets.py's
    HubTask, from its annotation."""
    from typing import get_type_hints

    from pydantic import ConfigDict, TypeAdapter

    from .hub_datasets import HubTask

    return TypeAdapter(get_type_hints(HubTask)[name], config=ConfigDict(strict=True))


class EvaluateParams(Strict):
    batch_size: int = Field(default=512, ge=1)


class SelectLimits(Strict):
    """What stage `select` may take on: a grid past `max_candidates` (over all methods, cached ones
    included) is refused before any work; the cost of a large one is estimated and printed first."""

    max_candidates: int = Field(default=1000, ge=1, description="most grid points `select` scores in one run")
    warn_candidates: int = Field(default=100, ge=0, description="more candidates to score than this: `select` first "
                                 "prints how long they will take, from the times its cache records")


class CoreParams(Strict):
    """Everything in params.yaml but the merge methods' own blocks (see `Params`)."""

    tasks: list[str] = Field(min_length=1)
    # builtin: the offline benchmark (pretrained and experts trained here); hf: transformers CLIP
    # checkpoints and datasets from the Hugging Face hub (block `hub`); local: the same from local
    # paths; open_clip: open_clip checkpoints (pretrained by tag, experts incl. Task Arithmetic's)
    source: Literal["builtin", "hf", "local", "open_clip"] = "builtin"
    model: str
    seed: int = Field(ge=0, description="seed of pretraining and expert fine-tuning")
    data_seed: int = Field(ge=0, description="seed of the train/val/test split of the source images")
    datasets: DatasetParams = DatasetParams()
    pretrain: PretrainParams | None = None  # source builtin only
    finetune: TrainingParams | None = None  # source builtin only
    hub: HubParams = HubParams()
    task_vectors: TaskVectorParams = TaskVectorParams()
    merge: MergeParams
    # each merge method's block (cat, ties, ...) is added below from its module's PARAMS
    evaluate: EvaluateParams = EvaluateParams()
    # where the features, select and evaluate stages run the towers: auto = a GPU when torch sees
    # one, except for source builtin (the offline benchmark stays on the CPU, byte for byte)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Candidate grids chosen on validation by stage `select`: {method: {param: [values]}}.
    select: dict[str, dict[str, list[Any]]] = Field(default={})
    select_limits: SelectLimits = SelectLimits()

    @field_validator("tasks")
    @classmethod
    def _plain_tasks(cls, tasks: list[str]) -> list[str]:
        for task in tasks:
            check_plain_name(task, "tasks entry")
        return tasks

    @model_validator(mode="after")
    def _tasks_and_model_fit_the_source(self) -> Params:
        from .configs import model_config
        from .hub_datasets import HUB_TASKS

        family = model_config(self.model).get("family", "open_clip")
        known = list(TASKS) if self.source == "builtin" else sorted(set(HUB_TASKS) | set(self.hub.datasets))
        try:
            _known_and_unique(self.tasks, known, "builtin task" if self.source == "builtin" else "hub task (or hub.datasets entry)")
        except ValueError as exc:
            raise ValueError(f"tasks = {self.tasks!r}: {exc}") from None
        if self.source == "builtin":
            missing = [k for k in ("pretrain", "finetune") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"source builtin trains its models: params {', '.join(missing)} are required")
            if family != "open_clip":
                raise ValueError(f"source builtin trains open_clip towers; model {self.model!r} is of family {family}")
            if "hf_model_name" not in model_config(self.model).get("text_cfg", {}):
                raise ValueError(f"source builtin pretrains against the packaged MiniLM text tower; model {self.model!r} has "
                                 f"none (use mini-vit-minilm, mini-vit-p16-minilm or micro-vit-minilm)")
            return self
        for where, keys in (("hub.experts.sha256", self.hub.experts.sha256), ("hub.experts.revisions", self.hub.experts.revisions),
                            ("hub.datasets", self.hub.datasets)):
            stray = sorted(set(keys) - set(self.tasks))
            if stray:  # a pin under a misspelt task would silently verify nothing
                raise ValueError(f"{where}: {stray} not in tasks ({', '.join(self.tasks)})")
        wanted = "open_clip" if self.source == "open_clip" else "hf_clip"
        if family != wanted:
            example = "ViT-B-32-quickgelu" if wanted == "open_clip" else "hf-clip-vit-b-32"
            raise ValueError(f"source {self.source} reads {wanted} checkpoints; model {self.model!r} is of family {family} "
                             f"(use e.g. {example})")
        if self.source == "local":
            from .hub import is_local

            for where, ref in (("hub.pretrained.repo", self.hub.pretrained.repo), ("hub.experts.repo", self.hub.experts.repo)):
                if not is_local(ref.replace("{task}", self.tasks[0])):
                    raise ValueError(f"source local: {where} = {ref!r} is not a local path (start it with / or ./)")
        return self

    @model_validator(mode="after")
    def _methods_fit_the_model_and_data(self) -> Params:
        for method in METHOD_NAMES:
            check = getattr(method_module(method), "check_params", None)
            if check is not None:
                check(self)
        return self

    @field_validator("model")
    @classmethod
    def _known_model(cls, model: str) -> str:
        if not is_known(model):
            raise ValueError(f"unknown model config {model!r}; known: {', '.join(our_configs())}, or any of open_clip.list_models()")
        return model


    @model_validator(mode="after")
    def _valid_grids(self) -> Params:
        total = 0
        for method, grid in self.select.items():
            where = f"select.{method}"
            if method not in METHOD_NAMES:
                raise ValueError(f"{where}: unknown merge method; known: {', '.join(METHOD_NAMES)}")
            base = method_params(self, method)
            if base is None:
                raise ValueError(f"{where}: {method} has no hyperparameters to choose")
            allowed = [name for name in _field_names(base) if name not in NOT_SELECTABLE]
            for key, values in grid.items():
                if key not in allowed:
                    raise ValueError(f"{where}.{key}: not a selectable param of {method}; allowed: {', '.join(allowed)}")
                if not values:
                    raise ValueError(f"{where}.{key}: the candidate list is empty")
                for value in values:
                    try:
                        with_params(base, {key: value})
                    except ValidationError as exc:
                        raise ValueError(f"{where}.{key} = {value!r}: {exc.errors()[0]['msg']}") from None
            if method in self.merge.methods:
                total += len(candidates(self, method))
        if total > self.select_limits.max_candidates:
            sizes = ", ".join(f"{m} {len(candidates(self, m))}" for m in self.select if m in self.merge.methods)
            raise ValueError(f"select: {total} candidates ({sizes}) is more than select_limits.max_candidates = "
                             f"{self.select_limits.max_candidates}; shrink the grids or raise the limit")
        return self


# Params a `select` grid may not vary: the features stage's inputs (sweep those with `dvc exp run`,
# they rerun the features stage).
NOT_SELECTABLE = {"exemplars", "feature_alpha"}


def _field_names(model: BaseModel) -> list[str]:
    return [info.alias or name for name, info in type(model).model_fields.items()]


def method_params(params: Params, method: str) -> BaseModel | None:
    """The params block a method reads (its own name in params.yaml; None without hyperparameters)."""
    return getattr(params, method) if method_module(method).PARAMS is not None else None


def _method_blocks() -> dict[str, tuple]:
    blocks = {}
    for method in METHOD_NAMES:
        block = method_module(method).PARAMS
        if block is not None:
            blocks[method] = (block, block())
    return blocks


# The whole params.yaml: the core keys above plus one block per merge method with params.
Params = create_model("Params", __base__=CoreParams, **_method_blocks())


def with_params(base: BaseModel, update: dict[str, Any]) -> BaseModel:
    """`base` with `update` applied and validated (keys by their params.yaml names)."""
    return type(base).model_validate({**base.model_dump(by_alias=True), **update})


def candidates(params: Params, method: str) -> list[dict[str, Any]]:
    """The grid points of `select.<method>` in grid order (one empty point without a grid)."""
    grid = params.select.get(method, {})
    return [dict(zip(grid, values)) for values in product(*grid.values())]


class _YamlLoader(yaml.SafeLoader):
    """yaml.safe_load's loader (no tags run), reading `1e-5` as a float, as YAML 1.2 and DVC do (YAML 1.1
    wants a dot, `1.0e-5`, and strict params would refuse the string `dvc exp run -S wudi.lr=1e-5` leaves)."""


_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"missing params file: {path}")
    try:
        raw = yaml.load(path.read_text(), Loader=_YamlLoader) or {}
    except yaml.YAMLError as exc:  # one line: where it broke, not a parser traceback
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ParamsError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamsError(f"cannot read params file {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of params at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [f"invalid params in {path}:"]
        for err in exc.errors():
            if not err["loc"]:  # a check across keys: its message names them
                lines.append(f"  {err['msg'].removeprefix('Value error, ')}")
                continue
            key = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {key} = {err.get('input')!r}: {err['msg'].removeprefix('Value error, ')}")
        raise ParamsError("\n".join(lines)) from None


def resolve_device(name: str = "auto", source: str = "hf"):
    """Param `device` -> a torch.device: auto (a GPU when torch sees one, else the CPU; the CPU
    for source builtin, whose outputs are pinned byte for byte), cpu or cuda."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() and source != "builtin" else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError("device = 'cuda': torch sees no CUDA device here (use auto or cpu)")
    device = torch.device(name)
    if device.type == "cuda":
        _deterministic_cuda()
    return device


def _deterministic_cuda() -> None:
    """Same inputs, same bytes on a GPU too: deterministic kernels wherever torch has them (cuBLAS
    needs a fixed workspace, set before it starts); an op without one warns rather than stopping
    the run. Not needed on the CPU, whose kernels are deterministic for a given thread count (and
    it costs a 2 s import)."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
