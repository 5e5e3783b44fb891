"""Serve the pipeline flow on a schedule: new experts land, it re-merges and re-evaluates.

    prefect server start --host 127.0.0.1 --port 4200          # in one terminal
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.serve --cron "0 3 * * *" [--project PATH] [-S cat.c=3]

Each scheduled run is `flows.pipeline.pipeline`: DVC reruns only the stages whose inputs changed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.pipeline import pipeline


def deployment(name: str, cron: str, project: str, overrides: list[str]):
    return pipeline.to_deployment(
        name=name, cron=cron, parameters={"project": str(Path(project).resolve()), "overrides": overrides}
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--cron", required=True, help='schedule, e.g. "0 3 * * *" (03:00 every day)')
    parser.add_argument("--name", default="catmerge-scheduled")
    parser.add_argument("--project", default=".")
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    from prefect import serve

    serve(deployment(args.name, args.cron, args.project, args.overrides))


if __name__ == "__main__":
    main()
