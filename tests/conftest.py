"""Shared fixtures. Tests never touch the network: the offline settings are forced here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MPLBACKEND": "Agg",
}
os.environ.update(OFFLINE_ENV)

@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test starts from the same environment. Some libraries change the test process's own
    os.environ: dask's Nanny sets OMP_NUM_THREADS=1 (and MKL's, OpenBLAS's) before it spawns a
    worker and never puts it back, so every stage spawned by a later test ran on one thread and
    rounded its matrix products differently from the session's builds on two (bytes compared by
    tests/test_reliability.py differed only after tests/test_flows.py's dask test had run)."""
    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)


# The micro benchmark: a 2-layer, width-16 tower, three tasks (two sharing the MNIST digits),
# a few hundred images, a few dozen training steps. Builds in well under a minute.
MICRO_PARAMS = {
    "tasks": ["mnist", "mnist_rotation", "textures"],
    "source": "builtin",
    "model": "micro-vit-minilm",
    "device": "auto",
    "seed": 0,
    "data_seed": 0,
    "datasets": {"max_train": 200, "max_val": 40, "max_test": 100},
    "pretrain": {"steps": 30, "batch_size": 64, "lr": 3.0e-3, "weight_decay": 0.0, "warmup_steps": 3},
    "finetune": {"steps": 40, "batch_size": 64, "lr": 2.0e-3, "weight_decay": 0.0, "warmup_steps": 4},
    "task_vectors": {"dtype": "float64"},
    # read by the hub sources only, but DVC wants every param a stage lists (tests/test_hub.py sets its own)
    "hub": {"pretrained": {"repo": "openai/clip-vit-base-patch32", "tag": None, "revision": "main", "sha256": None},
            "experts": {"repo": "tanganke/clip-vit-base-patch32_{task}", "revision": "main", "revisions": {}, "sha256": {}},
            "allow_pickle": False, "val_fraction": 0.1, "datasets": {}},
    "merge": {"methods": ["weight_averaging", "task_arithmetic", "ties", "regmean", "regmean_plusplus", "pcb", "tsv_m", "iso_c", "iso_cts", "wudi", "cat"]},
    "task_arithmetic": {"alpha": 0.3},
    "cat": {"exemplars": 2, "feature_alpha": 1.0, "c": 2, "lambda": 1.0, "c_norm": None, "lambda_norm": None,
            "c_shift": None, "qkv": "split", "conv": False, "drop_nonpositive": True, "shift_score": "others", "precision": "float64", "rescale": True,
            "alpha": 0.3},
    "ties": {"k": 20, "trim": "global", "alpha": 1.0},
    "regmean": {"exemplars": 8, "nondiagonal_scale": 0.9},
    "regmean_plusplus": {"exemplars": 8, "nondiagonal_scale": 0.9, "alpha": 1.0},
    "pcb": {"drop_ratio": 0.9, "alpha": 1.0},
    "tsv_m": {"alpha": 1.0},
    "iso_c": {"alpha": 1.5},
    "iso_cts": {"common_fraction": 0.8, "alpha": 1.5},
    "wudi": {"iterations": 20, "lr": 1.0e-5, "alpha": 1.0},
    # Task Arithmetic and CAT keep fixed params here, so their alpha params reach the merge directly.
    "select": {"ties": {"k": [20, 40], "alpha": [0.5, 1.0]}, "pcb": {"alpha": [0.5, 1.0]}},
    "evaluate": {"batch_size": 256},
}


def write_params(path: Path, params: dict) -> None:
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HOME=str(cwd / ".hf"), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_project(dest: Path, params: dict) -> Path:
    """A fresh git + DVC project holding this repo's pipeline code and the given params."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("catmerge", "stages", "flows"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, dest / name)
    write_params(dest / "params.yaml", params)
    run(["git", "init", "-q"], dest)
    run(["git", "config", "user.email", "ci@example.invalid"], dest)
    run(["git", "config", "user.name", "ci"], dest)
    run([sys.executable, "-m", "dvc", "init", "-q"], dest)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "init"], dest)
    return dest


@pytest.fixture(scope="session")
def micro_project(tmp_path_factory) -> Path:
    """The micro benchmark built once by `dvc repro` (tests that only read it share it)."""
    project = make_project(tmp_path_factory.mktemp("micro") / "project", MICRO_PARAMS)
    proc = run([sys.executable, "-m", "dvc", "repro"], project)
    (project / "first_repro.log").write_text(proc.stdout + proc.stderr)
    shutil.copy(project / "metrics/metrics.json", project / "first_metrics.json")
    return project


@pytest.fixture()
def project(micro_project, tmp_path) -> Path:
    """A copy of the micro build, for tests that change or break it."""
    dest = tmp_path / "project"
    shutil.copytree(micro_project, dest, symlinks=True, ignore=shutil.ignore_patterns(".catmerge"))
    return dest
