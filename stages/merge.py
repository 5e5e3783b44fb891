"""Stage `merge`: one merged image tower per method in `merge.methods`, with the hyperparameters
the `select` stage chose on validation (a method without a grid uses its params block as is)."""

import json

from catmerge.cli import run_stage
from catmerge.io import read_json, save_weights
from catmerge.layout import SELECTION, merged_path
from catmerge.params import load_params
from catmerge.selection import chosen_params
from catmerge.workspace import Workspace


def main() -> None:
    params = load_params()
    selection = read_json(SELECTION)
    workspace = Workspace(params)
    for method in params.merge.methods:
        method_params = chosen_params(params, selection, method)
        merged = workspace.merged(method, method_params, keep_vector=False)  # computed as it is written
        recorded = method_params.model_dump(by_alias=True) if method_params is not None else {}
        meta = {"method": method, "tasks": ",".join(params.tasks), "params": json.dumps(recorded, sort_keys=True)}
        save_weights(merged, merged_path(method), meta)
        print(f"merged {len(params.tasks)} task vectors with {method} {selection['methods'][method]['chosen'] or ''}")


if __name__ == "__main__":
    run_stage("merge", main)
