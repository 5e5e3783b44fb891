"""Bad input to the stages: clear errors naming what is wrong, nothing half-written."""

from __future__ import annotations

import copy
import shutil
import sys

import pytest

from conftest import MICRO_PARAMS, ROOT, run, write_params


@pytest.fixture()
def workdir(tmp_path):
    shutil.copytree(ROOT / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "catmerge", tmp_path / "catmerge", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_unknown_task_lists_known_ones(workdir):
    params = copy.deepcopy(MICRO_PARAMS)
    params["tasks"] = ["mnist", "imagenet"]
    write_params(workdir / "params.yaml", params)
    proc = run([sys.executable, "-m", "stages.datasets", "mnist"], workdir, check=False)
    assert proc.returncode == 2
    assert "tasks" in proc.stderr and "imagenet" in proc.stderr and "mnist_rotation" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (workdir / "data").exists()


def test_unknown_method_lists_known_ones(workdir):
    params = copy.deepcopy(MICRO_PARAMS)
    params["merge"]["methods"] = ["task_arithmetic", "fisher"]
    write_params(workdir / "params.yaml", params)
    proc = run([sys.executable, "-m", "stages.merge"], workdir, check=False)
    assert proc.returncode == 2
    assert "merge.methods" in proc.stderr and "fisher" in proc.stderr and "weight_averaging" in proc.stderr
    assert not (workdir / "data").exists()


def test_task_not_in_params_and_missing_argument(workdir):
    write_params(workdir / "params.yaml", MICRO_PARAMS)
    proc = run([sys.executable, "-m", "stages.experts", "digits"], workdir, check=False)
    assert proc.returncode == 2
    assert "task 'digits' is not in `tasks`" in proc.stderr and "mnist_rotation" in proc.stderr
    proc = run([sys.executable, "-m", "stages.experts"], workdir, check=False)
    assert proc.returncode == 2 and "usage: python -m stages.experts <task>" in proc.stderr


def test_missing_input_file_is_named(workdir):
    write_params(workdir / "params.yaml", MICRO_PARAMS)
    proc = run([sys.executable, "-m", "stages.task_vectors", "mnist"], workdir, check=False)
    assert proc.returncode == 2
    assert "[task_vectors] error: missing directory: data/pretrained\n" in proc.stderr
    assert not (workdir / "data/task_vectors").exists()
