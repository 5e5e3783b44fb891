#!/bin/bash
# Build the variant projects of the fidelity study (docs/fidelity.md): for each variant and seed,
# copy a built project of that seed (its data/, not its DVC cache), change one param, and let DVC
# rebuild what that param makes stale, up to the bases stage. Pretraining is reused when the
# variant does not touch it (expert regimes); the patch-16 tower is pretrained again.
#
#   benchmarks/fidelity_variants.sh [--seeds N] OUT_DIR SEED0_PROJECT ... SEED<N-1>_PROJECT [VARIANT...]
#   e.g. benchmarks/fidelity_variants.sh ../fid . ../seed1 ../seed2 patch16 lr1e-4 steps30
#   tiny (tests): benchmarks/fidelity_variants.sh --seeds 1 OUT_DIR MICRO_PROJECT cat.c=1
#
# --seeds: how many seed projects follow OUT_DIR (default 3, seeds 0 1 2).
# Variants: patch16 (model mini-vit-p16-minilm: 5 tokens per image instead of 17), lr1e-4 and
# lr1e-3 (expert fine-tuning lr instead of 3e-4), steps30 (30 expert steps instead of 100), or any
# KEY=VALUE override in `dvc exp run -S` syntax. The param is set as `dvc exp run -S` sets it and
# checked (flows/dvc_repo.py apply_overrides), so a key that does not exist stops the script.
# Writes OUT_DIR/variants.json: per built directory its variant, seed, source, override, seconds.
# A directory with a .built marker from an earlier run is kept as it is ("seconds": null).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
seeds=3
if [ "${1:-}" = "--seeds" ]; then seeds=$2; shift 2; fi
if [ $# -lt $((seeds + 1)) ]; then
  echo "usage: $0 [--seeds N] OUT_DIR SEED0_PROJECT ... SEED<N-1>_PROJECT [VARIANT...]" >&2; exit 2
fi
out=$1; shift
sources=("${@:1:$seeds}"); shift "$seeds"
variants=("$@")
[ ${#variants[@]} -eq 0 ] && variants=(patch16 lr1e-4 steps30)
mkdir -p "$out"
records=()
for variant in "${variants[@]}"; do
  case $variant in
    patch16) override=model=mini-vit-p16-minilm;;
    lr1e-4) override=finetune.lr=1.0e-4;;
    lr1e-3) override=finetune.lr=1.0e-3;;
    steps30) override=finetune.steps=30;;
    *=*) override=$variant;;
    *) echo "unknown variant $variant (patch16, lr1e-4, lr1e-3, steps30, or KEY=VALUE)" >&2; exit 2;;
  esac
  for ((seed = 0; seed < seeds; seed++)); do
    dir=$out/${variant//[^A-Za-z0-9._-]/_}_s${seed}
    if [ -f "$dir/.built" ]; then
      records+=("$variant" "$seed" "${sources[$seed]}" "$override" "$dir" "" ""); continue
    fi
    echo "=== $dir ($override) $(date +%T)"
    start=$EPOCHREALTIME
    mkdir -p "$dir"
    tar -C "${sources[$seed]}" --exclude=./.dvc/cache --exclude=./.dvc/tmp --exclude=./data/select_cache \
        --exclude=./data/merged --exclude=./.venv --exclude=./reports --exclude=./metrics --exclude=./.catmerge -cf - . | tar -C "$dir" -xf -
    # the copied outputs into the copy's own cache, so that DVC sees them as up to date and
    # reruns only what the changed param makes stale (without it every stage would run again)
    (cd "$dir" && dvc commit --force --quiet --with-deps bases)
    PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH} "$python" -c \
      'import sys; from pathlib import Path; from flows.dvc_repo import apply_overrides; apply_overrides(Path(sys.argv[1]), sys.argv[2:])' \
      "$dir" "$override"
    (cd "$dir" && dvc repro bases)
    touch "$dir/.built"
    records+=("$variant" "$seed" "${sources[$seed]}" "$override" "$dir" "$start" "$EPOCHREALTIME")
  done
done
"$python" - "$out/variants.json" "${records[@]}" <<'PY'
import json, sys
out, fields = sys.argv[1], sys.argv[2:]
keys = ("variant", "seed", "source", "override", "dir")
rows = []
for i in range(0, len(fields), 7):
    row, (start, end) = dict(zip(keys, fields[i:i + 5])), fields[i + 5:i + 7]
    row["seed"] = int(row["seed"])
    row["seconds"] = round(float(end) - float(start), 1) if start else None  # None: built by an earlier run
    rows.append(row)
with open(out, "w") as fh:
    json.dump({"projects": rows}, fh, indent=2)
    fh.write("\n")
print(f"{out}: {len(rows)} variant projects")
PY
