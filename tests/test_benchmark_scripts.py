"""Every script in benchmarks/ runs end to end at a tiny size, offline, so none can rot unseen.

Each runnable script has one tiny command line in TINY (a script added to benchmarks/ without one
fails `test_every_script_has_a_tiny_run`); it runs as a subprocess, must exit 0 and write JSON
with the expected top-level keys. The scripts that read a built project run on a copy of the
session's micro build (conftest's `project` fixture) and must leave it as they found it;
scale.py builds its own synthetic project through the pipeline's stages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

BENCHMARKS = ROOT / "benchmarks"
# Modules in benchmarks/ that are not scripts: imported by the scripts, exercised through them.
HELPERS = {"built_project.py"}


@dataclass(frozen=True)
class Tiny:
    args: tuple[str, ...]  # after the script; {project}, {out} and {tmp} are filled in
    keys: frozenset[str]  # top-level keys of the JSON it writes
    needs_project: bool = True  # reads a built project (a copy of the micro build)
    out: str = "out.json"  # where that JSON lands, under the test's tmp_path


TINY = {
    "alpha_grid.py": Tiny(("--project", "{project}", "--alphas", "0.3", "--out", "{out}"),
                          frozenset({"params", "pretrained", "weight_averaging", "task_arithmetic", "cat", "summary"})),
    "cat_ablation.py": Tiny(("--project", "{project}", "--alphas", "0.3", "--out", "{out}", "c=1"),
                            frozenset({"project_params", "val_average"})),
    "fidelity.py": Tiny(("--group", "tiny", "--project", "s0={project}", "--max-settings", "2", "--alphas", "0.3",
                         "--cache", "{tmp}/fidelity-cache", "--out", "{out}"), frozenset({"group", "alphas", "runs"})),
    "fidelity_variants.sh": Tiny(("--seeds", "1", "{tmp}/variants", "{project}", "cat.c=1"), frozenset({"projects"}),
                                 out="variants/variants.json"),
    "faithfulness.py": Tiny(("--run", "tiny={project}", "--out", "{out}"), frozenset({"runs", "criteria", "reported"})),
    "methods_table.py": Tiny(("--run", "tiny={project}", "--out", "{out}"), frozenset({"tiny"})),
    "regime.py": Tiny(("--run", "tiny={project}", "--alphas", "0.3", "--out", "{out}"), frozenset({"tiny"})),
    "scale.py": Tiny(("--arch", "micro-clip", "--tasks", "2", "--set", "wudi.iterations=5", "--skip-select", "--workdir", "{tmp}/scale", "--keep", "--out", "{out}"),
                     frozenset({"machine", "command", "code", "rows"}), needs_project=False),
}


def test_every_script_has_a_tiny_run():
    found = {p.name for p in BENCHMARKS.iterdir() if p.is_file() and p.suffix in (".py", ".sh")}
    assert found == set(TINY) | HELPERS, "a script in benchmarks/ needs a tiny command line in TINY (or is gone)"
    for helper in HELPERS:
        assert '__name__ == "__main__"' not in (BENCHMARKS / helper).read_text(), f"{helper} became a script: give it a TINY entry"


def files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def script_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHON=sys.executable, HF_HOME=str(tmp / ".hf"), PREFECT_HOME=str(tmp / "prefect"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # dvc and python for the .sh
    env.pop("PREFECT_API_URL", None)  # a temporary local Prefect server, never one configured elsewhere
    return env


def run_tiny(script: str, tmp_path: Path, project: Path | None = None) -> dict:
    """Run `script`'s tiny command line; the JSON it wrote, once it exited 0 with the expected keys."""
    tiny = TINY[script]
    fill = {"project": str(project), "out": str(tmp_path / tiny.out), "tmp": str(tmp_path)}
    command = ["bash" if script.endswith(".sh") else sys.executable, str(BENCHMARKS / script), *(a.format(**fill) for a in tiny.args)]
    proc = subprocess.run(command, cwd=tmp_path, env=script_env(tmp_path), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"{' '.join(command)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    result = json.loads((tmp_path / tiny.out).read_text())
    assert set(result) == tiny.keys
    return result


@pytest.mark.parametrize("script", sorted(s for s, tiny in TINY.items() if tiny.needs_project))
def test_script_on_a_built_project(script, project, tmp_path):
    before = files(project)
    result = run_tiny(script, tmp_path, project)
    assert files(project) == before, f"{script} changed the project it read"
    if script == "faithfulness.py":  # every criterion, judged or marked not measured, from the micro build's metrics
        assert [c["number"] for c in result["criteria"]] == ["1", "2a", "2b", "3a", "3b", "4a", "4b", "5a", "5b", "5c", "5d"]
        assert all(c["passed"] in (True, False, None) and c["measured"] for c in result["criteria"])
        assert result["criteria"][0]["passed"] is False  # the micro build has fewer than 8 tasks
    if script == "fidelity_variants.sh":  # a copy with the param changed, rebuilt up to the bases
        (built,) = result["projects"]
        params = yaml.safe_load((Path(built["dir"]) / "params.yaml").read_text())
        assert params["cat"]["c"] == 1 and built["seconds"] is not None and (Path(built["dir"]) / ".built").is_file()


@pytest.mark.parametrize("script", sorted(s for s, tiny in TINY.items() if not tiny.needs_project))
def test_script_on_its_own(script, tmp_path):
    result = run_tiny(script, tmp_path)
    if script == "scale.py":
        check_scale(result, tmp_path / "scale" / "micro-clip-k2")


def check_scale(result: dict, project: Path) -> None:
    """Every stage timed, the merge once per method of the registry (found, not listed), and the
    synthetic project is what the stages make: each artifact is vouched for by its manifest, as the
    next stage would check it."""
    from catmerge import layout
    from catmerge.merging import METHOD_NAMES

    (row,) = result["rows"]
    assert row["methods"] == list(METHOD_NAMES) and row["failed"] == []
    assert "partial" not in row  # the finished row replaced the partial ones saved after each method
    for stage in ("task_vectors", "features", "bases", *(f"merge_{m}" for m in METHOD_NAMES)):
        assert row[stage]["seconds"] > 0 and row[stage]["peak_rss_mb"] > 0, stage
    assert set(row["merge_seconds_over_task_arithmetic"]) == set(METHOD_NAMES)
    assert row["merge_params"]["wudi"]["iterations"] == 5  # --set
    assert row["select"].startswith("skipped")  # --skip-select: merge read the choice it wrote
    assert row["train_images_per_task"] == 4  # 6 written, 2 carved off for validation
    for method in ("regmean", "regmean_plusplus"):
        if method in METHOD_NAMES:  # they read the whole train split as exemplars
            assert row["exemplars"][method] == row["merge_params"][method]["exemplars"] == 4
    tasks = ["sun397", "stanford-cars"]
    layout.checked_pretrained(root=project)
    for task in tasks:
        layout.checked_dataset_info(task, root=project)
        for split in ("train", "val", "test"):
            layout.checked_split(task, split, root=project)
        for name in ("expert.safetensors", "head.safetensors"):
            layout.checked_expert(task, name, root=project)
        layout.checked_task_vector(task, root=project)
        layout.checked_features(task, root=project)
    layout.checked_merged(METHOD_NAMES[-1], root=project)  # the last merge run: the last method alone


@pytest.mark.parametrize(("args", "message"), [(("--methods", "nope"), "--methods: unknown ['nope']"),
                                              (("--set", "nope.alpha=1"), "--set 'nope.alpha=1': expected METHOD.PARAM=VALUE"),
                                              (("--set", "wudi.iterations"), "--set 'wudi.iterations': expected METHOD.PARAM=VALUE")])
def test_scale_refuses_an_unknown_method_or_override(tmp_path, args, message):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "scale.py"), "--arch", "micro-clip", "--tasks", "2", *args,
                           "--out", str(tmp_path / "out.json")], cwd=tmp_path, env=script_env(tmp_path), capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "out.json").exists()


def test_scale_skip_select_writes_a_choice_merge_accepts(tmp_path):
    """--skip-select's metrics/selection.json passes merge's check for every method (no grid), and
    stops passing once a method has a grid, as select's own would."""
    import importlib.util

    from catmerge.io import ArtifactError
    from catmerge.merging import METHOD_NAMES
    from catmerge.params import load_params, method_params
    from catmerge.selection import chosen_params, read_selection

    spec = importlib.util.spec_from_file_location("scale_script", BENCHMARKS / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    scale.write_choice_without_scoring(tmp_path, list(METHOD_NAMES))
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["merge"]["methods"], raw["select"] = list(METHOD_NAMES), {}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(tmp_path / "params.yaml")
    selection = read_selection(params, tmp_path / "metrics" / "selection.json")
    for method in METHOD_NAMES:
        chosen, block = chosen_params(params, selection, method), method_params(params, method)
        assert (chosen is None and block is None) or chosen.model_dump() == block.model_dump(), method  # the block as is
    raw["select"] = {"task_arithmetic": {"alpha": [0.1, 0.2]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ArtifactError, match="chosen on the grid"):
        read_selection(load_params(tmp_path / "params.yaml"), tmp_path / "metrics" / "selection.json")
