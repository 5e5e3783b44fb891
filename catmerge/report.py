"""The report people read: reports/report.md and a self-contained reports/report.html (no scripts,
no CDN, images embedded), from the metrics, selection, decomposition and bases diagnostics files.

Each section is a list of blocks: ("h", title), ("p", text), ("table", header, rows) or
("figure", file name, caption); `to_markdown` and `to_html` render the same blocks.
"""

from __future__ import annotations

import base64
import html
import io
import statistics
from pathlib import Path

REFERENCE_ROWS = ("pretrained", "expert")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    # no timestamps or software tags: the same data gives the same bytes
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    _plt().close(fig)
    return buffer.getvalue()


def _fmt(value) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


# ---- sections -----------------------------------------------------------------------------------


def comparison(metrics: dict, selection: dict) -> tuple[list, dict]:
    per_task = metrics["accuracy"]
    tasks = list(per_task)
    rows = list(metrics["average"])
    methods = [r for r in rows if r not in REFERENCE_ROWS]
    wins = {m: sum(per_task[t][m] == max(per_task[t][n] for n in methods) for t in tasks) for m in methods}
    header = ["model", *tasks, "avg", "normalized avg", "tasks best", "chosen on val", "val avg"]
    table = []
    for r in rows:
        entry = selection["methods"].get(r, {})
        edges, limits = set(entry.get("at_grid_edge", [])), set(entry.get("at_param_limit", []))
        chosen = ", ".join(f"{k}={v}" + (" (grid edge)" if k in edges else " (its limit)" if k in limits else "")
                           for k, v in entry.get("chosen", {}).items())
        chosen = chosen or ("-" if r in REFERENCE_ROWS else "fixed")
        val = entry.get("average")
        table.append([r, *(_fmt(per_task[t][r]) for t in tasks), _fmt(metrics["average"][r]), _fmt(metrics["normalized_average"][r]),
                      str(wins[r]) if r in wins else "-", chosen, _fmt(val) if val is not None else "-"])
    best = max(methods, key=lambda m: metrics["average"][m])
    blocks = [
        ("h", "Comparison on the test splits"),
        ("p", (f"Top-1 accuracy (%) per task. Hyperparameters were chosen on the validation splits only; "
              f"normalized = merged / expert accuracy per task, averaged; 'tasks best' counts the tasks where "
              f"a method has the highest accuracy among the merges (ties count for each). A value marked "
              f"'grid edge' is the smallest or largest candidate: the grid may be too narrow; 'its limit' is a candidate "
              f"at the end of the param's allowed range (TIES k = 100, a scale of 0 or 1). Best average: {best}.")),
        ("table", header, table),
        ("figure", "accuracy.png", "Test accuracy per task and method."),
    ]
    return blocks, {"accuracy.png": accuracy_figure(metrics)}


def accuracy_figure(metrics: dict) -> bytes:
    plt = _plt()
    per_task = metrics["accuracy"]
    tasks = list(per_task) + ["average"]
    rows = list(metrics["average"])
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(1.4 * len(tasks) + 2, 4))
    for i, r in enumerate(rows):
        values = [per_task[t][r] for t in per_task] + [metrics["average"][r]]
        ax.bar([x + i * width for x in range(len(tasks))], values, width, label=r)
    ax.set_xticks([x + width * (len(rows) - 1) / 2 for x in range(len(tasks))], tasks, rotation=30, ha="right")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small", ncols=min(len(rows), 4), loc="upper center", bbox_to_anchor=(0.5, 1.2))
    fig.tight_layout()
    return _png(fig)


def sensitivity(selection: dict, curves: dict[str, list[tuple[float, float]]]) -> tuple[list, dict]:
    blocks = [("h", "Alpha sensitivity on validation")]
    if not curves:
        return blocks + [("p", "No method has an alpha grid in `select`.")], {}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    rows = []
    for method, curve in curves.items():
        alphas, values = zip(*curve)
        ax.plot(alphas, values, marker="o", label=method)
        chosen = selection["methods"][method]["params"]["alpha"]
        best = max(values)
        # how fast the curve falls away from its best: the mean loss over the grid
        rows.append([method, f"{chosen}", _fmt(best), _fmt(min(values)), _fmt(best - statistics.mean(values)), f"{min(alphas)}-{max(alphas)}"])
    ax.set_xlabel("alpha")
    ax.set_ylabel("validation average accuracy (%)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    blocks += [
        ("p", ("Best validation average at each alpha (over the method's other grid params). A flatter curve "
              "is less sensitive to alpha; 'mean loss' is the best value minus the mean over the grid.")),
        ("table", ["method", "chosen alpha", "best", "worst", "mean loss", "alpha range"], rows),
        ("figure", "alpha_sensitivity.png", "Validation average accuracy against alpha."),
    ]
    return blocks, {"alpha_sensitivity.png": _png(fig)}


def decomposition_section(decomposition: dict, cat_decomposition: dict | None = None) -> tuple[list, dict]:
    """Task Arithmetic's loss decomposition, and CAT's beside it (before and after trimming)."""
    blocks, figures = _decomposition_blocks(decomposition, "Task Arithmetic", "decomposition.png", "theta_0 + alpha T_k alone")
    if not cat_decomposition:
        return blocks, figures
    cat_blocks, cat_figures = _decomposition_blocks(
        cat_decomposition, "CAT Merging (trimmed vectors)", "decomposition_cat.png", "theta_0 + alpha * trimmed T_k alone"
    )
    before, after = decomposition["average"], cat_decomposition["average"]
    keys = ["expert", "solo", "merged", "dilution", "interference", *(f"interference_{f}" for f in ("linear", "norm_scale", "shift", "other"))]
    rows = [[k.replace("interference_", "back without others' "), _fmt(before[k]), _fmt(after[k]), _fmt(after[k] - before[k])] for k in keys]
    cat_blocks[1:1] = [
        ("p", ("Averages over tasks, before (Task Arithmetic) and after CAT's trimming, each at its own chosen alpha. "
               "For CAT, solo is theta_0 + alpha * trimmed T_k, so what trimming takes from task k's own vector counts as "
               "dilution, and 'back without others' linear' is the linear-weight interference CAT left.")),
        ("table", ["average", "Task Arithmetic", "CAT", "CAT - TA"], rows),
    ]
    return blocks + cat_blocks, {**figures, **cat_figures}


def _decomposition_blocks(decomposition: dict, name: str, figure: str, solo: str) -> tuple[list, dict]:
    families = ["linear", "norm_scale", "shift", "other"]
    per_task = decomposition["tasks"]
    header = ["task", "expert", "solo", "merged", "dilution", "interference", *(f"back without others' {f}" for f in families)]
    rows = [[t, *(_fmt(r[k]) for k in ("expert", "solo", "merged", "dilution", "interference")),
             *(_fmt(r[f"interference_{f}"]) for f in families)] for t, r in {**per_task, "average": decomposition["average"]}.items()]
    plt = _plt()
    tasks = list(per_task)
    fig, ax = plt.subplots(figsize=(1.3 * len(tasks) + 2, 4))
    keys = ["dilution", "interference", *(f"interference_{f}" for f in families)]
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        ax.bar([x + i * width for x in range(len(tasks))], [per_task[t][key] for t in tasks], width, label=key.replace("interference_", "without others' "))
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks([x + width * (len(keys) - 1) / 2 for x in range(len(tasks))], tasks, rotation=30, ha="right")
    ax.set_ylabel("accuracy points")
    ax.legend(fontsize="x-small", ncols=3)
    fig.tight_layout()
    blocks = [
        ("h", f"Where the loss comes from: {name}"),
        ("p", (f"{name} at alpha {decomposition['alpha']}, {decomposition['split']} split, per task k. "
              f"solo: {solo}; dilution = expert - solo; interference = solo - merged. "
              "'back without others' f': accuracy regained when the other tasks' deltas are removed from "
              "parameter family f only (linear weights, norm scales, shifts, other).")),
        ("table", header, rows),
        ("figure", figure, f"{name}: dilution, interference and the interference each family carries, per task."),
    ]
    return blocks, {figure: _png(fig)}


def conflict_section(diagnostics: dict, tasks: list[str], bases_params: dict, chosen: dict) -> tuple[list, dict]:
    linear = {name: entry for name, entry in diagnostics.items() if "pairs" in next(iter(entry.values()))}
    blocks = [("h", "CAT conflict diagnostics (bases stage)")]
    if not linear:
        return blocks + [("p", "No linear-weight diagnostics in data/bases/diagnostics.json.")], {}
    import numpy as np

    plt = _plt()
    layers = list(linear)
    pairs = [(k, i) for k in tasks for i in tasks if i != k]
    figures = {}
    summary = {}
    for term, title in (("conflict", "task k's feature shift caused by T_i, share removed"),
                        ("own", "task i's own signal, share removed")):
        grid = np.array([[_share(linear[layer][k]["pairs"][i], term) for k, i in pairs] for layer in layers])
        fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(pairs) + 3), 0.28 * len(layers) + 3))
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(pairs)), [f"{k} <- {i}" for k, i in pairs], rotation=90, fontsize=6)
        ax.set_yticks(range(len(layers)), [_short(n) for n in layers], fontsize=6)
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.03)
        fig.tight_layout()
        figures[f"{term}_heatmap.png"] = _png(fig)
        totals = {(k, i): sum(linear[layer][k]["pairs"][i][term] for layer in layers) for k, i in pairs}
        removed = {(k, i): sum(linear[layer][k]["pairs"][i][f"{term}_removed"] for layer in layers) for k, i in pairs}
        summary[term] = {p: removed[p] / totals[p] if totals[p] > 0 else 0.0 for p in pairs}
    rows = [[f"{k} <- {i}", f"{100 * summary['conflict'][(k, i)]:.1f}", f"{100 * summary['own'][(k, i)]:.1f}"] for k, i in pairs]
    fig, ax = plt.subplots(figsize=(max(7, 0.22 * len(layers) + 2), 4.5))
    for t, task in enumerate(tasks):
        for j, layer in enumerate(layers):
            kept = linear[layer][task]["kept"]
            ax.scatter([j + (t - len(tasks) / 2) * 0.06] * len(kept), kept, s=10, color=f"C{t}", label=task if j == 0 else None)
    ax.set_yscale("symlog", linthresh=1e-6)
    ax.set_xticks(range(len(layers)), [_short(n) for n in layers], rotation=90, fontsize=6)
    ax.set_ylabel("kept eigenvalue of G_k")
    ax.legend(fontsize="x-small", ncols=4)
    fig.tight_layout()
    figures["kept_eigenvalues.png"] = _png(fig)
    blocks += [
        ("p", ("For each linear weight and ordered task pair k <- i, the two terms of Eq. 10: "
               "||X_k T_i^T||^2 (the shift T_i causes in task k's features) and ||X_i T_i^T||^2 (task i's own "
               "signal), and the share of each that lies along task k's removal basis B_k: what task k's trim "
               "takes out of T_i. The merge also applies the other tasks' bases to T_i and, with rescale, "
               "scales it back to its norm, so these shares describe each basis, not the whole trim. Good "
               "bases remove much of the first and little of the second.")),
        ("p", (f"Computed by the bases stage with {_params_text(bases_params)}; the CAT model in the comparison "
               f"used {_params_text(chosen)}.")),
        ("figure", "conflict_heatmap.png", "Share of the conflict term removed, per layer (rows) and pair (columns)."),
        ("figure", "own_heatmap.png", "Share of task i's own signal removed, per layer and pair."),
        ("table", ["pair k <- i", "conflict removed % (all layers)", "own signal removed % (all layers)"], rows),
        ("figure", "kept_eigenvalues.png", "Kept eigenvalues of G_k per linear weight and task."),
    ]
    return blocks, figures


def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "the defaults"


def _share(values: dict, term: str) -> float:
    return values[f"{term}_removed"] / values[term] if values[term] > 0 else 0.0


def _short(name: str) -> str:
    return name.replace("transformer.resblocks.", "b").replace("_weight", "").replace(".weight", "")


def provenance(params: dict, hashes: dict[str, str]) -> list:
    import yaml

    return [
        ("h", "Made from"),
        ("p", "Params (params.yaml, validated, defaults filled in):"),
        ("code", yaml.safe_dump(params, sort_keys=False)),
        ("table", ["artifact", "sha256"], [[path, digest] for path, digest in hashes.items()]),
    ]


# ---- rendering ----------------------------------------------------------------------------------


def to_markdown(title: str, blocks: list, figure_dir: str) -> str:
    out = [f"# {title}", ""]
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out += [f"## {block[1]}", ""]
        elif kind == "p":
            out += [block[1], ""]
        elif kind == "code":
            out += ["```yaml", block[1].rstrip(), "```", ""]
        elif kind == "table":
            out += ["| " + " | ".join(block[1]) + " |", "|" + "---|" * len(block[1])]
            out += ["| " + " | ".join(row) + " |" for row in block[2]] + [""]
        elif kind == "figure":
            out += [f"![{block[2]}]({figure_dir}/{block[1]})", ""]
    return "\n".join(out)


STYLE = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f2f2f2}img{max-width:100%}
figure{margin:1em 0}figcaption{font-size:13px;color:#555}pre{background:#f7f7f7;padding:1em;font-size:12px;overflow:auto}"""


def to_html(title: str, blocks: list, figures: dict[str, bytes]) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
           f"<style>{STYLE}</style></head><body>", f"<h1>{e(title)}</h1>"]
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append(f"<h2>{e(block[1])}</h2>")
        elif kind == "p":
            out.append(f"<p>{e(block[1])}</p>")
        elif kind == "code":
            out.append(f"<pre>{e(block[1])}</pre>")
        elif kind == "table":
            out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in block[1]) + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block[2]]
            out.append("</tbody></table>")
        elif kind == "figure":
            data = base64.b64encode(figures[block[1]]).decode()
            out.append(f'<figure><img alt="{e(block[2])}" src="data:image/png;base64,{data}"><figcaption>{e(block[2])}</figcaption></figure>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(directory: Path, title: str, blocks: list, figures: dict[str, bytes]) -> None:
    from .io import atomic_dir

    with atomic_dir(directory) as out:
        (out / "figures").mkdir()
        for name, data in figures.items():
            (out / "figures" / name).write_bytes(data)
        (out / "report.md").write_text(to_markdown(title, blocks, "figures"))
        (out / "report.html").write_text(to_html(title, blocks, figures))
