"""The README's two commands are real: CI runs the README's test command, the Makefile defines both."""

from __future__ import annotations

import re

import torch

from catmerge.io import load_weights
from conftest import ROOT


def code_lines(markdown: str) -> list[str]:
    blocks = re.findall(r"```[a-z]*\n(.*?)```", markdown, flags=re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def make_target(makefile: str, target: str) -> str:
    match = re.search(rf"^{target}:.*?\n((?:\t.*\n?)*)", makefile, flags=re.MULTILINE)
    assert match, f"Makefile has no target {target}"
    return match.group(1)


def test_readme_shows_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    lines = code_lines(readme)
    assert "make demo" in lines and "make test" in lines
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert "make test" in ci
    assert all(line.startswith(("set ", "cd ", "make test")) for line in ci), ci


def test_make_targets_install_from_the_lock_and_run_the_pipeline_and_pytest():
    """`make demo` / `make test` install the committed lock (with the torch pair that imports on CPU)."""
    makefile = (ROOT / "Makefile").read_text()
    assert "-r requirements.lock" in makefile
    assert "dvc repro" in make_target(makefile, "demo")
    assert "pytest" in make_target(makefile, "test")
    assert "HF_HUB_OFFLINE := 1" in makefile and "DVC_NO_ANALYTICS := 1" in makefile
    lock = (ROOT / "requirements.lock").read_text()
    assert "torch==2.14.1" in lock and "torchvision==0.29.1" in lock


def test_dvc_analytics_are_off_in_the_committed_config():
    assert re.search(r"analytics\s*=\s*false", (ROOT / ".dvc/config").read_text())


def test_readme_library_example_runs(micro_project, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    example, streamed = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)[:2]
    monkeypatch.chdir(micro_project)
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)  # noqa: S102 -- running the README example is the test
    assert set(scope["averaged"]) == set(scope["theta0"]) == set(scope["cat_merged"])
    # the large-model variant writes, tensor by tensor, what the in-memory call computes
    in_memory = scope["merge_method"]("task_arithmetic")(scope["theta0"], scope["tvs"], scope["params"].merge)
    try:
        exec(compile(streamed, "README.md", "exec"), scope)  # noqa: S102
        written = load_weights(micro_project / "ta.safetensors")
    finally:
        (micro_project / "ta.safetensors").unlink(missing_ok=True)
    assert set(written) == set(in_memory) and all(torch.equal(written[k], v) for k, v in in_memory.items())
