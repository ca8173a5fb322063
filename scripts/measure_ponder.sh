#!/usr/bin/env bash
# Learned halting (PonderNet, depth.halt=ponder) against KL / state halting of a random-depth model,
# at the same bound of 8 steps (issue 23). Parts:
#   gpt    nanoGPT CPU preset, 3 seeds: ponder (8 steps in training, exits at several thresholds)
#          against random depth (uniform:2,8, inject=add) with Huginn's KL exit, both bounded by 8
#   gnn    ESOL-GNN (paper_esol_gnn_cpu, dt 0.25), 3 seeds: the same against random depth with the
#          state exit (the GNN has no readout distribution, so no KL criterion)
#   small  gnn on 1 seed, 5 epochs, hidden 32: a smoke-sized comparison for a busy machine
#   all    gpt and gnn
# Every run evaluates: the learned exit at thresholds 1 - eps, and the full 8 steps (state halting
# at eps 1e-300: nobody stops); the baseline: its exit at 3 thresholds and the full 8 steps. Runs go
# to multirun/ponder/<part>/{ponder,random}/ (a finished run is skipped on a re-run); then
#   score-report multirun/ponder/<part>  ->  "metric against inference NFE": metric at NFE spent.
#
#   scripts/measure_ponder.sh gpt gnn
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
JOBS=${JOBS:-2}
SWEEP=(hydra/launcher=joblib "hydra.launcher.n_jobs=$JOBS" trainer.enable_progress_bar=false)
PONDER_EPS=depth.adaptive_eps=0.05,0.1,0.3,0.5,0.7,0.9
FULL=(depth.halt=state depth.adaptive_eps=1e-300)  # every step runs: the bound's metric

# A run folder as a score-eval override: quoted for Hydra, its own quotes escaped.
run_dir() { local d=${1%/}; printf "run_dir='%s'" "${d//\'/\\\'}"; }

# evaluate DIR OVERRIDES...: score-eval on every finished run under DIR
evaluate() {
  local dir=$1
  shift
  for d in "$dir"/*/; do
    if [ -f "$d/results.json" ]; then $BIN/score-eval "$(run_dir "$d")" "$@"; fi
  done
}

compare() {  # compare NAME SEEDS HALT EPS TRAIN_OVERRIDES...
  local name=$1 seeds=$2 halt=$3 eps=$4
  shift 4
  local out=multirun/ponder/$name
  OMP_NUM_THREADS=1 $BIN/score-train -m "$@" depth.steps=8 depth.halt=ponder \
    depth.adaptive_eps=0.5 seed="$seeds" "${SWEEP[@]}" hydra.sweep.dir="$out/ponder"
  OMP_NUM_THREADS=1 $BIN/score-train -m "$@" depth.inject=add "depth.train_steps='uniform:2,8'" \
    seed="$seeds" "${SWEEP[@]}" hydra.sweep.dir="$out/random"
  evaluate "$out/ponder" "$PONDER_EPS"
  evaluate "$out/ponder" "${FULL[@]}"
  evaluate "$out/random" depth.steps=8 depth.keep_horizon=false depth.halt="$halt" "$eps"
  evaluate "$out/random" depth.steps=8 depth.keep_horizon=false "${FULL[@]}"
}

part_gpt() {
  compare gpt 0,1,2 kl depth.adaptive_eps=0.01,0.03,0.1 task=shakespeare_char_cpu depth=score
}

part_gnn() {
  compare gnn 0,1,2 state depth.adaptive_eps=0.1,0.2,0.3 experiment=paper_esol_gnn_cpu \
    depth=score025
}

part_small() {
  compare small 0 state depth.adaptive_eps=0.1,0.2,0.3 experiment=paper_esol_gnn_cpu \
    depth=score025 task.max_epochs=5 task.model.hidden=32
}

parts=("$@")
[ ${#parts[@]} -eq 0 ] && { echo "usage: $0 gpt|gnn|small|all ..."; exit 2; }
[ "${parts[0]}" = all ] && parts=(gpt gnn)
for p in "${parts[@]}"; do
  declare -F "part_$p" >/dev/null || { echo "unknown part: $p"; exit 2; }
  "part_$p"
done
