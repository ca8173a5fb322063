#!/usr/bin/env bash
# The README's generation table (issue 31): loss, mean steps per token and tokens/s of each
# decoding mode (KV cache, per-token exit, bounded cache, speculative decoding; warm start on
# inject=add runs) against the fixed depth, on the Shakespeare CPU preset. Parts:
#   table  3 seeds of depth=score (paper_shakespeare_cpu: 4 steps, 128 wide, 500 iterations)
#          and 3 seeds of depth=score depth.inject=add (warm start needs injection), then
#          python -m score_exp.bench.generation table -> outputs/generation/table.md
#   cost   per-token cost against context length, cache vs none -> outputs/generation/cost.md
# Runs go to outputs/generation/<name>_s<seed>/ (a finished run is skipped on a re-run).
#
#   scripts/measure_generation.sh table cost      # SEEDS="0 1 2" WARM_SEEDS="0 1 2" by default
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=outputs/generation
SEEDS=${SEEDS:-0 1 2}
WARM_SEEDS=${WARM_SEEDS:-0 1 2}
mkdir -p "$OUT"

train() {  # train NAME SEED OVERRIDES...
  local dir=$OUT/$1_s$2 seed=$2
  shift 2
  if [ -f "$dir/results.json" ]; then return; fi
  OMP_NUM_THREADS=1 $BIN/score-train task=shakespeare_char_cpu depth=score task.max_steps=500 \
    seed="$seed" "hydra.run.dir=$dir" trainer.enable_progress_bar=false "$@"
}

for part in "$@"; do
  case $part in
    table)
      runs=() warm=()
      for s in $SEEDS; do train score "$s"; runs+=("$OUT/score_s$s"); done
      for s in $WARM_SEEDS; do train inject "$s" depth.inject=add; warm+=("$OUT/inject_s$s"); done
      $BIN/python -m score_exp.bench.generation table "${runs[@]}" --warm "${warm[@]}" --keep "$OUT/measured" \
        | tee "$OUT/table.md"
      ;;
    cost) $BIN/python -m score_exp.bench.generation cost | tee "$OUT/cost.md" ;;
    *) echo "unknown part $part (table | cost)" >&2; exit 2 ;;
  esac
done
