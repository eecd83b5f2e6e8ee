#!/usr/bin/env bash
# Every GPU measurement of docs/gpu.md in one run, sized for a 15-minute device lease
# (about 5 minutes on one NVIDIA H200 with 16 cores): the service benchmark on CUDA, the
# CPU-against-CUDA check of scores, decisions and samples, and the EBM's training speed.
#
#   bash benchmarks/gpu_checks.sh OUT_DIR DATA_DIR [COMMIT]
#
# DATA_DIR holds Fashion-MNIST's t10k-images-idx3-ubyte.gz and train-images-idx3-ubyte.gz.
# Runs under any python3 with torch and the package's dependencies; where they cannot be
# installed (the device machine has no registry), put their wheels in .whl/ and they are
# installed into /tmp/site first. COMMIT is recorded where the tree has no usable .git.
set -u
out=${1:?OUT_DIR}
data=${2:?DATA_DIR}
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 9
  export PYTHONPATH=/tmp/site:$PWD
fi
[ -n "${3:-}" ] && export GIT_COMMIT=$3
mkdir -p "$out"
nvidia-smi -L; nproc
python3 -c "import fastapi, uvicorn, pydantic_settings, multipart, mlxtend, torch, service.app, training.cli; print('imports ok', torch.__version__, torch.cuda.is_available())" || exit 8
cp docs/service-benchmarks.md "$out/service-benchmarks.md"
echo "== service benchmark $(date +%T)"
timeout 330 nice -n 19 python3 benchmarks/service_bench.py --checkpoint checkpoints/fashion-mnist \
  --device cuda --seconds 10 --label cuda --out "$out/service-benchmarks-cuda.json" \
  --doc "$out/service-benchmarks.md" --log-dir "$out/logs" 2>&1 | tail -n 40
echo "== CPU against CUDA $(date +%T)"
timeout 120 python3 benchmarks/cuda_check.py --checkpoint checkpoints/fashion-mnist \
  --data "$data/t10k-images-idx3-ubyte.gz@0:1000" --out "$out/cuda-check.json" \
  > "$out/cuda-check.log" 2>&1; echo "cuda_check rc $?"; tail -n 5 "$out/cuda-check.log"
echo "== /sample stepped one job per Langevin step against one call $(date +%T)"
timeout 60 python3 benchmarks/sample_stepping.py --checkpoint checkpoints/fashion-mnist \
  --device cuda --n 64 --steps 200 --repeats 3 --out "$out/sample-stepping-cuda.json" \
  2>&1 | tail -n 3
echo "== EBM training speed, the shipped recipe's first stage, 90 s $(date +%T)"
source benchmarks/shipped_ebm_flags.sh
timeout 90 python3 -m training.cli train ebm --checkpoint checkpoints/fashion-mnist --overwrite \
  --out /tmp/ebm-cuda --data "$data/train-images-idx3-ubyte.gz" "${SHIPPED_EBM_FLAGS[@]}" \
  --lr 1e-4 --steps 6000 --device cuda \
  > "$out/ebm-cuda.log" 2>&1; echo "train rc $? (124: stopped by the 90 s limit, as planned)"
python3 -c "import torch; s = torch.load('/tmp/ebm-cuda/train_state_ebm.pt', weights_only=True); print('ebm steps', s['step'], 'seconds', s['seconds'], 'it/s', s['step'] / s['seconds'])"
tr '\r' '\n' < "$out/ebm-cuda.log" | grep -v '^$' | grep -v "ebm:" | tail -n 8
echo "== done $(date +%T)"
