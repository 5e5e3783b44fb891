"""Stage `report`: reports/report.md and a self-contained reports/report.html (catmerge/report.py)
from the evaluate, select and bases outputs, with the params and artifact hashes they came from."""

from catmerge import report
from catmerge.cli import run_stage
from catmerge.io import read_json, sha256_file, verify_manifest
from catmerge.layout import (
    BASES_DIR,
    DECOMPOSITION,
    DECOMPOSITION_CAT,
    METRICS_DIR,
    PRETRAINED_TOWER,
    REPORTS_DIR,
    SELECTION,
    expert_dir,
    features_path,
    merged_path,
    task_vector_path,
)
from catmerge.params import load_params
from catmerge.selection import alpha_curve, read_selection


def main() -> None:
    params = load_params()
    metrics = read_json(METRICS_DIR / "metrics.json")
    selection = read_selection(params)
    curves = {m: c for m, e in selection["methods"].items() if (c := alpha_curve(e))}
    blocks, figures = report.comparison(metrics, selection)
    conflicts = ([], {})
    if "cat" in params.merge.methods:
        bases_params = verify_manifest(BASES_DIR, only=["diagnostics.json"])["params"]  # vouches for what is read next
        diagnostics = read_json(BASES_DIR / "diagnostics.json")
        conflicts = report.conflict_section(diagnostics, params.tasks, bases_params, selection["methods"]["cat"]["params"])
    for section in (
        report.sensitivity(selection, curves),
        report.decomposition_section(read_json(DECOMPOSITION), read_json(DECOMPOSITION_CAT)),
        conflicts,
    ):
        blocks += section[0]
        figures.update(section[1])
    artifacts = [
        PRETRAINED_TOWER,
        *(task_vector_path(t) for t in params.tasks),
        *(features_path(t) for t in params.tasks),
        *(expert_dir(t) / "head.safetensors" for t in params.tasks),
        BASES_DIR / "manifest.json",
        BASES_DIR / "diagnostics.json",
        SELECTION,
        *(merged_path(m) for m in params.merge.methods),
        METRICS_DIR / "metrics.json",
        DECOMPOSITION,
        DECOMPOSITION_CAT,
    ]
    hashes = {str(path): sha256_file(path) for path in artifacts}
    blocks += report.provenance(params.model_dump(by_alias=True), hashes)
    report.write_report(REPORTS_DIR, f"catmerge report: {len(params.tasks)} tasks, {params.model}", blocks, figures)
    print(f"wrote {REPORTS_DIR}/report.md and report.html ({len(figures)} figures)")


if __name__ == "__main__":
    run_stage("report", main)
