"""`source: hf` end to end, offline: tiny CLIP checkpoints and parquet datasets in a hub-layout
cache (tests/hub_fixtures.py), loaded by repo id with HF_HUB_OFFLINE=1, through CAT and evaluate."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import yaml

from catmerge.data import read_split
from catmerge.io import load_weights, sha256_file
from catmerge.params import ParamsError, load_params
from conftest import MICRO_PARAMS, make_project, run, write_params
from hub_fixtures import COMMIT, DATASETS, PRETRAINED, build_hub_cache, snapshot

TASKS = ["mnist", "eurosat", "dtd"]
HUB_PARAMS = {
    **MICRO_PARAMS,
    "tasks": TASKS,
    "source": "hf",
    "model": "micro-hf-clip",
    "hub": {
        "pretrained": {"repo": PRETRAINED, "revision": "main", "sha256": None},
        "experts": {"repo": "tanganke/clip-vit-base-patch32_{task}", "revision": "main", "revisions": {}, "sha256": {}},
        "allow_pickle": True,  # dtd's expert is a pytorch_model.bin
        "val_fraction": 0.2,
        "datasets": {},
    },
    "merge": {"methods": ["weight_averaging", "task_arithmetic", "cat"], "alpha": 0.3},
    "select": {"task_arithmetic": {"alpha": [0.3, 0.6]}},
}


@pytest.fixture(scope="module")
def hub_project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("hub") / "project", HUB_PARAMS)
    cache = build_hub_cache(project / ".hf")  # conftest.run points HF_HOME here
    proc = run([sys.executable, "-m", "dvc", "repro", "evaluate"], project)
    return project, cache, proc.stdout


def test_pipeline_runs_on_hub_checkpoints_and_datasets(hub_project):
    project, _, log = hub_project
    metrics = json.loads((project / "metrics/metrics.json").read_text())
    assert set(metrics["accuracy"]) == set(TASKS)
    average = metrics["average"]
    assert set(average) == {"pretrained", "expert", "weight_averaging", "task_arithmetic", "cat"}
    assert average["expert"] > average["pretrained"] + 10, average  # the experts were really loaded, per task
    assert json.loads((project / "metrics/decomposition_cat.json").read_text())["tasks"].keys() == set(TASKS)
    assert "bases:" in log


def test_manifests_record_revision_and_sha256_of_every_hub_file(hub_project):
    project, _, _ = hub_project
    manifest = json.loads((project / "data/pretrained/manifest.json").read_text())
    files = {r["file"]: r for r in manifest["hub"]}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    root = snapshot(project / ".hf", PRETRAINED)
    for name, record in files.items():
        assert record["repo"] == PRETRAINED and record["revision"] == COMMIT
        assert record["sha256"] == sha256_file(root / name)
    for record in manifest["files"]:
        assert record["sha256"] == sha256_file(project / "data/pretrained" / record["path"])
    for task in TASKS:
        expert = json.loads((project / f"data/experts/{task}/manifest.json").read_text())
        (hub_file,) = expert["hub"]
        assert hub_file["repo"] == f"tanganke/clip-vit-base-patch32_{task}" and hub_file["revision"] == COMMIT
        assert hub_file["file"] == ("pytorch_model.bin" if task == "dtd" else "model.safetensors")
        assert expert["projection_from_pretrained"] is True
        info = json.loads((project / f"data/datasets/{task}/info.json").read_text())
        repo, pattern, _ = DATASETS[task]
        assert {(r["repo"], r["file"]) for r in info["hub_files"]} == {(repo, pattern.format(split=s)) for s in ("train", "test")}


def test_experts_are_the_hub_weights_bit_for_bit_whatever_their_format(hub_project):
    """mnist: transformers-5 keys without the vision_model. prefix; eurosat: hub keys; dtd: a
    pickle converted once to safetensors. The visual projection is the pretrained one."""
    project, cache, _ = hub_project
    pretrained = load_weights(project / "data/pretrained/image_tower.safetensors")
    clip_state = cache["clip"].state_dict()
    assert all(np.array_equal(pretrained[k].numpy(), clip_state[k].numpy()) for k in pretrained)
    for task in TASKS:
        expert = load_weights(project / f"data/experts/{task}/expert.safetensors")
        assert set(expert) == set(pretrained)
        for key, value in cache["experts"][task].items():
            assert np.array_equal(expert[key].numpy(), value.numpy()), (task, key)
        assert np.array_equal(expert["visual_projection.weight"].numpy(), pretrained["visual_projection.weight"].numpy())


def test_datasets_carve_validation_from_train_and_crop_to_the_model_input(hub_project):
    project, _, _ = hub_project
    for task in TASKS:
        info = json.loads((project / f"data/datasets/{task}/info.json").read_text())
        classes = len(DATASETS[task][2])
        # 18 train images per class in the hub files: 20 % of them are val, test is the hub's test split
        assert info["counts"] == {"train": classes * 14, "val": classes * 4, "test": classes * 6}
        split = read_split(project / f"data/datasets/{task}/val.parquet")
        assert tuple(split.images.shape[1:]) == (32, 32, 3)
        assert np.bincount(split.labels.numpy()).tolist() == [4] * classes
    eurosat = json.loads((project / "data/datasets/eurosat/info.json").read_text())
    assert eurosat["class_names"][0] == "annual crop land"  # the registry's CLIP names
    assert json.loads((project / "data/datasets/dtd/info.json").read_text())["class_names"] == ["banded", "blotchy", "braided", "bubbly"]


def _stage_in_copy(project, tmp_path, update: dict, stage: list[str]):
    copy = tmp_path / "copy"
    shutil.copytree(project, copy, symlinks=True, ignore=shutil.ignore_patterns(".git", ".dvc"))
    params = yaml.safe_load((copy / "params.yaml").read_text())
    for dotted, value in update.items():
        block = params
        *parents, last = dotted.split(".")
        for key in parents:
            block = block[key]
        block[last] = value
    write_params(copy / "params.yaml", params)
    return copy, run([sys.executable, "-m", *stage], copy, check=False)


def test_pickle_only_expert_is_refused_without_allow_pickle(hub_project, tmp_path):
    project, _, _ = hub_project
    copy, proc = _stage_in_copy(project, tmp_path, {"hub.allow_pickle": False}, ["stages.experts", "dtd"])
    assert proc.returncode == 2
    assert "tanganke/clip-vit-base-patch32_dtd" in proc.stderr and "pytorch_model.bin" in proc.stderr and "allow_pickle" in proc.stderr
    assert sha256_file(copy / "data/experts/dtd/expert.safetensors") == sha256_file(project / "data/experts/dtd/expert.safetensors")


def test_pinned_sha256_mismatch_stops_the_stage(hub_project, tmp_path):
    project, _, _ = hub_project
    _, proc = _stage_in_copy(project, tmp_path, {"hub.experts.sha256": {"eurosat": "0" * 64}}, ["stages.experts", "eurosat"])
    assert proc.returncode == 2
    assert "tanganke/clip-vit-base-patch32_eurosat/model.safetensors: sha256" in proc.stderr and "0" * 64 in proc.stderr


def test_a_file_missing_offline_fails_at_once_naming_the_repo_and_how_to_prefetch(hub_project, tmp_path):
    project, _, _ = hub_project
    _, proc = _stage_in_copy(project, tmp_path, {"hub.pretrained.repo": "openai/clip-vit-large-patch14"}, ["stages.pretrained"])
    assert proc.returncode == 2
    assert "openai/clip-vit-large-patch14" in proc.stderr and "hf download openai/clip-vit-large-patch14" in proc.stderr


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"tasks": ["mnist_rotation"]}, "unknown hub task"),
        ({"model": "micro-vit-minilm"}, "source hf reads transformers CLIP checkpoints"),
        ({"source": "builtin", "tasks": ["mnist"]}, "source builtin trains open_clip towers"),
        ({"hub": {"datasets": {"mnist": {"colour": "red"}}}}, "hub.datasets"),
        ({"hub": {"experts": {"sha256": {"mnist": "abc"}}}}, "not 64 hex digits"),
    ],
)
def test_hub_params_are_validated(tmp_path, update, message):
    params = {**HUB_PARAMS, **update}
    write_params(tmp_path / "params.yaml", params)
    with pytest.raises(ParamsError, match=message):
        load_params(tmp_path / "params.yaml")
