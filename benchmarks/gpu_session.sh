#!/usr/bin/env bash
# One prepared run for a lent GPU machine (see ../shared/device/README.md): correctness first, then speed.
# From this machine (lmforge builds with setuptools>=77, which that machine may lack):
#   pip download --no-deps -d /tmp/w setuptools==84.2.1 && ../shared/device/prepare /tmp/w/setuptools-*.whl
# then the device tool with carry [".whl"] and the command
#   . .whl/preamble.sh; bash benchmarks/gpu_session.sh
# At most about 10 minutes (timeouts below), inside one device call. Everything it measures lands in $OUT (copy the numbers that matter into benchmarks/RESULTS.md).
set -u
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

# 1. kernel correctness on the GPU (bf16 and fp16 at real sizes, masks, determinism, dispatch)
timeout 120 python3 -m pytest -q -x tests/kernels tests/test_model.py 2>&1 | tail -30 | tee "$OUT/tests.log"

# 2. attention speed: the anchor sweep (bf16), lmforge against every SDPA backend
timeout 240 python3 benchmarks/attn.py --out "$OUT" 2>&1 | tee "$OUT/attn.log"

# 3. fused linear + cross-entropy against torch eager, torch.compile and Liger: the two anchor shapes
timeout 150 python3 benchmarks/ce.py --quick --out "$OUT" 2>&1 | tee "$OUT/ce.log"

# 4. training step throughput, plain loop against lmforge's Lightning loop, bf16
timeout 90 python3 benchmarks/train.py --preset gpt-small --steps 30 --out "$OUT" 2>&1 | tail -12 | tee "$OUT/train.log"

# 5. fine-tuning smoke in bf16 on the GPU: packed SFT rows go through the Triton kernel with segment ids
#    and restarted positions, then generation with the KV cache (about 1 minute)
( cd "$OUT" && ln -sfn "$OLDPWD/configs" configs && export LMFORGE_CACHE="$PWD/cache" &&
  timeout 60 lmforge fit -c configs/gpt-tiny.yaml --trainer.max_steps 100 --trainer.enable_progress_bar false &&
  timeout 60 lmforge fit -c configs/finetune-sft.yaml --data.packing true --trainer.max_steps 60 \
      --trainer.val_check_interval 30 --trainer.enable_progress_bar false &&
  timeout 30 lmforge generate runs/finetune-sft/checkpoints/last.ckpt \
      --prompt $'Sentence: No king counts under my engine.\nSubject:' --max-new-tokens 8 --dtype bfloat16
) 2>&1 | grep -E "lmforge|Error|error|Subject" | tee "$OUT/finetune.log"
