#!/usr/bin/env bash
# One prepared run for a lent GPU machine (see ../shared/device/README.md): correctness first, then speed.
# From this machine (lmforge builds with setuptools>=77, which that machine may lack):
#   pip download --no-deps -d /tmp/w setuptools==84.2.1 && ../shared/device/prepare /tmp/w/setuptools-*.whl
# then the device tool with carry [".whl"], timeout_s 600 and the command
#   . .whl/preamble.sh; bash benchmarks/gpu_session.sh
# The steps run in order of importance, each under its own timeout and all within BUDGET seconds
# (default 540, under the device tool's 600 s per call); a step that would start with less than 20 s
# left is skipped and said so. Everything lands in $OUT: copy the numbers that matter into RESULTS.md.
set -u
export OUT=${OUT:-benchmarks/out}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"
START=$SECONDS

# step SECONDS LOG COMMAND...: run COMMAND under min(SECONDS, what is left of BUDGET), output to LOG and stdout
step() {
  local limit=$1 log=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 20 ]; then
    echo "skipped (budget spent): $*" | tee "$OUT/$log"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $* (timeout ${limit}s, $((SECONDS - START))s into the session)" | tee "$OUT/$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

# 1. kernel correctness on the GPU (bf16 and fp16 at real sizes, masks, determinism, dispatch, memory bar)
step 120 tests.log python3 -m pytest -q -x -p no:cacheprovider tests/kernels tests/test_model.py

# 2. attention speed: the anchor sweep (bf16), lmforge against every SDPA backend, with the tuned configs
step 200 attn.log python3 benchmarks/attn.py --out "$OUT"

# 2b. masked attention (packed documents, key padding) against SDPA with a boolean mask and FlexAttention
step 90 attn_masked.log python3 benchmarks/attn_masked.py --out "$OUT"

# 3. fused linear + cross-entropy against torch eager, torch.compile and Liger at the two anchor shapes,
#    with lmforge's chunk size swept (memory of one chunk against re-reading W per chunk)
step 120 ce.log python3 benchmarks/ce.py --quick --lmforge-chunks 128,512,1024,2048 --out "$OUT"

# 4. training step throughput, plain loop against lmforge's Lightning loop, bf16
step 150 train.log python3 benchmarks/train.py --preset gpt2-124m --providers plain-compiled,lmforge-kernels-compiled,plain-eager --warmup 3 --steps 15 --out "$OUT"

# 5. fine-tuning smoke in bf16: packed SFT rows go through the Triton kernel with segment ids and
#    restarted positions, then generation with the KV cache
finetune() {
  cd "$OUT" && ln -sfn "$OLDPWD/configs" configs && export LMFORGE_CACHE="$PWD/cache" &&
    lmforge fit -c configs/gpt-tiny.yaml --trainer.max_steps 100 --trainer.enable_progress_bar false &&
    lmforge fit -c configs/finetune-sft.yaml --data.packing true --trainer.max_steps 60 \
      --trainer.val_check_interval 30 --trainer.enable_progress_bar false &&
    lmforge generate runs/finetune-sft/checkpoints/last.ckpt \
      --prompt $'Sentence: No king counts under my engine.\nSubject:' --max-new-tokens 8 --dtype bfloat16
}
export -f finetune
step 120 finetune.log bash -c finetune
echo "session script done in $((SECONDS - START))s"
