#!/bin/bash
# The GPU figures the issues leave open, in one prepared run (about 8-9 minutes on one H200).
#
# For a session lent a GPU through the `device` tool. The GPU machine has torch and transformers
# but no diffusers, and no network: carry the wheels. Here, once, in the repo root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       diffusers==0.42.1 importlib_metadata
#
# Then one device call: run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=600).
# Tables land in $OUT (returned) and are copied to benchmarks/results/ here, each naming the card.
# Every stage has its own time limit so that one slow stage cannot eat the rest; the compiled
# stages share inductor's on-disk cache (same block shapes compile once).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
echo "card: $card"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_${card}_card.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu_${card}_card.txt"
cd benchmarks

# 1. sampling step (one forward, CFG batch 2), SD3-medium config, 1024 px, T5 256: stock / tokens x
#    eager / compiled (issue 17; attach overhead target of issue 2: <= 3%)
timeout 170 python3 attach_overhead.py --full --dtype bf16 --compile --iters 10 --warmup 3 \
  --out "$OUT/sample_step_${card}.md" 2>&1 | tail -12

# 2. training step, SD3-medium config, 512 px, T5 512, bf16, B = 4 (16 pairs): floor / eager / compiled
#    side by side (issue 17 target: >= 1.5x the authors' 53 pairs/s on an H200)
timeout 250 python3 train_step.py --full --dtype bf16 --side-by-side --batch 4 --text-len 512 --chunk none \
  --iters 4 --warmup 1 --out "$OUT/train_step_${card}_b4.md" 2>&1 | tail -12

# 3. B = 16 (256 pairs) in chunks of 16 pairs (the shapes of stage 2: its compiled graphs are reused),
#    eager / compiled; peak memory (target <= 40 GiB)
timeout 200 python3 train_step.py --full --dtype bf16 --side-by-side --no-floor --batch 16 --text-len 512 \
  --chunk 16 --iters 2 --warmup 1 --out "$OUT/train_step_${card}_b16.md" 2>&1 | tail -12

# 4. AGSM vs SoftREPA training step, SD3-medium config, 512 px, T5 512, bf16, B = 4 (issue 23)
timeout 120 python3 objective_step.py --full --dtype bf16 --batch 4 --text-len 512 --chunk none \
  --iters 3 --warmup 1 --out "$OUT/objective_step_${card}_b4.md" 2>&1 | tail -6

# 5. if time is left: fp16 / bf16 against fp32 with tokens attached (issue 2)
timeout 90 python3 precision_check.py --full --out "$OUT/precision_check_${card}.md" 2>&1 | tail -12
echo "done"
