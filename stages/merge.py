"""Stage `merge`: one merged image tower per method in `merge.methods`, with the hyperparameters
the `select` stage chose on validation (a method without a grid uses its params block as is).

Every input (CAT's bases included) is checked before the first model is computed, and the models
are put in place together, with a manifest of their sha256, only once all of them are written."""

import json

from catmerge.cli import run_stage
from catmerge.io import atomic_dir, file_record, save_weights, write_json
from catmerge.layout import MERGED_DIR, merged_path
from catmerge.params import load_params
from catmerge.selection import chosen_params, read_selection
from catmerge.workspace import Workspace


def main() -> None:
    params = load_params()
    selection = read_selection(params)
    workspace = Workspace(params)
    chosen = {method: chosen_params(params, selection, method) for method in params.merge.methods}
    workspace.check_inputs(chosen)
    recorded = {m: p.model_dump(by_alias=True) if p is not None else {} for m, p in chosen.items()}
    with atomic_dir(MERGED_DIR) as out:
        files = []
        for method, method_params in chosen.items():
            merged = workspace.merged(method, method_params, keep_vector=False)  # computed as it is written
            meta = {"method": method, "tasks": ",".join(params.tasks), "params": json.dumps(recorded[method], sort_keys=True)}
            path = out / merged_path(method).name
            save_weights(merged, path, meta)
            files.append(file_record(path, out, f"merge:{method}"))
            print(f"merged {len(params.tasks)} task vectors with {method} {selection['methods'][method]['chosen'] or ''}")
        write_json({"tasks": params.tasks, "params": recorded, "files": files}, out / "manifest.json")


if __name__ == "__main__":
    run_stage("merge", main)
