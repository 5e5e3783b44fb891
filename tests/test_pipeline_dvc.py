"""End to end: the DVC pipeline on the micro benchmark in a temporary git repo."""

from __future__ import annotations

import json
import re
import shutil
import sys

import yaml

from catmerge.benchmark.tasks import TASKS
from catmerge.io import sha256_file
from conftest import MICRO_PARAMS, run, write_params

MICRO_CLASS_NAMES = {t: TASKS[t].class_names for t in MICRO_PARAMS["tasks"]}

DVC = [sys.executable, "-m", "dvc"]
PER_TASK_STAGES = ("datasets", "experts", "task_vectors", "features")
DOWNSTREAM = {"select", "merge", "evaluate", "report"}


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_repro_builds_everything_then_only_what_changed(micro_project, tmp_path):
    # on a copy: other tests read the shared micro project as built
    micro_project = shutil.copytree(micro_project, tmp_path / "project", symlinks=True)
    first = (micro_project / "first_repro.log").read_text()
    tasks = MICRO_PARAMS["tasks"]
    expected = {"pretrained", "bases", "select", "merge", "evaluate", "report"} | {
        f"{stage}@{t}" for stage in PER_TASK_STAGES for t in tasks
    }
    assert ran_stages(first) == expected

    metrics = json.loads((micro_project / "metrics/metrics.json").read_text())
    assert set(metrics["accuracy"]) == set(tasks)
    for task in tasks:
        row = metrics["accuracy"][task]
        assert set(row) == {"pretrained", "expert", *MICRO_PARAMS["merge"]["methods"]}
        assert all(0.0 <= v <= 100.0 for v in row.values())
    # Even the micro experts must learn their tasks: a wrong head or broken fine-tuning fails here.
    average = metrics["average"]
    assert average["expert"] > average["pretrained"] + 5, average
    assert (micro_project / "metrics/accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| task_arithmetic |" in (micro_project / "metrics/results.md").read_text()
    for task in tasks:
        expert_dir = micro_project / f"data/experts/{task}"
        manifest = json.loads((expert_dir / "manifest.json").read_text())
        assert manifest["class_names"] == MICRO_CLASS_NAMES[task]
        for record in manifest["files"]:
            assert record["sha256"] == sha256_file(expert_dir / record["path"])

    # A second repro is a no-op.
    second = run(DVC + ["repro"], micro_project)
    assert ran_stages(second.stdout) == set()

    # Changing alphas reruns selection (the other methods' scores come from its cache) and what follows.
    merged = {m: (micro_project / f"data/merged/{m}.safetensors").read_bytes() for m in ("weight_averaging", "task_arithmetic", "cat")}
    params = yaml.safe_load((micro_project / "params.yaml").read_text())
    params["task_arithmetic"]["alpha"] = 0.5
    params["cat"]["alpha"] = 0.5
    write_params(micro_project / "params.yaml", params)
    third = run(DVC + ["repro"], micro_project)
    assert ran_stages(third.stdout) == DOWNSTREAM
    assert "select: 2 candidates evaluated, 13 from the cache" in third.stdout
    # weight averaging does not depend on either alpha: same bytes; Task Arithmetic and CAT do
    assert (micro_project / "data/merged/weight_averaging.safetensors").read_bytes() == merged["weight_averaging"]
    for method in ("task_arithmetic", "cat"):
        assert (micro_project / f"data/merged/{method}.safetensors").read_bytes() != merged[method]

    # CAT's bases params make stale only what reads them (not the features), asked of `dvc status`
    # (cheap). Then, in one repro: the features params rerun every task's features (and nothing
    # upstream of them), and a new task builds only its own stages; the shared stages follow.
    bases_before = (micro_project / "data/bases/mnist.safetensors").read_bytes()
    params["cat"]["c"] = 3
    write_params(micro_project / "params.yaml", params)
    stale = set(json.loads(run(DVC + ["status", "--json"], micro_project).stdout))
    assert stale == {"bases"} | DOWNSTREAM, stale
    params["cat"]["exemplars"] = 3
    params["tasks"] = params["tasks"] + ["mnist_parity"]
    write_params(micro_project / "params.yaml", params)
    fourth = run(DVC + ["repro"], micro_project)
    new = {f"{stage}@mnist_parity" for stage in PER_TASK_STAGES}
    assert ran_stages(fourth.stdout) == new | {f"features@{t}" for t in tasks} | {"bases"} | DOWNSTREAM
    assert (micro_project / "data/bases/mnist.safetensors").read_bytes() != bases_before
    metrics = json.loads((micro_project / "metrics/metrics.json").read_text())
    assert set(metrics["accuracy"]) == set(tasks) | {"mnist_parity"}
