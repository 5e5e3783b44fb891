"""Merging without a project: checkpoints in, merged weights out.

    merged = catmerge.merge("cat", "pretrained.safetensors", {"mnist": "mnist.safetensors", ...},
                            exemplars={"mnist": images, ...}, model=tower, c=2, alpha=0.3)

Any method of catmerge/merging, with its params by their params.yaml names. Methods that read layer
inputs (CAT, RegMean, RegMean++) take a few unlabeled exemplars per task and the architecture as a module
(an open_clip visual tower, a transformers CLIPVisionModel or BertModel/RobertaModel): each task's
inputs are captured on that task's own model, as the features stage does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from pydantic import ValidationError

from .io import WeightsFile, specs_of
from .merging import MergeInputs, method_module
from .merging import merge as merge_weights
from .params_base import ParamsError
from .task_vectors import Weights, apply_task_vector, task_vector

Checkpoint = str | Path | Mapping[str, torch.Tensor]


def _weights(checkpoint: Checkpoint, what: str) -> Weights:
    if isinstance(checkpoint, (str, Path)):
        return WeightsFile(checkpoint)  # read a tensor at a time
    if isinstance(checkpoint, Mapping):
        return checkpoint
    raise TypeError(f"{what}: expected a state dict or a safetensors path, got {type(checkpoint).__name__}")


def method_params(method: str, **params):
    """`method`'s params from keyword arguments (params.yaml names; `lambda` as `lambda_` too),
    defaults for the rest; a bad or unknown one raises ParamsError naming it."""
    block = method_module(method).PARAMS
    if block is None:
        if params:
            raise ParamsError(f"{method} has no params; got {', '.join(sorted(params))}")
        return None
    try:
        return block.model_validate(params)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        allowed = ", ".join(info.alias or name for name, info in block.model_fields.items())
        raise ParamsError(f"{method}.{key} = {err.get('input')!r}: {err['msg']} (params of {method}: {allowed})") from None


def capture_layer_inputs(model: torch.nn.Module, weights: Weights, exemplars) -> tuple[dict, dict, dict]:
    """(linear inputs, norm sums of squares, {"adapter", "rows"}) of `model` loaded with `weights`
    on `exemplars` (uint8 images (N, H, W, 3) for a vision tower, a tokenized batch for a text
    encoder): the features stage's capture, kept in memory."""
    from .features import capture, layer_inputs

    tensors, _, info = capture(model, weights, exemplars)
    linear, sums = layer_inputs(tensors, "exemplars")
    return linear, sums, info


def merge(
    method: str,
    pretrained: Checkpoint,
    experts: Mapping[str, Checkpoint] | list[Checkpoint],
    *,
    exemplars: Mapping[str, object] | None = None,
    model: torch.nn.Module | None = None,
    device: str = "cpu",
    **params,
) -> dict[str, torch.Tensor]:
    """The merged state dict of `experts` (fine-tuned from `pretrained`) with `method`.

    Checkpoints are state dicts or safetensors files; `experts` maps task names to checkpoints (or
    is a list). `exemplars` ({task: inputs}) and `model` are needed by methods that read layer
    inputs (cat, regmean, regmean_plusplus); RegMean uses all the exemplars given, whatever its
    `exemplars` param says. Everything is computed one tensor at a time; the result is in memory,
    in theta_0's dtypes."""
    chosen = method_params(method, **params)
    theta0 = _weights(pretrained, "pretrained")
    named = dict(experts) if isinstance(experts, Mapping) else {f"task {k}": e for k, e in enumerate(experts)}
    if not named:
        raise ParamsError("experts: at least one expert checkpoint is needed")
    tasks = list(named)
    vectors = [task_vector(theta0, _weights(e, t), str(e) if isinstance(e, (str, Path)) else t) for t, e in named.items()]
    inputs = MergeInputs(names=[f"exemplars of {t}" for t in tasks])
    wanted = method_module(method).NEEDS
    if wanted:
        missing = [t for t in tasks if exemplars is None or t not in exemplars]
        if model is None or missing:
            raise ParamsError(f"{method} reads layer inputs: pass model= (the architecture, an nn.Module) and exemplars= "
                              f"{{task: inputs}} for every expert (missing: {missing or 'model'})")
        model = model.to(device).eval()
        inputs.model, inputs.exemplars = model, [exemplars[t] for t in tasks]
        # each task's inputs on its own model: theta_0 + feature_alpha T_k (CAT's param; the expert for RegMean)
        scale = getattr(chosen, "feature_alpha", 1.0)
        captured = wanted & {"layer_inputs", "removals"}
        features = [capture_layer_inputs(model, apply_task_vector(theta0, tv, scale), exemplars[t]) for t, tv in zip(tasks, vectors)] if captured else []
        if "layer_inputs" in wanted:
            from .adapters import get_adapter

            shapes = {k: s for k, (d, s) in specs_of(theta0).items() if d.is_floating_point}
            inputs.pieces = [p for p in get_adapter(features[0][2]["adapter"]).pieces(shapes, "fused") if p.family == "linear"]
            inputs.layer_inputs = [linear for linear, _, _ in features]
        if "removals" in wanted:
            from .merging.cat import compute_removals

            pieces, removals, *_ = compute_removals(theta0, vectors, features, chosen, inputs.names, torch.device(device).type)
            inputs.removals = (pieces, removals)
    return {key: value for key, value in merge_weights(method, theta0, vectors, chosen, inputs).items()}

