#!/bin/bash
# The GPU figures the issues leave open, in one prepared run (about 6-8 minutes on one H100/H200).
#
# For a session lent a GPU through the `device` tool. The GPU machine has torch and transformers
# but no diffusers, and no network: carry the wheels. Here, once, in the repo root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       diffusers==0.42.1 safetensors huggingface_hub
#   (plus any other package `python -c "import softrepa"` reports missing there)
#
# Then one device call: run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=600).
# Tables land in $OUT (returned) and benchmarks/results/ (here, after copying them back), each
# naming the card. Every stage has its own time limit so that one slow stage cannot eat the rest.
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

# 1. fp16 / bf16 against fp32 with tokens attached, SD3-medium config (~1 min)
timeout 150 python3 benchmarks/precision_check.py --full --out "$OUT/precision_check_${card}.md"

# 2. attach overhead, SD3-medium config, 1024 px, CFG batch 2, T5 256 (issue #2 target: <= 3%)
timeout 120 python3 benchmarks/attach_overhead.py --full --dtype bf16 --out "$OUT/attach_overhead_${card}.md"

# 3. training step, SD3-medium config, 512 px, bf16 (issue #3 targets: B = 4 / T5 512 >= 1.4x the
#    authors' 53 pairs/s, B = 16 in <= 40 GiB). All-pairs at B = 16 does not fit; it reports the OOM.
timeout 240 python3 benchmarks/train_step.py --full --dtype bf16 --batch 4 --text-len 512 --chunk none 16 32 \
  --iters 3 --warmup 1 --out "$OUT/train_step_${card}_b4.md"
timeout 150 python3 benchmarks/train_step.py --full --dtype bf16 --batch 8 16 --text-len 512 --chunk 32 \
  --iters 2 --warmup 1 --out "$OUT/train_step_${card}_b8_b16.md"
echo "done"
