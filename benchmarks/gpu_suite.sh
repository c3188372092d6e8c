#!/bin/bash
# The GPU figures the issues leave open, in one prepared run (at most SUITE_BUDGET s, default 540).
#
# For a session lent a GPU through the `device` tool. The GPU machine has torch and transformers
# but no diffusers (torchao: not known to be there either), and no network: carry the wheels. Here, once, in the repo root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       diffusers==0.42.1 importlib_metadata torchao
#
# (torchao: the release whose torch pin matches the GPU machine's torch, 2.11 at the last look; the
# fp8 arms are skipped with the reason printed when it does not import.)
# Then, first here on the CPU: `DRY_RUN=1 bash benchmarks/gpu_suite.sh` (or --dry-run): every stage
# with tiny settings, no nvidia-smi, tables in a temporary folder, exit status 1 if a stage failed.
# Then one device call: run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=600).
# Tables land in $OUT (returned) and are copied to benchmarks/results/ here, each naming the card.
#
# Stages (STAGES, in this order of priority; each with its own time limit, cut to what is left of
# SUITE_BUDGET, and skipped when less than 30 s are left, so that the run ends inside one call):
#   b4         training step, 512 px, T5 512, bf16, B = 4 (16 pairs): floor / eager / compiled and the
#              compiled speed-option combinations side by side (issue 25: >= 2.0x the floor)
#   precision  each speed option against the bf16 eager step (issue 25's acceptance table)
#   b16        B = 16 (256 pairs) in chunks of 16 pairs: eager / compiled / combinations, peak memory
#   sample     sampling step (one forward, CFG batch 2), 1024 px, T5 256: stock / tokens x eager / compiled
#   objective  AGSM vs SoftREPA step (issue 23; measured, not in the default list)
#   bf16fp16   fp16 / bf16 against fp32 with tokens attached (issue 2; measured, not in the default list)
#   families   per family at its real configuration (random weights): attach overhead and one training
#              step (issue 24; not in the default list: it needs a device call of its own,
#              `STAGES=families bash benchmarks/gpu_suite.sh`, and FAMILIES="flux3 sd3 ..." picks some)
set -uo pipefail
start=$SECONDS  # the budget counts from here: wheel installs and imports included
cd "$(dirname "$0")/.."
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
DRY_RUN=${DRY_RUN:-0}
PY=${PYTHON:-python3}
STAGES=${STAGES:-b4 precision b16 sample}
BUDGET=${SUITE_BUDGET:-540}
ATTENTION=${ATTENTION:-cudnn flash}
if [ "$DRY_RUN" = 1 ]; then
  OUT=${OUT:-$(mktemp -d)}
  card=dry-run-cpu
  # dynamo off: the dry run checks that every stage starts and writes its table, in a CPU minute;
  # DRY_RUN_COMPILE=1 keeps torch.compile (minutes on a CPU)
  [ "${DRY_RUN_COMPILE:-0}" = 1 ] || export TORCHDYNAMO_DISABLE=1
  export CUDA_VISIBLE_DEVICES=""
else
  OUT=${OUT:-benchmarks/results}
fi
OUT=$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")
mkdir -p "$OUT"
if [ -d .whl ] && [ "$DRY_RUN" != 1 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
if [ "$DRY_RUN" != 1 ]; then
  card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_${card}_card.txt"
fi
echo "card: $card  out: $OUT  stages: $STAGES  budget: ${BUDGET}s"
$PY -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu_${card}_card.txt"
$PY -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu_${card}_card.txt"
cd benchmarks

# Sizes: the real ones, or tiny ones for the dry run (same scripts, same options)
if [ "$DRY_RUN" = 1 ]; then
  TRAIN="--tiny --text-len 8"; B4="--batch 2 --iters 1 --warmup 1"; B16="--batch 3 --chunk 4 --iters 1 --warmup 1"
  PREC="--tiny --steps 2 --lockstep 1"; SAMPLE="--resolution 32 --text-len 16 --iters 1 --warmup 1"
  SMALL="--resolution 32 --text-len 8 --batch 2"; SMALL_ITERS="--iters 1 --warmup 1"; PCHECK=$SMALL
  FAM="--tiny --iters 1 --warmup 1"
else
  TRAIN="--full --dtype bf16 --text-len 512"; B4="--batch 4 --iters 3 --warmup 1"
  B16="--batch 16 --chunk 16 --iters 2 --warmup 1"
  # 256 px / T5 256: the fp32 arm (the spread, TF32 off) runs ~8x slower than bf16, and at 512 px its
  # 50 steps alone would take ~2 minutes
  PREC="--full --resolution 256 --text-len 256 --steps 50 --lockstep 5"; SAMPLE="--full --dtype bf16 --iters 10 --warmup 3"
  SMALL="--full --dtype bf16 --batch 4 --text-len 512"; SMALL_ITERS="--iters 3 --warmup 1"; PCHECK="--full"
  FAM="--iters 5 --warmup 2 --timeout 150"
fi

failed=""
# stage NAME LIMIT command...: run with the smaller of LIMIT and what is left of the budget
stage() {
  local name=$1 limit=$2; shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  local left=$((BUDGET - (SECONDS - start)))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 30 ]; then
    echo "== $name: skipped (${left}s of the ${BUDGET}s budget left)"; failed="$failed $name(no-time)"; return 0
  fi
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tail -n 16
  local rc=${PIPESTATUS[0]}
  echo "== $name: rc $rc, $((SECONDS - t0)) s"
  [ "$rc" = 0 ] || failed="$failed $name(rc=$rc)"
}

# shellcheck disable=SC2086  # the size variables are word lists on purpose
stage b4 200 $PY train_step.py $TRAIN --side-by-side $B4 --chunk none --attention auto $ATTENTION --fp8 \
  --out "$OUT/train_step_${card}_b4_speed.md"
# shellcheck disable=SC2086
stage precision 220 $PY speed_precision.py $PREC \
  --options $(for a in $ATTENTION; do printf 'attention=%s ' "$a"; done) fp8 "compile+attention=${ATTENTION%% *}" \
  "compile+attention=${ATTENTION%% *}+fp8" \
  --out "$OUT/speed_precision_${card}.md"
# shellcheck disable=SC2086
stage b16 150 $PY train_step.py $TRAIN --side-by-side --no-floor $B16 --attention auto ${ATTENTION%% *} --fp8 \
  --out "$OUT/train_step_${card}_b16_speed.md"
# shellcheck disable=SC2086
stage sample 120 $PY attach_overhead.py $SAMPLE --compile --out "$OUT/sample_step_${card}.md"
# shellcheck disable=SC2086
stage objective 120 $PY objective_step.py $SMALL --chunk none $SMALL_ITERS --out "$OUT/objective_step_${card}_b4.md"
# shellcheck disable=SC2086
stage bf16fp16 90 $PY precision_check.py $PCHECK --out "$OUT/precision_check_${card}.md"
# shellcheck disable=SC2086
stage families 540 $PY family_step.py $FAM ${FAMILIES:+--families $FAMILIES} --out "$OUT/family_step_${card}.md"

echo "done in $((SECONDS - start)) s; tables in $OUT${failed:+; FAILED:$failed}"
[ -z "$failed" ]
