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
        ({"model": "ViT-H-14"}, r"model = 'ViT-H-14'.*known: micro-vit-minilm, mini-vit-minilm"),
        ({"pretrain__steps": "many"}, r"pretrain.steps = 'many'"),
        ({"finetune__learning_rate": 0.1}, r"finetune.learning_rate = 0.1: Extra inputs are not permitted"),
    ],
)
def test_bad_params_are_refused_with_the_key(tmp_path, change, expected):
    with pytest.raises(ParamsError, match=expected):
        load(tmp_path, **change)


def test_missing_params_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match="missing params file: .*nope.yaml"):
        load_params(tmp_path / "nope.yaml")
