#!/usr/bin/env bash
# Flat (one latent group) against hierarchical (two groups) VAE, same budget otherwise:
# validation bits/dim (ELBO and IWAE k=16) after the same number of steps.
# Usage: bash benchmarks/flat_vs_hierarchical.sh [DATA] [STEPS]
set -euo pipefail
data=${1:-../shared/datasets/fashion-mnist/train-images-idx3-ubyte.gz@0:20000}
steps=${2:-600}
mkdir -p runs  # the logs below go there before vaebm creates it (runs/ is not in git)
pids=()
for groups in "8" "8 4"; do
  name="latent-${groups// /-}"
  OMP_NUM_THREADS=1 vaebm train vae --out "runs/$name" --data "$data" --steps "$steps" --overwrite \
    --latent-channels $groups --kl-warmup-steps $((steps / 3)) --eval-every "$steps" \
    --checkpoint-every "$steps" --eval-images 1000 --iwae-k 16 > "runs/$name.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done  # a failed run fails the script
for groups in "8" "8 4"; do
  name="latent-${groups// /-}"
  python -c "import json,sys; m=json.load(open('runs/$name/config.json'))['metrics']['vae']; \
print('latent_channels=[$groups]', {k: round(v, 4) for k, v in m.items()})"
done
