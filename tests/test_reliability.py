"""Crash safety, determinism and one run per workspace, on copies of the session's micro build
(docs/reliability.md has the table; bad params and bad input files are tested in test_params.py,
test_input_checks.py, test_stage_errors.py, test_io.py, test_hub.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from catmerge.io import ArtifactError, WeightsFile, read_json, sha256_file, verify_manifest
from catmerge.workspace_lock import LOCK_FILE, WorkspaceBusy, workspace_lock
from conftest import ROOT, run

DVC = [sys.executable, "-m", "dvc"]
FAULTS = ROOT / "tests" / "fault_injection"  # sitecustomize.py: SIGKILL at the n-th rename


def hashes(root: Path, relative: str) -> dict[str, str]:
    path = root / relative
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p.relative_to(root)): sha256_file(p) for p in files}


def stage(project: Path, args: list[str], kill_at: int | None = None, env: dict | None = None, check: bool = True):
    extra = dict(env or {})
    if kill_at is not None:
        extra.update(CATMERGE_KILL_AT=str(kill_at), PYTHONPATH=str(FAULTS))
    full_env = dict(os.environ, **extra, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, "-m", f"stages.{args[0]}", *args[1:]], cwd=project, env=full_env,
                          capture_output=True, text=True, check=False)
    if check and kill_at is None and proc.returncode != 0:
        raise AssertionError(f"stage {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def orphans(project: Path) -> list[Path]:
    return [p for p in project.rglob(".*.tmp")]


# (stage, its output, rename to die at, whether the old output is removed first as DVC does).
# Kill points: task_vectors half-way through its one file; bases between the two renames that swap
# an old directory for the new one (the old one moved aside, the new one not yet in place);
# evaluate half-way through metrics/metrics.json, its first file.
KILLS = [
    (["task_vectors", "mnist"], "data/task_vectors/mnist.safetensors", 0, True),
    (["bases"], "data/bases", 6, False),  # 3 task files, diagnostics, manifest, old aside (5), new in (6)
    (["evaluate"], "metrics/metrics.json", 0, True),
]


@pytest.mark.parametrize(("args", "output", "kill_at", "remove_first"), KILLS, ids=[k[0][0] for k in KILLS])
def test_sigkill_mid_write_leaves_nothing_a_reader_accepts_and_the_rerun_gives_the_same_bytes(
    project, micro_project, args, output, kill_at, remove_first
):
    target = project / output
    if remove_first:
        target.unlink()
    killed = stage(project, args, kill_at=kill_at)
    assert killed.returncode == -9, killed.stderr
    assert not target.exists()  # never a half-written file or directory under the final name
    assert orphans(project)  # what the kill left behind: temporaries nobody reads
    read = WeightsFile if output.endswith(".safetensors") else read_json if output.endswith(".json") else verify_manifest
    with pytest.raises(ArtifactError, match=f"missing .*{Path(output).name}"):  # a later stage refuses the gap
        read(target)
    stage(project, args)
    assert hashes(project, output) == hashes(micro_project, output)  # and another process's bytes
    assert not orphans(project)  # the rerun cleared the dead writer's temporaries


def test_sigkill_under_dvc_keeps_the_last_good_outputs_and_repro_restores_the_same_bytes(project, micro_project):
    env = dict(os.environ, CATMERGE_KILL_AT="2", PYTHONPATH=str(FAULTS),  # ties, the 3rd of 11 merged files
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    killed_merge = DVC + ["repro", "-f", "--single-item", "merge"]
    before = hashes(project, "data/merged")
    proc = subprocess.run(killed_merge, cwd=project, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode != 0
    # data/merged is persistent and replaced whole: the killed run left the last good models, still DVC's
    assert hashes(project, "data/merged") == before
    assert json.loads(run(DVC + ["status", "--json", "merge"], project).stdout) == {}
    shutil.rmtree(project / "data/merged")  # a first run killed: nothing under the final name
    proc = subprocess.run(killed_merge, cwd=project, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and not (project / "data/merged").exists()
    assert "merge" in json.loads(run(DVC + ["status", "--json", "merge"], project).stdout)
    run(DVC + ["repro", "--no-run-cache", "--single-item", "merge"], project)
    assert json.loads(run(DVC + ["status", "--json", "merge"], project).stdout) == {}
    assert hashes(project, "data/merged") == hashes(micro_project, "data/merged")
    assert not orphans(project)


def test_features_and_merged_weights_are_identical_across_processes(project, micro_project):
    """Task vectors, bases and metrics are compared the same way by the kill tests' reruns above."""
    outputs = ["data/features/mnist.safetensors", "data/merged"]
    for output in outputs:
        shutil.rmtree(project / output) if (project / output).is_dir() else (project / output).unlink()
    # another hash seed than the session build's processes: no ordering may depend on it
    for args in (["features", "mnist"], ["merge"]):
        stage(project, args, env={"PYTHONHASHSEED": "12345"})
    for output in outputs:
        assert hashes(project, output) == hashes(micro_project, output), output
    features = WeightsFile(project / "data/features/mnist.safetensors").metadata
    assert features["data_seed"] == 0 and len(features["exemplars"]) == 2  # the exemplar draw is on record


def test_an_expert_changed_after_its_stage_wrote_it_is_refused_by_the_next_stage(project):
    from catmerge.io import load_weights, save_weights

    expert = project / "data/experts/mnist/expert.safetensors"
    tensors = load_weights(expert)
    first = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[first] = tensors[first] + 1  # still a valid safetensors file, just not the stage's
    save_weights(tensors, expert)
    before = hashes(project, "data/task_vectors/mnist.safetensors")
    proc = stage(project, ["task_vectors", "mnist"], check=False)
    assert proc.returncode == 2
    assert "[task_vectors] error: data/experts/mnist/expert.safetensors: sha256" in proc.stderr
    assert "recorded in data/experts/mnist/manifest.json" in proc.stderr
    assert hashes(project, "data/task_vectors/mnist.safetensors") == before


def test_the_features_stage_refuses_more_exemplars_than_the_split_holds(project):
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["datasets"]["max_train"] = None  # so the params alone cannot tell; the split can
    params["cat"]["exemplars"] = 500
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = hashes(project, "data/features/mnist.safetensors")
    proc = stage(project, ["features", "mnist"], check=False)
    assert proc.returncode == 2
    assert "[features] error: cat.exemplars = 500: data/datasets/mnist/train.parquet has only 200 images" in proc.stderr
    assert hashes(project, "data/features/mnist.safetensors") == before


# ---- one run per workspace -------------------------------------------------------------------


def test_a_stage_refuses_a_workspace_another_run_holds(project):
    before = hashes(project, "reports")
    with workspace_lock(project, command="flow catmerge-pipeline (test)"):
        proc = stage(project, ["report"], check=False)
    assert proc.returncode == 2
    assert "[report] error: workspace busy:" in proc.stderr
    assert f"pid {os.getpid()} (flow catmerge-pipeline (test)" in proc.stderr and str(LOCK_FILE) in proc.stderr
    assert hashes(project, "reports") == before
    stage(project, ["report"])  # released: the next run goes in


def test_a_second_dvc_repro_is_refused_and_the_first_finishes_unharmed(project, micro_project):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    first = subprocess.Popen(DVC + ["repro", "-f", "--single-item", "evaluate"], cwd=project, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = project / LOCK_FILE
    deadline = time.time() + 60
    while not (lock.is_file() and "stages.evaluate" in lock.read_text()):  # the first is inside its stage
        assert first.poll() is None and time.time() < deadline, first.stdout.read() if first.poll() is not None else "timeout"
        time.sleep(0.05)
    second = subprocess.run(DVC + ["repro", "--single-item", "report"], cwd=project, env=env, capture_output=True, text=True, check=False)
    assert second.returncode != 0
    # DVC's own locks: the repo lock, or the per-path lock on what the first run reads and writes
    assert re.search(r"Unable to acquire lock|is busy, it is being blocked by", second.stderr + second.stdout), second.stderr
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    assert hashes(project, "metrics/metrics.json") == hashes(micro_project, "metrics/metrics.json")
    assert "evaluate" not in json.loads(run(DVC + ["status", "--json", "evaluate"], project).stdout)


def test_a_flow_will_not_start_while_a_dvc_command_runs(tmp_path):
    import zc.lockfile

    (tmp_path / ".dvc/tmp").mkdir(parents=True)
    dvc_lock = zc.lockfile.LockFile(str(tmp_path / ".dvc/tmp/lock"))  # what a running DVC command holds
    try:
        with pytest.raises(WorkspaceBusy, match=r"workspace busy: a DVC command \(pid \d+\) is running in"), \
                workspace_lock(tmp_path, check_dvc=True):
            pass
    finally:
        dvc_lock.close()
    # DVC done: the flow goes in, and holds the workspace against anyone else
    with workspace_lock(tmp_path, check_dvc=True), pytest.raises(WorkspaceBusy, match="workspace busy"), workspace_lock(tmp_path):
        pass
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released, holder record cleared
