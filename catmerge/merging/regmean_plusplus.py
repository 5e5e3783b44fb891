"""RegMean++ (Nguyen et al., 2025, arXiv 2508.03121): RegMean whose layer inputs come through the
model merged so far.

RegMean (regmean.py) takes each task's linear-layer inputs X_i through expert i alone. RegMean++
merges stage by stage (what comes before the first block, each block in order, what follows the
last) and takes the inputs of stage s through the merged stages before it and expert i's own
stage s, so each layer is fitted to the inputs it will really see in the merged model:

  for s = 0 .. S:
    X_i^s  = inputs of stage s's linear layers: task i's exemplars through [merged stages < s,
             expert i's stages >= s]
    W*     = (sum_i T_i G_i)(sum_i G_i)^+ on the linear weights of stage s (G_i = X_i^T X_i,
             off-diagonals scaled by nondiagonal_scale), the mean of the task vectors elsewhere
    merged stage s = theta_0 + alpha * that
  (alpha = 1: RegMean++ as published)

Stages are read off the parameter names: the first integer in a key is its block; keys before the
first block and after the last form stages of their own (embeddings, final norm, projection).
Cost: one forward per stage and task (S + 1 forwards of the exemplars, each through the whole
model; a forward cut at stage s would halve it) and the Gram matrices of one stage at a time.
FusionBench's release averages the embeddings and leaves what follows the last block at theta_0
(its merged model starts from the pretrained one); here the final stage is merged like the others.
"""

from __future__ import annotations

import re

import torch
from pydantic import Field

from ..io import StateDict, specs_of
from ..params_base import Strict
from .regmean import _gram, check_exemplar_budget, solve

BLOCK = re.compile(r"\.(\d+)\.")


class RegMeanPlusPlusParams(Strict):
    exemplars: int = Field(default=256, ge=1, description="unlabeled train inputs per task whose layer inputs are fitted (FusionBench's CLIP setup: 256)")
    nondiagonal_scale: float = Field(default=0.9, ge=0, le=1, description="off-diagonal entries of the Gram matrices are multiplied by this")
    alpha: float = Field(default=1.0, gt=0, description="scaling of the merged delta (1 = as published)")


PARAMS = RegMeanPlusPlusParams
NEEDS = frozenset({"exemplars"})


def check_params(params) -> None:
    check_exemplar_budget(params, "regmean_plusplus")


def stages(keys: list[str]) -> list[list[str]]:
    """The keys in merge order: before the first block, each block, after the last block."""
    blocks: dict[int, list[str]] = {}
    before, after = [], []
    for key in keys:
        found = BLOCK.search(f".{key}")
        if found:
            blocks.setdefault(int(found.group(1)), []).append(key)
        else:
            (after if blocks else before).append(key)
    return [group for group in (before, *(blocks[b] for b in sorted(blocks)), after) if group]


def merge(pretrained: StateDict, task_vectors: list[StateDict], params, inputs) -> StateDict:
    from ..adapters import adapter_for
    from ..features import capture, layer_inputs

    model, exemplars = inputs.model, inputs.exemplars
    if model is None or exemplars is None or len(exemplars) != len(task_vectors):
        raise ValueError(f"RegMean++: needs the architecture and one set of exemplars per task ({len(task_vectors)})")
    names = inputs.names or [f"task {k}" for k in range(len(task_vectors))]
    specs = specs_of(pretrained)
    floating = [k for k, (dtype, _) in specs.items() if dtype.is_floating_point]
    adapter = adapter_for(model)
    pieces = [p for p in adapter.pieces({k: specs[k][1] for k in floating}, "fused") if p.family == "linear" and p.input]
    merged: dict[str, torch.Tensor] = {}
    count = len(task_vectors)
    for stage in stages(floating):
        stage_pieces = [p for p in pieces if p.key in stage]
        captured = []
        if stage_pieces:
            for tv, batch in zip(task_vectors, exemplars):
                # merged stages so far, expert i from here on
                hybrid = {k: merged[k] if k in merged else (pretrained[k].double() + tv[k]).to(specs[k][0]) if k in tv
                          else pretrained[k] for k in specs}
                linear, _ = layer_inputs(capture(model, hybrid, batch)[0], "exemplars")
                captured.append({p.input: linear[p.input] for p in stage_pieces})
        for key in stage:
            full = [tv[key].double() for tv in task_vectors]
            delta = sum(full) / count
            grams_by_input: dict[str, list[torch.Tensor]] = {}  # fused q/k/v share one input
            for piece in (p for p in stage_pieces if p.key == key):
                blocks = [piece.of(t) for t in full]
                shape = blocks[0].shape
                deltas = [b.reshape(shape[0], -1) for b in blocks]
                if piece.input not in grams_by_input:
                    grams_by_input[piece.input] = _gram(piece, captured, deltas[0].shape[1], params.nondiagonal_scale, names)
                grams = grams_by_input[piece.input]
                piece.of(delta).copy_(solve(deltas, grams).reshape(shape))
            merged[key] = (pretrained[key].double() + params.alpha * delta).to(specs[key][0])
    return {k: merged[k] if k in merged else pretrained[k].clone() for k in specs}
