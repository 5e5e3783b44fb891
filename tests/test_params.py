"""params.yaml validation: errors name the key, the value and what is allowed."""

from __future__ import annotations

import copy

import pytest

from catmerge.params import ParamsError, load_params
from conftest import MICRO_PARAMS, ROOT, write_params


def load(tmp_path, **changes):
    params = copy.deepcopy(MICRO_PARAMS)
    for dotted, value in changes.items():
        node = params
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    write_params(tmp_path / "params.yaml", params)
    return load_params(tmp_path / "params.yaml")


def test_repo_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert len(params.tasks) == 8


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"tasks": ["mnist", "cifar10"]}, r"tasks = .*unknown builtin task\(s\) \['cifar10'\]; known: mnist, mnist_rotation"),
        ({"tasks": ["mnist", "mnist"]}, r"tasks = .*duplicate builtin task\(s\) \['mnist'\]"),
        ({"tasks": []}, r"tasks = \[\]"),
        ({"merge__methods": ["ties_merging"]}, r"merge.methods = .*unknown merge method\(s\) \['ties_merging'\]; known: weight_averaging, task_arithmetic"),
        ({"merge__alpha": 0}, r"merge.alpha = 0: .*greater than 0"),
        ({"model": "ViT-Z-99"}, r"model = 'ViT-Z-99'.*known: hf-clip-vit-b-32, .*micro-vit-minilm, .* or any of open_clip.list_models"),
        ({"model": "ViT-H-14"}, r"source builtin pretrains against the packaged MiniLM text tower; model 'ViT-H-14'"),
        ({"pretrain__steps": "many"}, r"pretrain.steps = 'many'"),
        ({"finetune__learning_rate": 0.1}, r"finetune.learning_rate = 0.1: Extra inputs are not permitted"),
        ({"ties__k": 0}, r"ties.k = 0: .*greater than 0"),
        ({"pcb__drop_ratio": 1.0}, r"pcb.drop_ratio = 1.0: .*less than 1"),
        ({"regmean__nondiagonal_scale": 1.5}, r"regmean.nondiagonal_scale = 1.5: .*less than or equal to 1"),
        ({"select": {"fisher": {"alpha": [1.0]}}}, r"select.fisher: unknown merge method"),
        ({"select": {"weight_averaging": {"alpha": [1.0]}}}, r"select.weight_averaging: weight_averaging has no hyperparameters"),
        ({"select": {"ties": {"lambda": [1.0]}}}, r"select.ties.lambda: not a selectable param of ties; allowed: k, alpha"),
        ({"select": {"cat": {"exemplars": [1, 2]}}}, r"select.cat.exemplars: not a selectable param of cat"),
        ({"select": {"cat": {"alpha": [0.5, -1]}}}, r"select.cat.alpha = -1: .*greater than 0"),
        ({"select": {"pcb": {"alpha": []}}}, r"select.pcb.alpha: the candidate list is empty"),
        ({"merge_methods": ["cat"]}, r"merge_methods = \['cat'\]: Extra inputs are not permitted"),
        ({"seed": 1.5}, r"seed = 1.5: Input should be a valid integer"),
        ({"cat__c": -1}, r"cat.c = -1: .*greater than or equal to 0"),
        ({"cat__c": 16}, r"cat.c = 16: must be less than 16, the output width of the narrowest linear layer CAT trims in model micro-vit-minilm"),
        ({"cat__c_shift": 40}, r"cat.c_shift = 40: more than the 16 coordinates of the narrowest norm scale or shift"),
        ({"select": {"cat": {"c": [2, 16]}}}, r"select.cat.c = 16: must be less than 16"),
        ({"cat__alpha": 0}, r"cat.alpha = 0: .*greater than 0"),
        ({"cat__exemplars": 0}, r"cat.exemplars = 0: .*greater than or equal to 1"),
        ({"cat__exemplars": 201}, r"cat.exemplars = 201: more than the 200 train images per task that datasets.max_train keeps"),
        ({"cat__qkv": "joint"}, r"cat.qkv = 'joint': Input should be 'split' or 'fused'"),
    ],
)
def test_bad_params_are_refused_with_the_key(tmp_path, change, expected):
    with pytest.raises(ParamsError, match=expected):
        load(tmp_path, **change)


def test_missing_params_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match="missing params file: .*nope.yaml"):
        load_params(tmp_path / "nope.yaml")


def test_select_grids_expand_in_grid_order():
    from catmerge.params import Params, candidates, with_params

    params = Params.model_validate({**MICRO_PARAMS, "select": {"cat": {"alpha": [0.3, 0.5], "lambda": [1.0, 2.0]}}})
    points = candidates(params, "cat")
    assert points == [{"alpha": 0.3, "lambda": 1.0}, {"alpha": 0.3, "lambda": 2.0}, {"alpha": 0.5, "lambda": 1.0}, {"alpha": 0.5, "lambda": 2.0}]
    assert candidates(params, "task_arithmetic") == [{}]  # no grid: the fixed params only
    chosen = with_params(params.cat, points[1])
    assert (chosen.alpha, chosen.lambda_, chosen.c) == (0.3, 2.0, params.cat.c)
