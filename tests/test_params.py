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
        ({"merge__methods": ["ties_merging"]}, r"merge.methods = .*unknown merge method\(s\) \['ties_merging'\]; known: cat, iso_c, iso_cts, pcb, regmean, regmean_plusplus, task_arithmetic, ties, tsv_m, weight_averaging, wudi"),
        ({"task_arithmetic__alpha": 0}, r"task_arithmetic.alpha = 0: .*greater than 0"),
        ({"merge__alpha": 0.3}, r"merge.alpha is now task_arithmetic.alpha"),
        ({"model": "ViT-Z-99"}, r"model = 'ViT-Z-99'.*known: hf-clip-vit-b-32, .*micro-vit-minilm, .* or any of open_clip.list_models"),
        ({"model": "ViT-H-14"}, r"source builtin pretrains against the packaged MiniLM text tower; model 'ViT-H-14'"),
        ({"pretrain__steps": "many"}, r"pretrain.steps = 'many'"),
        ({"finetune__learning_rate": 0.1}, r"finetune.learning_rate = 0.1: Extra inputs are not permitted"),
        ({"ties__k": 0}, r"ties.k = 0: .*greater than 0"),
        ({"pcb__drop_ratio": 1.0}, r"pcb.drop_ratio = 1.0: .*less than 1"),
        ({"regmean__nondiagonal_scale": 1.5}, r"regmean.nondiagonal_scale = 1.5: .*less than or equal to 1"),
        ({"select": {"fisher": {"alpha": [1.0]}}}, r"select.fisher: unknown merge method"),
        ({"select": {"weight_averaging": {"alpha": [1.0]}}}, r"select.weight_averaging: weight_averaging has no hyperparameters"),
        ({"select": {"ties": {"lambda": [1.0]}}}, r"select.ties.lambda: not a selectable param of ties; allowed: k, trim, alpha"),
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
        # round two: strict types, finite values, names that become paths, absurd grids
        ({"cat__c": True}, r"cat.c = True: Input should be a valid integer"),
        ({"select": {"ties": {"k": ["40"]}}}, r"select.ties.k = '40': Input should be a valid number"),
        ({"task_arithmetic__alpha": float("inf")}, r"task_arithmetic.alpha = inf: Input should be a finite number"),
        ({"select": {"cat": {"alpha": [0.5, float("nan")]}}}, r"select.cat.alpha = nan: Input should be a finite number"),
        ({"cat__conv": "yes"}, r"cat.conv = 'yes': Input should be a valid boolean"),
        ({"tasks": ["mnist", "../../../somewhere"]}, r"tasks entry: '../../../somewhere' is not a plain name"),
        ({"tasks": ["/etc"]}, r"tasks entry: '/etc' is not a plain name"),
        ({"select": {"ties": {"k": list(range(1, 101)), "alpha": [0.01 * i for i in range(1, 101)]}}},
         r"select: 10000 candidates \(ties 10000\) is more than select_limits.max_candidates = 1000"),
        ({"select_limits": {"max_candidates": 3}}, r"select: 6 candidates \(ties 4, pcb 2\) is more than select_limits.max_candidates = 3"),
        ({"select_limits": {"max_candidates": 1000, "warn_candidates": -1}}, r"select_limits.warn_candidates = -1: .*greater than or equal to 0"),
        ({"select_limits": {"max_candidates": 1000, "warn_candidates": True}}, r"select_limits.warn_candidates = True: Input should be a valid integer"),
        ({"hub__val_fraction": float("nan")}, r"hub.val_fraction = nan: Input should be a finite number"),
        ({"select": {"ties": {"k": [float("-inf")]}}}, r"select.ties.k = -inf: Input should be a finite number"),
        ({"datasets__max_train": 200.0}, r"datasets.max_train = 200.0: Input should be a valid integer"),
        ({"hub__allow_pickle": "yes"}, r"hub.allow_pickle = 'yes': Input should be a valid boolean"),
        ({"hub__datasets": {"mnist": {"templates": "a photo of {}."}}}, r"hub.datasets.mnist.templates = 'a photo of \{\}.': Input should be a valid list"),
        ({"hub__datasets": {"mnist": {"class_names": [0, 1]}}}, r"hub.datasets.mnist.class_names = \[0, 1\]: Input should be a valid string"),
    ],
)
def test_bad_params_are_refused_with_the_key(tmp_path, change, expected):
    with pytest.raises(ParamsError, match=expected):
        load(tmp_path, **change)


def test_ints_are_taken_where_floats_are_expected(tmp_path):
    """Strict, but not pedantic: `alpha: 1` is a float param's 1.0 (in a grid too); a bool or a
    string never is."""
    params = load(tmp_path, task_arithmetic__alpha=1, cat__lambda=2, select={"ties": {"k": [40, 60], "alpha": [1, 1.5]}})
    assert params.task_arithmetic.alpha == 1.0 and params.cat.lambda_ == 2.0
    assert params.select["ties"] == {"k": [40, 60], "alpha": [1, 1.5]}
    assert params.select_limits.warn_candidates == 100


def test_exponents_without_a_dot_are_floats_as_dvc_writes_them(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e-5` as a string, which strict params refuse; DVC (YAML 1.2)
    reads and writes it as a float (`dvc exp run -S wudi.lr=1e-6` leaves `lr: 1e-06`)."""
    text = (ROOT / "params.yaml").read_text().replace("lr: 1.0e-5", "lr: 1e-5").replace("  alpha: 0.4 ", "  alpha: 4E-1 ", 1)
    assert "lr: 1e-5" in text and "alpha: 4E-1" in text
    (tmp_path / "params.yaml").write_text(text)
    params = load_params(tmp_path / "params.yaml")
    assert params.wudi.lr == 1e-5 and params.task_arithmetic.alpha == 0.4
    (tmp_path / "params.yaml").write_text(text.replace("lr: 1e-5", "lr: 1e400"))
    with pytest.raises(ParamsError, match=r"wudi.lr = inf: Input should be a finite number"):
        load_params(tmp_path / "params.yaml")


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


HUB = {"source": "hf", "model": "hf-clip-vit-b-32", "pretrain": None, "finetune": None}


@pytest.mark.parametrize(
    "hub_change, expected",
    [
        ({"tasks": ["mnist", "../../../somewhere"], "hub__datasets": {"../../../somewhere": {"repo": "x", "templates": ["{}"]}}},
         r"hub.datasets key \(a task name\): '../../../somewhere' is not a plain name"),
        ({"tasks": ["mnist", "/tmp/x"], "hub__datasets": {"/tmp/x": {"repo": "x", "templates": ["{}"]}}}, r"'/tmp/x' is not a plain name"),
        ({"tasks": ["mnist"], "hub__experts__sha256": {"../mnist": "0" * 64}}, r"hub.experts.sha256 key: '../mnist' is not a plain name"),
        ({"tasks": ["mnist"], "hub__datasets": {"mnist": {"files": "../../{split}.parquet"}}},
         r"hub.datasets.mnist.files: '../../{split}.parquet' must be a relative path inside the repository"),
        ({"tasks": ["mnist"], "hub__datasets": {"mnist": {"splits": {"train": "../../train", "test": "test"}}}},
         r"hub.datasets.mnist.splits value: '../../train' is not a plain name"),
        ({"tasks": ["mnist"], "hub__datasets": {"mnist": {"repo": 7}}}, r"hub.datasets.mnist.repo = 7: Input should be a valid string"),
    ],
)
def test_names_that_become_paths_are_refused_for_hub_sources(tmp_path, hub_change, expected):
    """A task named `../../../somewhere` with a hub.datasets entry would have made the datasets
    stage replace a directory outside the project."""
    with pytest.raises(ParamsError, match=expected):
        load(tmp_path, **HUB, **hub_change)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("tasks: [mnist\nmodel: x\n", r"params.yaml: not valid YAML \(line 2, column \d+\)"),
        ("- just\n- a list\n", r"params.yaml: expected a mapping of params at the top level, got list"),
        ("seed: !!python/object/apply:os.system [echo pwned]\n", r"params.yaml: not valid YAML"),
    ],
)
def test_unreadable_params_files_give_one_line_naming_the_file(tmp_path, text, expected):
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match=expected) as caught:
        load_params(tmp_path / "params.yaml")
    assert "\n" not in str(caught.value)


def test_every_method_block_is_a_param_of_the_stages_that_read_it():
    """A method is one module plus its block in params.yaml; dvc.yaml must list the block for
    select and merge, or editing it would not rerun them (and params.yaml must carry it)."""
    import yaml

    from catmerge.merging import METHOD_NAMES, method_module
    from conftest import ROOT

    blocks = {m for m in METHOD_NAMES if method_module(m).PARAMS is not None}
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage in ("select", "merge"):
        assert blocks <= set(stages[stage]["params"]), (stage, blocks - set(stages[stage]["params"]))
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert blocks <= set(shipped) and set(shipped["merge"]["methods"]) == set(METHOD_NAMES)
