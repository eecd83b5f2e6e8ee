#!/usr/bin/env bash
# How the two shipped checkpoints were trained, calibrated and measured (CPU, 2 cores).
# Each model ran in its own process with OMP_NUM_THREADS=1, both at once.
# Usage: bash benchmarks/train_shipped.sh [../shared/datasets]
set -euo pipefail
shared=${1:-../shared/datasets}
source "$(dirname "$0")/shipped_ebm_flags.sh"
mkdir -p runs  # the logs below go there before vaebm creates it (runs/ is not in git)
pids=()
for name in fashion-mnist mnist; do
  (
    export OMP_NUM_THREADS=1
    # Stage 1: the VAE (3000 steps of 64 images, Adamax, cosine-decayed lr, KL warm-up).
    # This gives a VAE of the same quality, not the shipped one bit for bit: that needs the
    # runs' history (docs/training.md, "Reproducing the VAE bit for bit").
    vaebm train vae --out "runs/$name" --name "$name" --overwrite \
      --data "$shared/$name/train-images-idx3-ubyte.gz" \
      --steps 3000 --kl-warmup-steps 1000 --eval-every 500 --checkpoint-every 250 \
      --eval-images 1000 --iwae-k 16
    # Stage 2: the energy network, VAE frozen, with the study's global head, weight
    # averaging and corrupted positives (benchmarks/shipped_ebm_flags.sh).
    ebm=("${SHIPPED_EBM_FLAGS[@]}")
    steps=3000
    # Fashion-MNIST's 6000 iterations at 1e-4 are near the edge: seed 0 (shipped) got
    # through; with --seed 1 the energy ran away and diverged at 5954 (docs/training.md).
    if [ "$name" = fashion-mnist ]; then steps=6000; fi
    vaebm train ebm --checkpoint "runs/$name" "${ebm[@]}" --steps "$steps" --lr 1e-4 --overwrite
    if [ "$name" = fashion-mnist ]; then  # 3000 more at a fifth of the rate (it diverged at 1e-4),
      # each blurred copy now blurred at a sigma drawn from 1-13 pixels instead of 3, and
      # the corruption term weighted 4 (the later --corruption-weight overrides the array's)
      vaebm train ebm --checkpoint "runs/$name" "${ebm[@]}" --resume --steps 9000 --lr 2e-5 \
        --corruption-blur-min 1 --corruption-blur-max 13 --corruption-weight 4
      # 1500 more from the published (averaged) energy with a fresh Adam, average and buffer,
      # the variance of the positives' energies penalised (docs/ood-analysis.md, "A flat
      # energy on the data"); this is what replaced runs/$name's energy in the shipped model.
      python benchmarks/warm_start.py --checkpoint "runs/$name" --out "runs/$name-flat"
      vaebm train ebm --checkpoint "runs/$name-flat" "${ebm[@]}" --resume --steps 10500 \
        --lr 2e-5 --corruption-blur-min 1 --corruption-blur-max 13 --corruption-weight 4 \
        --positive-variance-weight 1e-3
    fi
  ) > "runs/$name.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done  # a failed model fails the script
mkdir -p checkpoints
for name in fashion-mnist mnist; do
  run="runs/$name"
  if [ "$name" = fashion-mnist ]; then run="runs/$name-flat"; fi
  mkdir -p "checkpoints/$name"
  rm -f "checkpoints/$name"/weights-*.safetensors
  cp "$run/config.json" "$run"/weights-*.safetensors "checkpoints/$name/"
done
# Calibration on half of each test set, evaluation against every other data set:
common="--shared $shared --n 5000 --n-calibration 5000 --iwae-k 8 --target-fpr 0.05 --seed 0"
python benchmarks/ood_benchmark.py $common --models fashion-mnist &
python benchmarks/ood_benchmark.py $common --models mnist &
wait
python benchmarks/ood_benchmark.py $common --models fashion-mnist mnist --reuse
