#!/usr/bin/env bash
# One prepared run for a lent GPU machine (one H200, 16 cores; ../shared/device/README.md): correctness
# first, then speed, and always its numbers back.
#
# How to run it, from this machine:
#   1. ../shared/device/prepare            (copies the wheels and preamble.sh into .whl/, which git ignores;
#                                           add a setuptools>=77 wheel if that machine lacks one:
#                                           pip download --no-deps -d /tmp/w setuptools==84.2.1 and pass
#                                           /tmp/w/setuptools-*.whl to prepare)
#   2. the device tool: run with carry [".whl"], timeout_s 600 and the command
#        . .whl/preamble.sh; bash benchmarks/gpu_session.sh
# What comes back in $OUT (at most 8 plain files, no folders, no links):
#   summary.txt       the gate's verdict first (PASS / FAIL / INCOMPLETE), the time each step used against
#                     its limit, the environment, then each benchmark's table in short with lmforge/anchor
#                     ratios (ANCHORS.md)
#   session.tar.gz    every log, CSV, PNG and JSON of the run (gate/ holds the gate's per-shard JSON lines)
#   gate.csv attn.csv attn_masked.csv ce.csv train.csv tiles.json   the key files, where written
#                     (tiles.json: lmforge's tuned_tiles(), for pin_tiles or LMFORGE_ATTN_TILES in a later run)
# Copy what matters into benchmarks/RESULTS.md.
#
# The steps, in order of importance, each under `timeout -k 5 -s INT`: SIGINT at its limit less 5 s (the
# Python scripts then print what they measured and exit; every CSV row is on disk as soon as measured),
# SIGKILL at its limit. The limits sum to at most BUDGET (default 540 s, under the tool's 600 s per call
# with the preamble's ~30 s); a step that would start with less than 20 s left is skipped and said so.
#   env       10 s   nvidia-smi, versions, cores, memory
#   gate     150 s   benchmarks/gpu_gate.py in 12 shard processes: every listed attention tile of every
#                    kernel (fwd, bwd, dkdv, dq) compiled and checked against float64, determinism, the
#                    fused linear CE and the CE row kernel; warms the Triton cache for what follows
#   attn     120 s   the anchor sweep, D=128 N=4096 causal first (--order priority), lmforge vs cuDNN/flash,
#                    fwd+bwd then fwd; tiles.json after every lmforge measurement
#   masked    55 s   packed documents and key padding against FlexAttention and SDPA
#   ce        55 s   fused linear CE at the two anchor shapes against torch.compile, Liger, eager
#   train    110 s   GPT-2 124M step (3 warmup + 10 timed steps): plain-compiled, lmforge-kernels-compiled,
#                    then plain-eager; compile caches kept (--compile-caches), so the first step is not cold
#   finetune  what is left, up to 30 s: pretrain gpt-tiny, packed SFT, generate (in a work folder)
#   memory    what is left, up to 60 s: benchmarks/memory.py, lmforge estimate's peak against
#             max_memory_allocated for gpt-small and gpt2-124m (only if 45 s or more remain)
#   ce-chunks what is left, up to 60 s: lmforge's chunk size swept (only if 30 s or more remain)
# 10 + 150 + 120 + 55 + 55 + 110 = 500 s, 30 s for the fine-tune, 10 s kept for the packing: 540 s.
# Packing runs at the end, and from a trap on EXIT, INT and TERM: a session cut short still returns.
# Work files live outside $OUT (WORK, default a new /tmp/lmforge-session.*), the Triton and inductor caches
# in /tmp/lmforge-{triton,inductor}-cache.
#
# A dry run on a CPU machine checks the plumbing and the file count in about two minutes (tiny shapes,
# the gate under TRITON_INTERPRET=1, a budget of 300 s): DRY_RUN=1 bash benchmarks/gpu_session.sh
# (or --dry-run); tests/test_gpu_session.py runs it. Environment: OUT (default benchmarks/out), WORK (a
# folder made here is removed after packing unless KEEP_WORK=1), BUDGET, PYTHON (default python3),
# GATE_SHARDS (default 12, dry run 2).
# shellcheck disable=SC2317  # pack, environment and finetune run from a trap and through bash -c
set -u -o pipefail
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

DRY_RUN=${DRY_RUN:-0}
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
      sed -n '2,/^set -u/p' "$0" | sed '$d'
      exit 0
      ;;
    *)
      echo "gpu_session.sh: unknown argument $arg (--dry-run, --help)" >&2
      exit 2
      ;;
  esac
done
[ "$DRY_RUN" = 0 ] || DRY_RUN=1

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-$ROOT/benchmarks/out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
OWN_WORK=0
[ -n "${WORK:-}" ] || OWN_WORK=1
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/lmforge-session.XXXXXX")}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd) || exit 1
case "$WORK/" in "$OUT"/*)
  echo "gpu_session.sh: WORK ($WORK) must lie outside OUT ($OUT)" >&2
  exit 2
  ;;
esac
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/lmforge-triton-cache}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/lmforge-inductor-cache}
PY=${PYTHON:-python3}
if [ "$DRY_RUN" = 1 ]; then
  BUDGET=${BUDGET:-300}
  GATE_SHARDS=${GATE_SHARDS:-2}
  MIN_STEP=10
else
  BUDGET=${BUDGET:-540}
  GATE_SHARDS=${GATE_SHARDS:-12}
  MIN_STEP=20
fi
RESERVE=10   # seconds kept for the report and the packing
KILL_AFTER=5 # SIGKILL this long after the SIGINT
START=$SECONDS
STEPS=$WORK/steps.tsv
printf 'step\tlimit_s\tused_s\tstatus\n' >"$STEPS"
[ -z "$(ls -A "$OUT")" ] || echo "note: $OUT is not empty; what is there already counts towards the 8 files"

# seconds left for steps (the reserve for packing kept aside)
left() { echo $((BUDGET - RESERVE - (SECONDS - START))); }

# cap SECONDS: SECONDS, or what is left when less
cap() {
  local l
  l=$(left)
  if [ "$1" -lt "$l" ]; then echo "$1"; else echo "$l"; fi
}

# step NAME LIMIT COMMAND...: run COMMAND under min(LIMIT, what is left), SIGINT at the limit less
# KILL_AFTER, SIGKILL at the limit; output to $WORK/NAME.log and stdout; one line in steps.tsv
step() {
  local name=$1 limit=$2
  shift 2
  local log=$WORK/$name.log l t0 rc status
  l=$(left)
  if [ "$l" -lt "$MIN_STEP" ]; then
    echo "== $name: skipped, the budget is spent (${l}s left)" | tee "$log"
    printf '%s\t%s\t0\tskipped (budget spent)\n' "$name" "$limit" >>"$STEPS"
    return 0
  fi
  [ "$limit" -gt "$l" ] && limit=$l
  [ "$limit" -gt "$KILL_AFTER" ] || limit=$((KILL_AFTER + 1)) # timeout 0 would mean no limit at all
  t0=$SECONDS
  echo "== $name: $* (limit ${limit}s, $((SECONDS - START))s into the session)" | tee "$log"
  timeout -k "$KILL_AFTER" -s INT "$((limit - KILL_AFTER))" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124) status="cut short at its limit (SIGINT); what it measured is kept" ;;
    137) status="killed at its limit (SIGKILL); rows written before are kept" ;;
    130) status="interrupted" ;;
    *) status="failed (exit $rc)" ;;
  esac
  echo "== $name: $status, $((SECONDS - t0))s" | tee -a "$log"
  printf '%s\t%s\t%s\t%s\n' "$name" "$limit" "$((SECONDS - t0))" "$status" >>"$STEPS"
}

# the report, the tarball and the key files into $OUT; once, at the end or from the trap
PACKED=0
pack() {
  [ "$PACKED" = 1 ] && return
  PACKED=1
  trap '' INT TERM
  local dry=()
  [ "$DRY_RUN" = 1 ] && dry=(--dry-run)
  [ -f "$WORK/gate/gate_summary.txt" ] || [ ! -f "$WORK/gate/gate_plan.json" ] ||
    timeout -k 2 20 "$PY" benchmarks/gpu_gate.py --merge --out "$WORK/gate" >>"$WORK/gate.log" 2>&1
  echo "session: $((SECONDS - START))s of the ${BUDGET}s budget used; writing the summary and packing"
  if ! timeout -k 2 30 "$PY" benchmarks/harness.py report "$WORK" --budget "$BUDGET" ${dry[@]+"${dry[@]}"} \
    >"$WORK/summary.txt" 2>"$WORK/report.err"; then
    { # the report failed: the gate's summary, the steps and each log's last lines, as they are
      echo "(the report failed: $(tail -n 1 "$WORK/report.err"))"
      cat "$WORK/gate/gate_summary.txt" 2>/dev/null || echo "GATE: NOT RUN"
      cat "$STEPS"
      for f in "$WORK"/*.log; do
        echo "== $(basename "$f")"
        tail -n 15 "$f"
      done
    } >"$WORK/summary.txt"
  fi
  (cd "$WORK" && find . -maxdepth 2 -type f \( -name '*.log' -o -name '*.csv' -o -name '*.png' -o -name '*.json' \
    -o -name '*.jsonl' -o -name '*.txt' -o -name '*.tsv' -o -name '*.err' \) ! -path './finetune/*' -print |
    sort | tar -czf "$OUT/session.tar.gz" -T -) || echo "session: tar failed"
  cp "$WORK/summary.txt" "$OUT/summary.txt"
  local f n
  for f in gate/gate.csv attn.csv attn_masked.csv ce.csv train.csv tiles.json; do
    n=$(find "$OUT" -maxdepth 1 -type f | wc -l)
    [ "$n" -lt 8 ] && [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/"
  done
  echo "session: done in $((SECONDS - START))s; in $OUT: $(find "$OUT" -mindepth 1 -maxdepth 1 -printf '%f ')"
  [ "$OWN_WORK" = 1 ] && [ "${KEEP_WORK:-0}" = 0 ] && rm -rf "$WORK" # all but the fine-tune's runs are packed
  echo
  cat "$OUT/summary.txt"
}
trap pack EXIT
trap 'echo "session: interrupted"; exit 130' INT TERM

# -- the steps ----------------------------------------------------------------------------------------
environment() {
  echo "date: $(date -Is); dry run: $DRY_RUN; budget ${BUDGET}s; work $WORK"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit,temperature.gpu --format=csv
  else
    echo "nvidia-smi: not found (no NVIDIA GPU here)"
  fi
  "$PY" -c "import platform, torch, triton; print('python', platform.python_version(), 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  echo "cores: $(nproc); memory: $(free -g 2>/dev/null | awk '/^Mem/ {print $2 " GiB"}'); TRITON_CACHE_DIR=$TRITON_CACHE_DIR"
}
export -f environment
export PY DRY_RUN BUDGET WORK
step env "$(cap 10)" bash -c environment

# b. warm-compile + correctness gate, in parallel shard processes (compiling is CPU-bound)
limit=$(cap 150)
[ "$DRY_RUN" = 1 ] && limit=$(cap 75)
gate_args=(--parallel "$GATE_SHARDS" --time-limit "$((limit - 10))" --out "$WORK/gate")
[ "$DRY_RUN" = 1 ] && gate_args+=(--skip auto)
step gate "$limit" "$PY" benchmarks/gpu_gate.py "${gate_args[@]}"

if [ "$DRY_RUN" = 1 ]; then
  step attn "$(cap 30)" "$PY" benchmarks/attn.py --quick --device cpu --no-smoke --causal yes \
    --providers lmforge,flash,math --tiles-json "$WORK/tiles.json" --out "$WORK"
  step masked "$(cap 30)" "$PY" benchmarks/attn_masked.py --quick --device cpu --no-smoke --out "$WORK"
  step ce "$(cap 30)" "$PY" benchmarks/ce.py --device cpu --no-smoke --tokens 256 --hidden 64 --vocab 2000 \
    --out "$WORK"
  step train "$(cap 50)" "$PY" benchmarks/train.py --quick --device cpu --compile-backend aot_eager \
    --providers plain-compiled,lmforge-kernels-compiled --out "$WORK"
else
  # c. attention: the anchor point first, then the rest of the sweep by importance; tiles.json as it goes
  step attn "$(cap 120)" "$PY" benchmarks/attn.py --order priority --providers lmforge,cudnn,flash \
    --modes fwd+bwd,fwd --tiles-json "$WORK/tiles.json" --out "$WORK"
  # d. masked attention
  step masked "$(cap 55)" "$PY" benchmarks/attn_masked.py --out "$WORK"
  # e. fused linear CE at the two anchor shapes (the chunk sweep at the end, if time remains)
  step ce "$(cap 55)" "$PY" benchmarks/ce.py --quick --providers lmforge,torch-compile,liger,torch-eager --out "$WORK"
  # f. training step; the caches kept (the gate warmed Triton's), so that three providers fit
  step train "$(cap 110)" "$PY" benchmarks/train.py --preset gpt2-124m --compile-caches \
    --providers plain-compiled,lmforge-kernels-compiled,plain-eager --warmup 3 --steps 10 --out "$WORK"
fi

# g. fine-tune smoke in a work folder of its own (a copy of configs/, no links), bf16 on the GPU:
#    packed SFT rows go through the Triton kernel with segment ids, then generation with the KV cache
finetune() {
  local dir=$WORK/finetune steps=100 sft=60 every=30
  [ "$DRY_RUN" = 1 ] && steps=2
  rm -rf "$dir" && mkdir -p "$dir" && cp -r "$ROOT/configs" "$dir/" && cd "$dir" || return 1
  export LMFORGE_CACHE=$dir/cache
  "$PY" -m lmforge fit -c configs/gpt-tiny.yaml --trainer.max_steps "$steps" --trainer.val_check_interval "$steps" \
    --trainer.limit_val_batches 2 --trainer.enable_progress_bar false || return 1
  if [ "$DRY_RUN" = 1 ]; then # the plumbing only: generate from the pretrained checkpoint
    "$PY" -m lmforge generate runs/gpt-tiny/checkpoints/last.ckpt --prompt 'The king' --max-new-tokens 4
    return
  fi
  "$PY" -m lmforge fit -c configs/finetune-sft.yaml --data.packing true --trainer.max_steps "$sft" \
    --trainer.val_check_interval "$every" --trainer.enable_progress_bar false || return 1
  "$PY" -m lmforge generate runs/finetune-sft/checkpoints/last.ckpt \
    --prompt $'Sentence: No king counts under my engine.\nSubject:' --max-new-tokens 8 --dtype bfloat16
}
export -f finetune
export ROOT
step finetune "$(cap 30)" bash -c finetune

# h. only if time remains: lmforge estimate's peak memory against max_memory_allocated (gpt-small, gpt2-124m)
if [ "$(left)" -ge 45 ]; then
  if [ "$DRY_RUN" = 1 ]; then
    step memory "$(cap 40)" "$PY" benchmarks/memory.py --quick --out "$WORK"
  else
    step memory "$(cap 60)" "$PY" benchmarks/memory.py --configs gpt-small,gpt2-124m --steps 5 --out "$WORK"
  fi
else
  printf 'memory\t60\t0\tskipped (less than 45 s left)\n' >>"$STEPS"
fi

# i. only if time remains: lmforge's chunk size swept at the anchor shapes
if [ "$(left)" -ge 30 ]; then
  if [ "$DRY_RUN" = 1 ]; then
    step ce-chunks "$(cap 20)" "$PY" benchmarks/ce.py --device cpu --no-smoke --tokens 256 --hidden 64 \
      --vocab 2000 --providers lmforge --lmforge-chunks 64,128 --out "$WORK"
  else
    step ce-chunks "$(cap 60)" "$PY" benchmarks/ce.py --quick --providers lmforge \
      --lmforge-chunks 128,512,1024,2048 --out "$WORK"
  fi
else
  printf 'ce-chunks\t60\t0\tskipped (less than 30 s left)\n' >>"$STEPS"
fi
exit 0
