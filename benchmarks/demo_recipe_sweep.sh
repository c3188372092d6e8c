#!/bin/bash
# The recipe sweep behind "Choosing the miniature recipe" (benchmarks/demo_time.md): each run is
# `softrepa demo` on the VALIDATION seeds 100-105 (never the demo's seeds 0-3) with overrides.
# Rows print as: vanilla / tokens alignment, binding, shape, colour, relation, quality proxy.
set -e
OUT=${OUT:-/tmp/demo_sweep}
mkdir -p "$OUT"
run() {  # run NAME CMD...
  name=$1; shift
  "$@" --fresh --out "$OUT/$name" --seeds 100-105 > "$OUT/$name.log" 2>&1
  python - "$OUT/$name" "$name" <<'PY'
import json, sys
d = json.load(open(sys.argv[1] + "/results.json"))["results"]
f = lambda r: " ".join(f"{k} {100 * r['categories'][k]['accuracy']:.1f}" for k in ("binding", "shape", "colour", "relation"))
v, t = d["vanilla"], d["tokens"]
print(f"{sys.argv[2]} | vanilla {100 * v['accuracy']:.1f} ({f(v)}, FD {v['quality_proxy']:.4f}) | tokens "
      f"{100 * t['accuracy']:.1f} ({f(t)}, FD {t['quality_proxy']:.4f}) | delta {100 * (t['accuracy'] - v['accuracy']):+.1f}")
PY
}
R=(--tokens.init normal --batch_size 8 --max-steps 300)   # the first toy_sd3 recipe
run base    softrepa demo "${R[@]}"
run b16     softrepa demo --tokens.init normal --batch_size 16 --max-steps 150
run tau02   softrepa demo "${R[@]}" --loss.tau 0.2
run hn8     env HN_K=8 python benchmarks/experiment_hard_negatives.py "${R[@]}"
run lr1e2   softrepa demo "${R[@]}" --lr 0.01
run hn8lr   env HN_K=8 python benchmarks/experiment_hard_negatives.py "${R[@]}" --lr 0.01
run ep      softrepa demo --tokens.init empty_prompt --batch_size 8 --max-steps 300
run ep_lr1e2 softrepa demo --tokens.init empty_prompt --batch_size 8 --max-steps 300 --lr 0.01
run ep600   softrepa demo --tokens.init empty_prompt --batch_size 8 --max-steps 600
run ep_b16  softrepa demo   # the current toy_sd3 recipe: empty-prompt init, batch 16, 150 steps
