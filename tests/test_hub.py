"""`source: hf` end to end, offline: tiny CLIP checkpoints and parquet datasets in a hub-layout
cache (tests/hub_fixtures.py), loaded by repo id with HF_HUB_OFFLINE=1, through CAT and evaluate."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import yaml
from hub_fixtures import COMMIT, DATASETS, PRETRAINED, build_hub_cache, snapshot

from catmerge.data import read_split
from catmerge.io import load_weights, sha256_file
from catmerge.params import ParamsError, load_params
from conftest import MICRO_PARAMS, make_project, run, write_params

TASKS = ["mnist", "dtd"]  # two checkpoint formats: transformers-5 safetensors, a prefixed pickle
HUB_PARAMS = {
    **MICRO_PARAMS,
    "tasks": TASKS,
    "source": "hf",
    "model": "micro-hf-clip",
    "hub": {**MICRO_PARAMS["hub"], "allow_pickle": True, "val_fraction": 0.2},  # dtd's expert is a pytorch_model.bin
    "merge": {"methods": ["weight_averaging", "task_arithmetic", "cat"]},
    "task_arithmetic": {"alpha": 0.3},
    "select": {"task_arithmetic": {"alpha": [0.3, 0.6]}},
}


@pytest.fixture(scope="module")
def hub_project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("hub") / "project", HUB_PARAMS)
    cache = build_hub_cache(project / ".hf", TASKS)  # conftest.run points HF_HOME here
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
    # one zero-shot head per label set, cached by text tower and labels beside the hub cache
    cached = sorted((project / ".hf/catmerge/heads").glob("*.safetensors"))
    assert len(cached) == len(TASKS)
    heads = {load_weights(p)["weight"].shape[0] for p in cached}
    assert heads == {len(DATASETS[t][2]) for t in TASKS}


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
    """mnist: transformers-5 keys without the vision_model. prefix; dtd: hub keys in a
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
    from catmerge.hub_datasets import hub_task

    assert hub_task("eurosat").class_names[0] == "annual crop land"  # the registry's CLIP names win over ClassLabel's
    assert hub_task("eurosat", {"revision": "v2"}).revision == "v2"
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
    _, proc = _stage_in_copy(project, tmp_path, {"hub.experts.sha256": {"mnist": "0" * 64}}, ["stages.experts", "mnist"])
    assert proc.returncode == 2
    assert "tanganke/clip-vit-base-patch32_mnist/model.safetensors: sha256" in proc.stderr and "0" * 64 in proc.stderr


def test_a_file_missing_offline_fails_at_once_naming_the_repo_and_how_to_prefetch(hub_project, tmp_path):
    project, _, _ = hub_project
    _, proc = _stage_in_copy(project, tmp_path, {"hub.pretrained.repo": "openai/clip-vit-large-patch14"}, ["stages.pretrained"])
    assert proc.returncode == 2
    assert "openai/clip-vit-large-patch14" in proc.stderr and "hf download openai/clip-vit-large-patch14" in proc.stderr


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"tasks": ["mnist_rotation"]}, "unknown hub task"),
        ({"model": "micro-vit-minilm"}, "source hf reads hf_clip checkpoints; model 'micro-vit-minilm' is of family open_clip"),
        ({"source": "open_clip"}, "source open_clip reads open_clip checkpoints"),
        ({"source": "local"}, "source local: hub.pretrained.repo = 'openai/clip-vit-base-patch32' is not a local path"),
        ({"source": "builtin", "tasks": ["mnist"]}, "source builtin trains open_clip towers"),
        ({"hub": {"datasets": {"mnist": {"colour": "red"}}}}, "hub.datasets"),
        ({"hub": {"experts": {"sha256": {"mnist": "abc"}}}}, "not 64 hex digits"),
        ({"hub": {**MICRO_PARAMS["hub"], "experts": {"sha256": {"stanford_cars": "a" * 64}}}}, r"hub.experts.sha256: \['stanford_cars'\] not in tasks"),
        ({"tasks": ["mnist", "mnist"]}, r"duplicate hub task"),
    ],
)
def test_hub_params_are_validated(tmp_path, update, message):
    params = {**HUB_PARAMS, **update}
    write_params(tmp_path / "params.yaml", params)
    with pytest.raises(ParamsError, match=message):
        load_params(tmp_path / "params.yaml")


# ---- source open_clip: pretrained from a hub repo in open_clip's layout, experts as Task
# Arithmetic-style pickled ImageEncoder modules on disk -------------------------------------------

def task_arithmetic_pickle(clip, path) -> None:
    """torch.save of an object of class `src.modeling.ImageEncoder` holding an open_clip CLIP, as
    the Task Arithmetic authors' finetuned.pt files are; the class exists only while saving."""
    import types

    import torch

    class ImageEncoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.cache_dir = None

    ImageEncoder.__module__, ImageEncoder.__qualname__ = "src.modeling", "ImageEncoder"
    module = types.ModuleType("src.modeling")
    module.ImageEncoder = ImageEncoder
    sys.modules.update({"src": types.ModuleType("src"), "src.modeling": module})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ImageEncoder(clip), path)
    finally:
        del sys.modules["src.modeling"], sys.modules["src"]


@pytest.fixture(scope="module")
def open_clip_inputs(hub_project, tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    from catmerge.models import create_full_clip

    project, _, _ = hub_project
    torch.manual_seed(1)
    clip, _ = create_full_clip("micro-clip")
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()},
              str(snapshot(project / ".hf", "test-org/micro-clip") / "open_clip_model.safetensors"))
    root = tmp_path_factory.mktemp("task-arithmetic")
    experts = {}
    for task in TASKS:
        with torch.no_grad():
            for p in clip.visual.parameters():
                p.add_(0.01 * torch.randn_like(p))
        experts[task] = {k: v.clone() for k, v in clip.visual.state_dict().items()}
        task_arithmetic_pickle(clip, root / task / "finetuned.pt")
    update = {"source": "open_clip", "model": "micro-clip", "hub.pretrained.repo": "test-org/micro-clip",
              "hub.experts.repo": f"{root}/{{task}}/finetuned.pt"}
    return update, experts


def test_open_clip_source_converts_task_arithmetic_pickles_only_when_allowed(hub_project, open_clip_inputs, tmp_path):
    project, _, _ = hub_project
    update, experts = open_clip_inputs
    copy, proc = _stage_in_copy(project, tmp_path, {**update, "hub.allow_pickle": False}, ["stages.pretrained"])
    assert proc.returncode == 0, proc.stderr  # the pretrained checkpoint is safetensors
    proc = run([sys.executable, "-m", "stages.experts", "dtd"], copy, check=False)
    assert proc.returncode == 2 and "finetuned.pt is a pickle" in proc.stderr and "allow_pickle" in proc.stderr

    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["hub"]["allow_pickle"] = True
    write_params(copy / "params.yaml", params)
    proc = run([sys.executable, "-m", "stages.experts", "mnist"], copy, check=False)
    assert proc.returncode == 0, proc.stderr
    expert = load_weights(copy / "data/experts/mnist/expert.safetensors")
    assert set(expert) == set(experts["mnist"])
    for key, value in experts["mnist"].items():
        assert np.array_equal(expert[key].numpy(), value.numpy()), key
    head = load_weights(copy / "data/experts/mnist/head.safetensors")["weight"]
    assert tuple(head.shape) == (10, 32) and np.allclose(head.norm(dim=1).numpy(), 1.0, atol=1e-5)
    manifest = json.loads((copy / "data/experts/mnist/manifest.json").read_text())
    assert manifest["hub"][0]["file"] == "finetuned.pt" and manifest["hub"][0]["revision"] == "local"
    assert manifest["hub"][0]["sha256"] == sha256_file(update["hub.experts.repo"].format(task="mnist"))


def test_a_malicious_pickle_is_never_opened_by_default(hub_project, tmp_path):
    """A pickle that would create a file when unpickled: refused without allow_pickle, and the
    file does not appear (nothing was unpickled)."""
    import pickle

    project, _, _ = hub_project
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "evil" / "pytorch_model.bin"
    bad.parent.mkdir()
    bad.write_bytes(pickle.dumps(Payload()))
    _, proc = _stage_in_copy(project, tmp_path, {"hub.experts.repo": str(bad.parent), "hub.allow_pickle": False}, ["stages.experts", "mnist"])
    assert proc.returncode == 2 and "pytorch_model.bin is a pickle" in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize(("preset", "c", "repo"), [("vit-b-32", 2, "openai/clip-vit-base-patch32"),
                                                    ("vit-l-14", 3, "openai/clip-vit-large-patch14")])
def test_paper_presets_are_valid_and_complete(preset, c, repo):
    """Each preset is valid params, sets the paper's choices, and has every key of params.yaml, so
    DVC finds every param a stage tracks when it replaces params.yaml."""
    from catmerge.hub_datasets import HUB_TASKS
    from conftest import ROOT

    params = load_params(ROOT / "params" / f"{preset}.yaml")
    assert params.source == "hf" and params.tasks == list(HUB_TASKS) and params.cat.c == c and params.cat.exemplars == 2
    assert params.hub.pretrained.repo == repo and "task_arithmetic" in params.select and "cat" in params.select
    default = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw = yaml.safe_load((ROOT / "params" / f"{preset}.yaml").read_text())
    assert set(raw) == set(default)
    for block in ("hub", "cat", "datasets"):
        assert set(raw[block]) == set(default[block]), block


def test_allowed_module_pickles_still_refuse_code_outside_the_allowlist(tmp_path):
    """With allow_pickle, an open_clip module pickle is read with an allowlist: a payload that
    calls os.system is refused and runs nothing; a transformers .bin is read weights-only."""
    import os

    import torch

    from catmerge.checkpoints import read_pickle
    from catmerge.io import ArtifactError

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"weight": torch.zeros(2), "payload": Payload()}, tmp_path / "finetuned.pt")
    for modules in (True, False):
        with pytest.raises(ArtifactError, match="finetuned.pt"):
            read_pickle(tmp_path / "finetuned.pt", modules=modules)
    assert not marker.exists()


def test_open_clip_tags_resolve_to_their_hub_repo_and_refuse_the_wrong_activation():
    from catmerge.io import ArtifactError
    from catmerge.open_clip_source import pretrained_ref

    assert pretrained_ref("ViT-B-32-quickgelu", "unused", "openai") == "timm/vit_base_patch32_clip_224.openai"
    assert pretrained_ref("ViT-B-32", "org/repo", None) == "org/repo"
    with pytest.raises(ArtifactError, match="quick_gelu=True.*use model 'ViT-B-32-quickgelu'"):
        pretrained_ref("ViT-B-32", "unused", "openai")
    with pytest.raises(ArtifactError, match="no hub checkpoint for model 'ViT-B-32' with tag 'nonsense'"):
        pretrained_ref("ViT-B-32", "unused", "nonsense")


def test_a_local_pretrained_checkpoint_must_be_a_directory(tmp_path):
    from catmerge.checkpoints import fetch_file
    from catmerge.io import ArtifactError

    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="expected a directory holding config.json"):
        fetch_file(str(tmp_path / "model.safetensors"), "config.json")
    (tmp_path / "config.json").write_text("{}")
    assert fetch_file(str(tmp_path), "config.json").revision == "local"


def test_local_source_reads_the_same_checkpoints_from_directories(hub_project, tmp_path):
    """source local: the pretrained CLIPModel directory and an expert directory on disk give the
    same bytes as the hub source did; the manifest records paths and sha256, revision `local`."""
    project, _, _ = hub_project
    hf = project / ".hf"
    pretrained_dir = snapshot(hf, PRETRAINED)
    expert_dirs = tmp_path / "experts"
    for task in TASKS:  # a plain copy, outside any hub cache
        shutil.copytree(snapshot(hf, f"tanganke/clip-vit-base-patch32_{task}"), expert_dirs / task)
    update = {"source": "local", "hub.pretrained.repo": str(pretrained_dir), "hub.experts.repo": f"{expert_dirs}/{{task}}"}
    copy, proc = _stage_in_copy(project, tmp_path, update, ["stages.pretrained"])
    assert proc.returncode == 0, proc.stderr
    proc = run([sys.executable, "-m", "stages.experts", "mnist"], copy, check=False)
    assert proc.returncode == 0, proc.stderr
    for path in ("data/pretrained/image_tower.safetensors", "data/experts/mnist/expert.safetensors",
                 "data/experts/mnist/head.safetensors"):
        assert sha256_file(copy / path) == sha256_file(project / path), path
    (record,) = json.loads((copy / "data/experts/mnist/manifest.json").read_text())["hub"]
    assert record["revision"] == "local" and record["repo"] == str(expert_dirs / "mnist")
    assert record["sha256"] == sha256_file(expert_dirs / "mnist" / "model.safetensors")
