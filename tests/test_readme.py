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
    """Both README examples, as written; only the architecture is the micro project's."""
    import catmerge
    from catmerge.io import WeightsFile

    readme = (ROOT / "README.md").read_text()
    example, streamed = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)[:2]
    monkeypatch.chdir(micro_project)
    scope: dict = {}
    written = [micro_project / name for name in ("cat.safetensors", "ta.safetensors", "cat-from-bases.safetensors")]
    try:
        exec(compile(example.replace("mini-vit-minilm", "micro-vit-minilm"), "README.md", "exec"), scope)  # noqa: S102
        theta0 = load_weights(micro_project / "data/pretrained/image_tower.safetensors")
        for merged in (scope["cat"], scope["tsv"]):
            assert set(merged) == set(theta0) and all(merged[k].dtype == v.dtype for k, v in theta0.items())
            assert any(not torch.equal(merged[k], v) for k, v in theta0.items())
        assert all(torch.equal(load_weights(written[0])[k], v) for k, v in scope["cat"].items())
        exec(compile(streamed, "README.md", "exec"), scope)  # noqa: S102
        # the streamed Task Arithmetic is what the in-memory call computes
        tvs = [load_weights(f"data/task_vectors/{t}.safetensors") for t in scope["params"].tasks]
        in_memory = catmerge.merge_method("task_arithmetic")(theta0, tvs, scope["params"].task_arithmetic)
        streamed_ta = load_weights(written[1])
        assert set(streamed_ta) == set(in_memory) and all(torch.equal(streamed_ta[k], v) for k, v in in_memory.items())
        # CAT from the bases stage's removals is the merge stage's model when the params agree
        assert set(WeightsFile(written[2]).specs) == set(theta0)
    finally:
        for path in written:
            path.unlink(missing_ok=True)
