#!/bin/bash
# Build the variant projects of the fidelity study (docs/fidelity.md): for each variant and seed,
# copy a built project of that seed (its data/, not its DVC cache), change one param, and let DVC
# rebuild what that param makes stale, up to the bases stage. Pretraining is reused when the
# variant does not touch it (expert regimes); the patch-16 tower is pretrained again.
#
#   benchmarks/fidelity_variants.sh OUT_DIR SEED0_PROJECT SEED1_PROJECT SEED2_PROJECT [VARIANT...]
#   e.g. benchmarks/fidelity_variants.sh ../fid . ../seed1 ../seed2 patch16 lr1e-4 steps30
#
# Variants: patch16 (model mini-vit-p16-minilm: 5 tokens per image instead of 17), lr1e-4 and
# lr1e-3 (expert fine-tuning lr instead of 3e-4), steps30 (30 expert steps instead of 100).
set -u
out=$1; shift
sources=("$1" "$2" "$3"); shift 3
variants=("$@")
[ ${#variants[@]} -eq 0 ] && variants=(patch16 lr1e-4 steps30)
for variant in "${variants[@]}"; do
  for seed in 0 1 2; do
    dir=$out/${variant}_s${seed}
    [ -f "$dir/.built" ] && continue
    echo "=== $dir $(date +%T)"
    mkdir -p "$dir"
    tar -C "${sources[$seed]}" --exclude=./.dvc/cache --exclude=./.dvc/tmp --exclude=./data/select_cache \
        --exclude=./data/merged --exclude=./.venv --exclude=./reports --exclude=./metrics -cf - . | tar -C "$dir" -xf -
    case $variant in
      patch16) sed -i 's/^model: mini-vit-minilm /model: mini-vit-p16-minilm /' "$dir/params.yaml";;
      lr1e-4) sed -i 's/^  lr: 3.0e-4/  lr: 1.0e-4/' "$dir/params.yaml";;
      lr1e-3) sed -i 's/^  lr: 3.0e-4/  lr: 1.0e-3/' "$dir/params.yaml";;
      steps30) sed -i 's/^  steps: 100/  steps: 30/' "$dir/params.yaml";;
      *) echo "unknown variant $variant (patch16, lr1e-4, lr1e-3, steps30)" >&2; exit 2;;
    esac
    (cd "$dir" && dvc repro bases) && touch "$dir/.built" || exit 1
  done
done
