"""Stage `select`: each method's hyperparameters chosen on the validation splits.

Scores every candidate of `select.<method>` on validation (cached in data/select_cache, so a grid
extended by one value costs one evaluation), writes the choice and every score to
metrics/selection.json and one alpha-sensitivity curve per method to metrics/alpha_curves/.
Never reads a test split (catmerge/selection.py).
"""

from catmerge.cli import run_stage
from catmerge.io import atomic_dir, remove_orphaned_temps, write_json
from catmerge.layout import ALPHA_CURVES, SELECT_CACHE, SELECTION
from catmerge.params import load_params
from catmerge.selection import alpha_curve, select
from catmerge.workspace import Workspace


def main() -> None:
    params = load_params()
    SELECT_CACHE.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temps(SELECT_CACHE)  # a persistent output: a killed run's temporaries would stay in it
    selection = select(Workspace(params), SELECT_CACHE)
    write_json(selection, SELECTION)
    with atomic_dir(ALPHA_CURVES) as out:
        for method, entry in selection["methods"].items():
            curve = alpha_curve(entry)
            if curve:
                lines = ["alpha,val_average"] + [f"{alpha},{average:.4f}" for alpha, average in curve]
                (out / f"{method}.csv").write_text("\n".join(lines) + "\n")
    for method, entry in selection["methods"].items():
        edge = f" (at the grid edge: {', '.join(entry['at_grid_edge'])})" if entry["at_grid_edge"] else ""
        edge += f" (at the param's limit: {', '.join(entry['at_param_limit'])})" if entry["at_param_limit"] else ""
        print(f"{method}: chose {entry['chosen'] or '(fixed params)'}, val average {entry['average']:.2f}{edge}")


if __name__ == "__main__":
    run_stage("select", main)
