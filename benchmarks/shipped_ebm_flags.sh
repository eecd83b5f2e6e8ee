# The shipped energy recipe's stage-2 flags (global head, weight averaging, corrupted
# positives), sourced by train_shipped.sh and gpu_checks.sh so both run the same recipe.
# Stage 2: the energy network, VAE frozen (contrastive divergence, Langevin in noise space
# from the prior, persistent eps_z buffer, CD on the decoder's sample).
SHIPPED_EBM_FLAGS=(--energy-head global --batch-size 32 --langevin-steps 10 --step-size 2e-3
  --cd-input sample --buffer-size 10000 --buffer-ramp-steps 400 --eval-every 250
  --checkpoint-every 50 --eval-images 500 --ema-decay 0.999 --corruption-weight 1)
