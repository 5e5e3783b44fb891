"""Prefect flows over the DVC pipeline: one Prefect task per DVC stage, DVC decides what is stale.

    python -m flows.pipeline                              # like `dvc repro`, with run history and logs
    python -m flows.pipeline -S cat.c=3                   # like `dvc exp run -S cat.c=3`
    python -m flows.pipeline sweep -S cat.c=1,2,3 --concurrency 2
    python -m flows.pipeline sweep -S cat.c=1,2,4 --dask-address tcp://10.0.0.5:8786 --remote s3://bucket/cache

Stages run in dependency order, per-task stages one task run per item (`experts@mnist`, ...); each
task asks `dvc repro --single-item`, so a stage already up to date is reported as skipped. Stages
that will download (datasets, pretrained, experts) get retries with exponential backoff and a
timeout. A sweep runs each grid point as a DVC experiment in its own workspace (a clone sharing the
project's DVC cache, or a DVC remote when the workers are elsewhere), in parallel.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from catmerge.workspace_lock import workspace_lock
from flows.dvc_repo import (
    StageFailed,
    apply_overrides,
    params_snapshot,
    reproduce,
    restore_params,
    run_dvc,
    save_experiment,
    stage_group,
    stage_order,
)
from flows.prefect_server import record_server, stop_orphaned_server

DOWNLOAD_GROUPS = {"datasets", "pretrained", "experts"}  # hub sources fetch in these stages
METRICS = Path("metrics/metrics.json")
RESULTS_TABLE = Path("metrics/results.md")


@task(task_run_name="{stage}")
def reproduce_stage(stage: str, project: str, timeout_seconds: float | None = None, snapshot: dict[str, str] | None = None) -> dict:
    logger = get_run_logger()
    logger.info("%s: start", stage)
    outcome = reproduce(stage, Path(project), timeout_seconds=timeout_seconds, snapshot=snapshot)
    what = "restored from DVC's run cache" if outcome.restored else "ran" if outcome.ran else "skipped, up to date"
    logger.info("%s: %s in %.1fs", stage, what, outcome.seconds)
    return asdict(outcome)


def _worth_retrying(task, task_run, state) -> bool:
    """Retry a download stage unless it failed for a reason a rerun cannot fix (bad params, a
    sha256 mismatch, a refused pickle, a file missing while offline): those fail at once."""
    try:
        state.result()
    except StageFailed as exc:
        return not exc.permanent
    except Exception:  # noqa: BLE001 - anything else (a crash, a timeout) may pass
        return True
    return False


def stage_task(stage: str, download_retries: int, download_timeout_seconds: float):
    """The task (and its timeout) for a stage: stages that download retry with exponential backoff."""
    if stage_group(stage) in DOWNLOAD_GROUPS:
        retrying = reproduce_stage.with_options(
            retries=download_retries, retry_delay_seconds=exponential_backoff(backoff_factor=10),
            retry_condition_fn=_worth_retrying,
        )
        return retrying, download_timeout_seconds
    return reproduce_stage, None


def _publish(project: Path, key: str, title: str, extra: str = "") -> None:
    table = (project / RESULTS_TABLE).read_text() if (project / RESULTS_TABLE).is_file() else "(no results table)"
    create_markdown_artifact(key=key, markdown=f"## {title}\n\n{extra}{table}", description=title)
    create_link_artifact(key=f"{key}-report", link=(project / RESULTS_TABLE).resolve().as_uri(), link_text="results table")


@flow(name="catmerge-pipeline")
def pipeline(
    project: str = ".",
    overrides: list[str] | None = None,
    experiment: str | None = None,
    download_retries: int = 3,
    download_timeout_seconds: float = 3600.0,
) -> dict:
    """Reproduce every stage in order; with overrides, set them first and save a DVC experiment."""
    logger = get_run_logger()
    root = Path(project).resolve()
    # held for the whole run, so a second run in this workspace fails at once instead of
    # interleaving its stages (or its params.yaml overrides) with ours
    with workspace_lock(root, command=f"flow catmerge-pipeline (pid {os.getpid()})", check_dvc=True):
        orphan = stop_orphaned_server(root)
        if orphan is not None:
            logger.info("stopped the temporary Prefect server (pid %d) that a killed flow left running", orphan)
        record_server(root)
        apply_overrides(root, overrides or [])
        # params as this run set them: put back before each stage if another command changed them
        snapshot = params_snapshot(root, overrides or [])
        outcomes = []
        for stage in stage_order(root):
            runner, timeout = stage_task(stage, download_retries, download_timeout_seconds)
            outcomes.append(runner(stage, str(root), timeout, snapshot))
        restore_params(root, snapshot)
        saved = save_experiment(root, experiment) if overrides else None
        metrics = json.loads((root / METRICS).read_text()) if (root / METRICS).is_file() else None
    ran = [o["stage"] for o in outcomes if o["ran"]]
    logger.info("ran %d stage(s): %s; skipped %d up to date", len(ran), ", ".join(ran) or "none", len(outcomes) - len(ran))
    summary = f"Overrides: {', '.join(overrides or []) or 'none'}. Ran: {', '.join(ran) or 'nothing (all up to date)'}.\n\n"
    _publish(root, "catmerge-results", "catmerge results", summary)
    return {"stages": outcomes, "ran": ran, "metrics": metrics, "experiment": saved}


# ---- sweeps ----------------------------------------------------------------------------------


def grid_points(overrides: list[str]) -> list[list[str]]:
    """`dvc exp run -S` sweep syntax (`cat.c=1,2`, Hydra choice/range) -> one override list per point."""
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import get_hydra_sweeps

    points = []
    for point in get_hydra_sweeps(to_path_overrides(overrides)):
        points.append([o if path == "params.yaml" else f"{path}:{o}" for path, file_overrides in point.items() for o in file_overrides])
    return points


def _git(args: list[str], cwd: Path) -> None:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise StageFailed(f"git {' '.join(args)}: {proc.stderr.strip()}")


def _dvc(args: list[str], cwd: Path) -> str:
    code, stdout, stderr = run_dvc(args, cwd, echo=False)
    if code:
        raise StageFailed(f"dvc {' '.join(args)} in {cwd}: {(stderr.strip() or stdout.strip()).splitlines()[-1:]}")
    return stdout


@task(task_run_name="experiment {name}")
def run_experiment(project: str, overrides: list[str], name: str, remote: str | None) -> dict:
    """One grid point as a DVC experiment in a fresh workspace: a clone of the project (last commit,
    plus its current params.yaml and dvc.lock) whose outputs come from and go to the shared cache
    (same machine) or the DVC remote (any machine). The experiment is pushed back to the project."""
    logger = get_run_logger()
    root = Path(project)
    workspace = Path(tempfile.mkdtemp(prefix=f"catmerge-{name}-"))
    try:
        _git(["clone", "-q", str(root), str(workspace)], root)
        for key, fallback in (("user.name", "catmerge sweep"), ("user.email", "catmerge@localhost")):
            # experiments are git commits: use the project's identity (a clone does not copy local config)
            value = subprocess.run(["git", "config", key], cwd=root, capture_output=True, text=True, check=False).stdout.strip()
            _git(["config", key, value or fallback], workspace)
        for name_ in ("params.yaml", "dvc.lock"):
            if (root / name_).is_file():
                shutil.copyfile(root / name_, workspace / name_)
        if remote:
            _dvc(["remote", "add", "--local", "-d", "-f", "sweep", remote], workspace)
            run_dvc(["pull", "--allow-missing"], workspace, echo=False)  # what is missing is built
        else:
            _dvc(["cache", "dir", "--local", str(root / ".dvc" / "cache")], workspace)
        args = ["exp", "run", "--name", name] + [a for o in overrides for a in ("-S", o)]
        logger.info("experiment %s: %s", name, " ".join(overrides))
        output = _dvc(args, workspace)
        ran = sorted({line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")})
        metrics = json.loads((workspace / METRICS).read_text())
        _dvc(["exp", "push", "--force", *([] if remote else ["--no-cache"]), "origin", name], workspace)
        logger.info("experiment %s: done, ran %s", name, ", ".join(ran) or "nothing")
        return {"experiment": name, "overrides": overrides, "ran": ran, "average": metrics["average"]}
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


def sweep_table(rows: list[dict]) -> str:
    methods = list(rows[0]["average"]) if rows else []
    lines = ["| experiment | overrides | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for row in rows:
        cells = " | ".join(f"{row['average'][m]:.1f}" for m in methods)
        lines.append(f"| {row['experiment']} | {' '.join(row['overrides'])} | {cells} |")
    return "\n".join(lines) + "\n"


@flow(name="catmerge-sweep")
def sweep(project: str = ".", overrides: list[str] | None = None, remote: str | None = None, prefix: str = "sweep") -> list[dict]:
    """Every point of the override grid as a parallel DVC experiment; one table of averages.
    The task runner (threads or Dask) is chosen by the caller: see `run_sweep`."""
    root = Path(project).resolve()
    points = grid_points(overrides or [])
    if remote:  # workers elsewhere start from what this project has already built
        _dvc(["remote", "add", "--local", "-f", "sweep", remote], root)
        _dvc(["push", "-r", "sweep"], root)
    futures = [run_experiment.submit(str(root), point, f"{prefix}-{i}", remote) for i, point in enumerate(points)]
    rows = [future.result() for future in futures]
    table = sweep_table(rows)
    create_markdown_artifact(key="catmerge-sweep", markdown=f"## catmerge sweep\n\n{table}", description="sweep averages")
    get_run_logger().info("sweep results:\n%s", table)
    return rows


def run_sweep(project: str = ".", overrides: list[str] | None = None, concurrency: int = 2, dask_address: str | None = None, remote: str | None = None, prefix: str = "sweep") -> list[dict]:
    if dask_address:
        from prefect_dask import DaskTaskRunner

        runner = DaskTaskRunner(address=dask_address)
    else:
        runner = ThreadPoolTaskRunner(max_workers=concurrency)
    return sweep.with_options(task_runner=runner)(project=project, overrides=overrides, remote=remote, prefix=prefix)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description="Run the catmerge pipeline as a Prefect flow.")
    parser.add_argument("mode", nargs="?", choices=["run", "sweep"], default="run")
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], help="as `dvc exp run -S`")
    parser.add_argument("--project", default=".")
    parser.add_argument("--name", help="experiment name (run with overrides) or name prefix (sweep)")
    parser.add_argument("--concurrency", type=int, default=2, help="sweep: experiments at once (thread runner)")
    parser.add_argument("--dask-address", help="sweep: run on this Dask scheduler through prefect-dask")
    parser.add_argument("--remote", help="sweep: DVC remote the workers share (a directory or s3://...)")
    args = parser.parse_args(argv)
    if args.mode == "sweep":
        rows = run_sweep(args.project, args.overrides, args.concurrency, args.dask_address, args.remote, args.name or "sweep")
        print(sweep_table(rows))
    else:
        result = pipeline(args.project, args.overrides, args.name)
        print(f"ran: {', '.join(result['ran']) or 'nothing (all up to date)'}")
        if (Path(args.project) / RESULTS_TABLE).is_file():
            print((Path(args.project) / RESULTS_TABLE).read_text())


if __name__ == "__main__":
    main()
