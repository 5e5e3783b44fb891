"""Prefect flows over the DVC pipeline, on the micro benchmark (one session-scoped Prefect harness)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from catmerge.io import sha256_file
from conftest import MICRO_PARAMS, make_project, run

DVC = [sys.executable, "-m", "dvc"]


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory):
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def flow_project(prefect_harness, micro_project, tmp_path_factory):
    """The micro benchmark built by the pipeline flow, in its own project."""
    from flows.pipeline import pipeline

    project = make_project(tmp_path_factory.mktemp("flow") / "project", MICRO_PARAMS)
    # The stages the session's `dvc repro` already ran come from its run cache (the same code and
    # inputs): the flow drives DVC through every stage without computing the micro benchmark twice.
    # Stages these tests change (select, merge, evaluate, bases, ...) then run for real.
    run(DVC + ["cache", "dir", str(micro_project / ".dvc" / "cache")], project)
    os.environ["HF_HOME"] = str(project / ".hf")
    result = pipeline(str(project))
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "built by the flow"], project)
    return project, result


def artifact_hashes(project) -> dict[str, str]:
    return {str(p.relative_to(project)): sha256_file(p) for p in sorted((project / "data").rglob("*")) if p.is_file()}


def test_flow_runs_every_stage_and_matches_dvc_repro(flow_project, micro_project):
    from flows.dvc_repo import stage_order

    project, result = flow_project
    assert result["ran"] == stage_order(project)
    assert [s["stage"] for s in result["stages"]] == result["ran"]
    # upstream of select, every stage came from the shared run cache (identical code and inputs);
    # DVC never run-caches select (persistent cache) or outputs it does not cache, so those ran
    restored = {s["stage"] for s in result["stages"] if s["restored"]}
    upstream = {s for s in stage_order(project) if s.split("@")[0] in ("datasets", "pretrained", "experts", "task_vectors", "features", "bases")}
    assert restored >= upstream and "select" not in restored, sorted(restored)
    expected = json.loads((micro_project / "first_metrics.json").read_text())
    assert json.loads((project / "metrics/metrics.json").read_text()) == expected
    assert result["metrics"] == expected


def test_second_flow_run_skips_every_stage_and_changes_nothing(flow_project):
    from flows.pipeline import pipeline

    project, _ = flow_project
    before = artifact_hashes(project)
    result = pipeline(str(project))
    assert result["ran"] == [] and all(not s["ran"] for s in result["stages"])
    assert artifact_hashes(project) == before


def test_alpha_override_reruns_merge_and_evaluate_and_saves_an_experiment(flow_project):
    from flows.pipeline import pipeline

    project, _ = flow_project
    result = pipeline(str(project), overrides=["task_arithmetic.alpha=0.5"], experiment="alpha-half")
    assert result["ran"] == ["select", "merge", "evaluate", "report"]
    assert "merge:\n  methods:" in (project / "params.yaml").read_text() and "alpha: 0.5" in (project / "params.yaml").read_text()
    experiments = run(DVC + ["exp", "list", "--name-only"], project).stdout.split()
    assert "alpha-half" in experiments
    # DVC itself agrees: with the override in params.yaml, nothing is stale
    assert json.loads(run(DVC + ["status", "--json"], project).stdout) == {}
    assert json.loads((project / "metrics/metrics.json").read_text()) == result["metrics"]


def test_stage_failure_fails_the_run_with_the_stage_message_and_keeps_artifacts(flow_project):
    from flows.pipeline import pipeline

    project, _ = flow_project
    params_before = (project / "params.yaml").read_text()
    bases_code = (project / "stages/bases.py").read_text()
    before = artifact_hashes(project)
    try:
        # a stage that fails on valid params: its input checks refuse what it reads
        failing = "    from catmerge.params import ParamsError\n    raise ParamsError('cat.c = 3: injected failure')\n"
        (project / "stages/bases.py").write_text(bases_code.replace("    params = load_params()\n", f"    params = load_params()\n{failing}", 1))
        with pytest.raises(Exception, match=r"bases: \[bases\] error: cat.c = 3: injected failure"):
            pipeline(str(project), overrides=["cat.c=3"])
        # DVC clears the failing stage's own outputs before running it; everything else is untouched
        # and nothing half-written is left behind
        after = artifact_hashes(project)
        assert after == {k: v for k, v in before.items() if not k.startswith("data/bases/")}
        assert not list((project / "data").rglob("*.tmp"))
    finally:
        (project / "params.yaml").write_text(params_before)
        (project / "stages/bases.py").write_text(bases_code)
    pipeline(str(project))  # reruns bases, or restores it from the run cache
    assert artifact_hashes(project) == before
    # an invalid override is refused before anything runs or is written
    with pytest.raises(Exception, match=r"params.yaml with cat.c=-1:\n  cat.c = -1"):
        pipeline(str(project), overrides=["cat.c=-1"])
    with pytest.raises(Exception, match=r"params.yaml with cat.c=100:\n  cat.c = 100: must be less than 16"):
        pipeline(str(project), overrides=["cat.c=100"])
    assert (project / "params.yaml").read_text() == params_before


def test_a_second_flow_is_refused_while_one_holds_the_workspace(flow_project):
    from catmerge.workspace_lock import WorkspaceBusy, workspace_lock
    from flows.pipeline import pipeline

    project, _ = flow_project
    params_before = (project / "params.yaml").read_text()
    before = artifact_hashes(project)
    with workspace_lock(project, command="flow catmerge-pipeline (the first)"), \
            pytest.raises(WorkspaceBusy, match=r"workspace busy: .* in use by pid \d+ \(flow catmerge-pipeline \(the first\)"):
        pipeline(str(project), overrides=["task_arithmetic.alpha=0.9"])
    assert (project / "params.yaml").read_text() == params_before  # the override never landed
    assert artifact_hashes(project) == before


def test_two_point_sweep_on_a_two_worker_dask_cluster(flow_project, tmp_path):
    from distributed import LocalCluster

    from flows.pipeline import run_sweep

    project, _ = flow_project
    run(["git", "add", "-A"], project)
    subprocess.run(["git", "commit", "-qm", "state"], cwd=project, check=False, capture_output=True)
    remote = tmp_path / "dvc-remote"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        rows = run_sweep(str(project), ["cat.alpha=0.2,0.6"], dask_address=cluster.scheduler_address, remote=str(remote))
    assert [r["overrides"] for r in rows] == [["cat.alpha=0.2"], ["cat.alpha=0.6"]]
    assert all(r["ran"] == ["evaluate", "merge", "report", "select"] for r in rows)  # upstream came from the remote
    assert rows[0]["average"]["cat"] != rows[1]["average"]["cat"]
    assert rows[0]["average"]["task_arithmetic"] == rows[1]["average"]["task_arithmetic"]
    assert any(remote.rglob("*"))  # artifacts went through the DVC remote
    experiments = run(DVC + ["exp", "list", "--name-only"], project).stdout.split()
    assert {"sweep-0", "sweep-1"} <= set(experiments)


def test_schedule_deployment_carries_the_cron_and_params(flow_project):
    from flows.serve import deployment

    project, _ = flow_project
    deployment_ = deployment("nightly", "0 3 * * *", str(project), ["task_arithmetic.alpha=0.4"])
    assert deployment_.parameters == {"project": str(project.resolve()), "overrides": ["task_arithmetic.alpha=0.4"]}
    assert [s.schedule.cron for s in deployment_.schedules] == ["0 3 * * *"]


def test_download_stages_retry_with_backoff_and_time_out(monkeypatch, tmp_path):
    import time

    from flows import dvc_repo
    from flows.pipeline import stage_task

    runner, timeout = stage_task("experts@mnist", 3, 60.0)
    assert runner.retries == 3 and timeout == 60.0
    assert list(runner.retry_delay_seconds) == [10, 20, 40]  # exponential backoff
    runner, timeout = stage_task("merge", 3, 60.0)
    assert runner.retries == 0 and timeout is None

    # a stage past its timeout is killed (with its children) and reported
    monkeypatch.setattr(dvc_repo, "DVC", [sys.executable, "-c", "import time; time.sleep(60)"])
    start = time.perf_counter()
    with pytest.raises(dvc_repo.StageFailed, match="timed out after 1 s"):
        dvc_repo.run_dvc([], tmp_path, echo=False, timeout=1)
    assert time.perf_counter() - start < 20


def test_download_stages_retry_only_failures_a_rerun_can_fix():
    """Bad params, sha256 mismatches, refused pickles and offline misses print `[stage] error:` and
    fail at once; a transient hub error (`[stage] transient error:`) or a crash is retried."""
    from flows.dvc_repo import stage_failure
    from flows.pipeline import _worth_retrying

    class Failed:
        def __init__(self, exc):
            self.exc = exc

        def result(self):
            raise self.exc

    dvc_error = "ERROR: failed to reproduce 'experts@mnist': failed to run: python -m stages.experts mnist, exited with 2"
    offline = stage_failure("experts@mnist", "[experts] start",
                            "[experts] error: model repo x/y: model.safetensors (revision main) is not in the hub cache\n" + dvc_error)
    transient = stage_failure("experts@mnist", "[experts] start",
                              "[experts] transient error: model repo x/y: downloading model.safetensors failed: 502\n" + dvc_error)
    crash = stage_failure("experts@mnist", "", "Traceback (most recent call last):\nKeyError: 'x'\n" + dvc_error)
    assert not crash.permanent
    assert offline.permanent and "not in the hub cache" in str(offline)
    assert not transient.permanent and "502" in str(transient)
    assert _worth_retrying(None, None, Failed(offline)) is False
    assert _worth_retrying(None, None, Failed(transient)) is True
    assert _worth_retrying(None, None, Failed(crash)) is True
    assert _worth_retrying(None, None, Failed(RuntimeError("killed"))) is True


def test_a_stage_waits_out_another_dvc_commands_lock_and_gives_up_after_the_limit(monkeypatch, tmp_path):
    from flows import dvc_repo

    busy = (1, "", "ERROR: failed to reproduce 'merge': 'data/merged' is busy, it is being blocked by:\n  (PID 42): dvc repro")
    answers = [busy, busy, (0, "Running stage 'merge':\n", "")]
    calls = []

    def fake_run_dvc(args, project, echo=True, env=None, timeout=None):
        calls.append(args)
        return answers.pop(0)

    monkeypatch.setattr(dvc_repo, "run_dvc", fake_run_dvc)
    monkeypatch.setattr(dvc_repo.time, "sleep", lambda seconds: None)
    outcome = dvc_repo.reproduce("merge", tmp_path, echo=False)
    assert outcome.ran and len(calls) == 3 and calls[0] == ["repro", "--single-item", "merge"]
    answers[:] = [busy] * 100  # still busy past the limit: DVC's own message, not retried forever
    with pytest.raises(dvc_repo.StageFailed, match="is busy, it is being blocked by"):
        dvc_repo.reproduce("merge", tmp_path, echo=False, busy_wait_seconds=0.0)


def test_overrides_land_in_every_file_or_in_none(tmp_path):
    import yaml

    from catmerge.params import ParamsError
    from conftest import MICRO_PARAMS, write_params
    from flows.dvc_repo import apply_overrides

    write_params(tmp_path / "real.yaml", MICRO_PARAMS)
    (tmp_path / "params.yaml").symlink_to(tmp_path / "real.yaml")
    (tmp_path / "extra.yaml").write_text("x: 1\n")
    os.chmod(tmp_path / "real.yaml", 0o640)
    with pytest.raises(ParamsError, match=r"params.yaml with cat.c=-1:\n  cat.c = -1"):
        apply_overrides(tmp_path, ["extra.yaml:x=2", "cat.c=-1"])
    assert (tmp_path / "extra.yaml").read_text() == "x: 1\n"  # the good file's override did not land either
    apply_overrides(tmp_path, ["extra.yaml:x=2", "cat.c=3"])
    assert yaml.safe_load((tmp_path / "extra.yaml").read_text()) == {"x": 2}
    assert (tmp_path / "params.yaml").is_symlink()  # the link kept, its target edited
    assert yaml.safe_load((tmp_path / "real.yaml").read_text())["cat"]["c"] == 3
    assert (tmp_path / "real.yaml").stat().st_mode & 0o777 == 0o640  # its mode kept (a temp file's would be 0600)


def test_an_interrupted_flow_stops_the_dvc_command_and_its_stage_first(monkeypatch, tmp_path):
    """Ctrl-C (or a cancelled flow) while DVC runs: the command and its children end before the
    interrupt goes on, so the workspace lock is never let go while a stage still runs."""
    import signal
    import time

    from flows import dvc_repo

    pid_file = tmp_path / "stage.pid"
    child = f"import os, subprocess, sys, time; open({str(pid_file)!r}, 'w').write(str(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']).pid)); time.sleep(60)"
    monkeypatch.setattr(dvc_repo, "DVC", [sys.executable, "-c", child])

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 2.0)
        with pytest.raises(KeyboardInterrupt):
            dvc_repo.run_dvc([], tmp_path, echo=False)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    stage = Path(f"/proc/{int(pid_file.read_text())}/stat")
    deadline = time.time() + 5
    while stage.exists() and stage.read_text().split(") ", 1)[1][0] != "Z" and time.time() < deadline:
        time.sleep(0.05)
    assert not stage.exists() or stage.read_text().split(") ", 1)[1][0] == "Z"  # the grandchild ("stage") is gone too
