"""Stage `select` (validation only, cached), the loss decomposition and the report, on the micro benchmark."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import MICRO_PARAMS, ROOT, run, write_params

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def project_copy(micro_project, tmp_path_factory) -> Path:
    """A copy of the built micro project (its own params and select cache) without any test split."""
    copy = tmp_path_factory.mktemp("select") / "project"
    shutil.copytree(micro_project, copy, ignore=shutil.ignore_patterns(".dvc", ".git"))
    for test_split in (copy / "data/datasets").glob("*/test.parquet"):
        test_split.unlink()
    # nothing that test accuracy went into either
    for path in ("data/select_cache", "data/merged", "metrics", "reports"):
        shutil.rmtree(copy / path)
    return copy


def run_select(project: Path) -> str:
    return run([sys.executable, "-m", "stages.select"], project).stdout


def test_selection_never_reads_a_test_split(micro_project, project_copy):
    # Every test split is gone and the cache is empty: each candidate is scored again, from val only.
    output = run_select(project_copy)
    candidates = 1 + 1 + 4 + 1 + 1 + 2 + 1 + 1 + 1 + 1 + 1  # weight averaging, TA, ties 2x2, regmean, regmean++, pcb 2, tsv_m, iso_c, iso_cts, wudi, cat
    assert f"select: {candidates} candidates evaluated, 0 from the cache" in output
    assert json.loads((project_copy / "metrics/selection.json").read_text()) == json.loads(
        (micro_project / "metrics/selection.json").read_text()
    )
    assert not (project_copy / "data/merged").exists()


def test_a_grid_extended_by_one_value_costs_one_evaluation(project_copy):
    run_select(project_copy)  # (cache filled by the test above, or here)
    params = yaml.safe_load((project_copy / "params.yaml").read_text())
    params["select"]["pcb"]["alpha"].append(1.5)
    write_params(project_copy / "params.yaml", params)
    output = run_select(project_copy)
    assert "select: 1 candidates evaluated, 15 from the cache" in output
    selection = json.loads((project_copy / "metrics/selection.json").read_text())
    pcb = selection["methods"]["pcb"]
    assert [row["point"] for row in pcb["candidates"]] == [{"alpha": 0.5}, {"alpha": 1.0}, {"alpha": 1.5}]
    best = max(row["average"] for row in pcb["candidates"])
    assert pcb["average"] == best and pcb["params"]["alpha"] == pcb["chosen"]["alpha"]
    assert pcb["at_grid_edge"] == (["alpha"] if pcb["chosen"]["alpha"] in (0.5, 1.5) else [])


def test_a_choice_at_the_params_own_limit_is_not_a_grid_edge(project_copy):
    # TIES k = 100 (keep everything) cannot be widened past; k = 40 at the bottom of [40, 100] can.
    original = (project_copy / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["select"]["ties"] = {"k": [40, 100], "alpha": [0.5, 1.0]}
    write_params(project_copy / "params.yaml", params)
    try:
        output = run_select(project_copy)
    finally:
        (project_copy / "params.yaml").write_text(original)
    ties = json.loads((project_copy / "metrics/selection.json").read_text())["methods"]["ties"]
    if ties["chosen"]["k"] == 100:
        assert "k" in ties["at_param_limit"] and "k" not in ties["at_grid_edge"]
        assert "at the param's limit: k" in output
    else:
        assert "k" in ties["at_grid_edge"] and "k" not in ties["at_param_limit"]
    assert ("alpha" in ties["at_grid_edge"]) and ties["at_param_limit"] in (["k"], [])  # alpha has no upper limit


def test_a_cat_grid_over_c_recomputes_removals_for_other_values(project_copy):
    from catmerge.io import read_metadata

    before = json.loads((project_copy / "metrics/selection.json").read_text())["methods"]["cat"]
    params = yaml.safe_load((project_copy / "params.yaml").read_text())
    params["select"]["cat"] = {"c": [1, params["cat"]["c"]]}
    write_params(project_copy / "params.yaml", params)
    output = run_select(project_copy)
    assert re.search(r"select: 1 candidates evaluated, \d+ from the cache", output)  # c = 1 is new; c = 2 is cached
    cat = json.loads((project_copy / "metrics/selection.json").read_text())["methods"]["cat"]
    scores = {row["point"]["c"]: row["scores"] for row in cat["candidates"]}
    assert scores[params["cat"]["c"]] == before["candidates"][0]["scores"]
    run([sys.executable, "-m", "stages.merge"], project_copy)
    recorded = json.loads(read_metadata(project_copy / "data/merged/cat.safetensors")["params"])
    assert recorded["c"] == cat["chosen"]["c"] and recorded == cat["params"]

    from catmerge.params import load_params, with_params
    from catmerge.workspace import Workspace

    workspace = Workspace(load_params(project_copy / "params.yaml"), project_copy)
    stored = workspace.removals(workspace.params.cat)[1]  # the bases stage's own (c = 2)
    recomputed = workspace.removals(with_params(workspace.params.cat, {"c": 1}))[1]
    bases = [(name, k) for name, rs in stored.items() for k, r in enumerate(rs) if r.basis is not None]
    assert bases and all(recomputed[name][k].basis.shape[1] <= 1 for name, k in bases)
    assert any(stored[name][k].basis.shape[1] == 2 for name, k in bases)
    for name, k in bases:  # c = 1 keeps the first direction of c = 2 (same G_k, same order and signs)
        if recomputed[name][k].basis.shape[1] == 1:
            torch.testing.assert_close(recomputed[name][k].basis[:, 0], stored[name][k].basis[:, 0], rtol=1e-6, atol=1e-8)


def test_merge_uses_the_chosen_params_and_evaluate_decomposes_task_arithmetic(micro_project):
    from catmerge.io import read_metadata

    selection = json.loads((micro_project / "metrics/selection.json").read_text())
    for method, entry in selection["methods"].items():
        recorded = json.loads(read_metadata(micro_project / f"data/merged/{method}.safetensors")["params"])
        assert recorded == entry["params"]
        assert entry["average"] == max(row["average"] for row in entry["candidates"])
    # the model merge built is the one select scored: the same validation accuracy, task by task
    from catmerge.io import load_weights
    from catmerge.params import load_params
    from catmerge.workspace import Workspace

    workspace = Workspace(load_params(micro_project / "params.yaml"), micro_project)
    for method in ("ties", "regmean", "tsv_m", "iso_cts", "cat"):
        chosen = next(r for r in selection["methods"][method]["candidates"] if r["point"] == selection["methods"][method]["chosen"])
        assert workspace.score(load_weights(micro_project / f"data/merged/{method}.safetensors"), "val") == chosen["scores"]
    metrics = json.loads((micro_project / "metrics/metrics.json").read_text())
    decomposition = json.loads((micro_project / "metrics/decomposition.json").read_text())
    assert decomposition["alpha"] == MICRO_PARAMS["task_arithmetic"]["alpha"]
    for task, row in decomposition["tasks"].items():
        # the decomposition's merged model is the Task Arithmetic model evaluate scored
        assert row["merged"] == metrics["accuracy"][task]["task_arithmetic"]
        assert row["expert"] == metrics["accuracy"][task]["expert"]
        assert row["dilution"] + row["interference"] == pytest.approx(row["expert"] - row["merged"])
        assert set(row) >= {f"interference_{f}" for f in ("linear", "norm_scale", "shift", "other")}
    # CAT's decomposition: its merged rows are the CAT model evaluate scored, at CAT's chosen alpha,
    # and its solo row is theta_0 + alpha * trimmed T_k (scored here again)
    from catmerge import cat
    from catmerge.selection import chosen_params
    from catmerge.task_vectors import apply_task_vector

    after = json.loads((micro_project / "metrics/decomposition_cat.json").read_text())
    cat_params = chosen_params(workspace.params, selection, "cat")
    assert after["alpha"] == cat_params.alpha
    pieces, by_piece = workspace.removals(cat_params)
    trimmed = cat.trimmed_vectors(pieces, workspace.task_vectors, by_piece, cat_params.rescale)
    # the CAT file evaluate scored is theta_0 + alpha * sum of these trimmed vectors, bit for bit
    from catmerge.task_vectors import sum_task_vectors

    rebuilt = apply_task_vector(workspace.pretrained, sum_task_vectors(trimmed), cat_params.alpha)
    merged_file = load_weights(micro_project / "data/merged/cat.safetensors")
    assert all(torch.equal(merged_file[key], rebuilt[key]) for key in rebuilt)
    for k, (task, row) in enumerate(after["tasks"].items()):
        assert row["merged"] == metrics["accuracy"][task]["cat"]
        assert row["solo"] == workspace.score(apply_task_vector(workspace.pretrained, trimmed[k], cat_params.alpha), "test", [task])[task]


def test_select_stage_deps_cover_the_code_scores_depend_on():
    from catmerge.selection import SCORING_CODE

    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["select"]["deps"]
    assert "catmerge/merging" in deps
    def covered(path: str) -> bool:
        return any(path == dep or path.startswith(dep + "/") for dep in deps)

    assert [name for name in SCORING_CODE if not covered(f"catmerge/{name}")] == []


def test_alpha_curves_are_dvc_plots(micro_project):
    proc = run([sys.executable, "-m", "dvc", "plots", "show", "--json"], micro_project)
    plots = json.loads(proc.stdout)["data"]
    for method in ("ties", "pcb"):  # the micro params have alpha grids for these two
        values = plots[f"metrics/alpha_curves/{method}.csv"][0]["content"]["data"]["values"]
        assert [float(v["alpha"]) for v in values] == [0.5, 1.0]
        assert all(0.0 <= float(v["val_average"]) <= 100.0 for v in values)


def test_report_has_every_task_and_method_and_renders_in_chromium(micro_project, tmp_path):
    report_md = (micro_project / "reports/report.md").read_text()
    report_html = (micro_project / "reports/report.html").read_text()
    rows = [line for line in report_md.splitlines() if line.startswith("| ")]
    header = rows[0]
    for task in MICRO_PARAMS["tasks"]:
        assert f" {task} |" in header
    for row_name in ["pretrained", "expert", *MICRO_PARAMS["merge"]["methods"]]:
        assert any(line.startswith(f"| {row_name} |") for line in rows), row_name
    for section in ("Alpha sensitivity", "Where the loss comes from: Task Arithmetic", "Where the loss comes from: CAT Merging",
                    "CAT conflict diagnostics", "Made from"):
        assert f"## {section}" in report_md and section in report_html
    assert "data/merged/cat.safetensors" in report_md  # artifact hashes
    # self-contained: every image inline, nothing fetched, no scripts
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", report_html) and "<script" not in report_html
    images = re.findall(r'<img [^>]*src="data:image/png;base64,', report_html)
    assert len(images) == len(list((micro_project / "reports/figures").glob("*.png"))) >= 5

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "headless Chromium is needed (make test installs Debian's chromium)"
    # A copy of the page with a probe that records, after load, what the browser actually decoded.
    probe = """<script>window.addEventListener('load', () => {
      const imgs = [...document.images];
      document.body.setAttribute('data-probe', JSON.stringify({
        images: imgs.length, decoded: imgs.filter(i => i.complete && i.naturalWidth > 100).length,
        tables: document.querySelectorAll('table').length, rows: document.querySelectorAll('tr').length,
        title: document.querySelector('h1').textContent}));});</script>"""
    page = tmp_path / "report.html"
    page.write_text(report_html.replace("</body>", probe + "</body>"))
    proc = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
                           "--dump-dom", page.as_uri()], check=False, capture_output=True, text=True, timeout=120)
    found = re.search(r"data-probe=\"([^\"]+)\"", proc.stdout)
    assert found, proc.stderr[-2000:]
    probe_result = json.loads(found.group(1).replace("&quot;", '"'))
    assert probe_result["images"] == len(images) and probe_result["decoded"] == len(images)
    assert probe_result["tables"] >= 4 and probe_result["rows"] > 2 + len(MICRO_PARAMS["merge"]["methods"])
    assert probe_result["title"].startswith("catmerge report")
