#!/usr/bin/env bash
# The "depth as a dial" measurements on a 2-core CPU (issue 12): each part is a plain CLI command,
# so any figure of docs/depth.md can be re-made. Parts: ancre | fp_memory | fixed_point |
# fixed_point_implicit | gnn_deep | equal_time | gpt_equal_time | gpt_dial | gpt_fixed_point |
# gpt_fixed_point_implicit | gpt_deep | gpt_halting | all. Runs go to multirun/dial/<part>/ (finished runs are skipped on a re-run), bench
# JSON to outputs/dial/. Benchmarks (ancre, fp_memory) need a quiet machine.
#
#   scripts/measure_depth_dial.sh ancre fp_memory
#   scripts/measure_depth_dial.sh fixed_point equal_time gpt_dial
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
JOBS=${JOBS:-2}
SWEEP=(hydra/launcher=joblib "hydra.launcher.n_jobs=$JOBS" trainer.enable_progress_bar=false)
mkdir -p outputs/dial

part_ancre() {  # ANCRe's cost over the chain, interleaved in one process (nanoGPT CPU preset)
  $BIN/score-bench --task shakespeare_char_cpu --depth score --repeats 9 --warmup 5 \
    --steps-per-repeat 10 --variant softmax depth.connect=ancre \
    --variant residual depth.connect=ancre depth.ancre_param=residual --json outputs/dial/ancre.json
}

part_fp_memory() {  # training memory of the fixed-point solver against its iterations (tol 1e-12:
  # every iteration runs), beside unrolled SCORE at the same counts
  $BIN/score-bench --task shakespeare_char_cpu --depth score --repeats 2 --warmup 1 \
    --steps-per-repeat 2 --override depth.inject=add \
    --variant fp4 depth.solver=fixed_point depth.solver_tol=1e-12 depth.solver_max_iter=4 \
    --variant fp16 depth.solver=fixed_point depth.solver_tol=1e-12 depth.solver_max_iter=16 \
    --variant fp32 depth.solver=fixed_point depth.solver_tol=1e-12 depth.solver_max_iter=32 \
    --variant fp32_implicit depth.solver=fixed_point depth.solver_tol=1e-12 depth.solver_max_iter=32 \
    depth.solver_grad=implicit \
    --variant unroll16 depth.steps=16 --variant unroll32 depth.steps=32 \
    --json outputs/dial/fp_memory.json
}

part_fixed_point() {  # metric of the fixed-point solver (at most 8 evaluations + the gradient
  # step) against unrolled SCORE at 4 and 8 steps, same budget as paper_esol_gnn_cpu / _shakespeare_cpu
  OMP_NUM_THREADS=1 $BIN/score-train -m experiment=paper_esol_gnn_cpu depth=score025 \
    depth.inject=add depth.solver=fixed_point depth.solver_max_iter=8 seed=0,1,2 "${SWEEP[@]}" \
    hydra.sweep.dir=multirun/dial/fixed_point/gnn_fp
  OMP_NUM_THREADS=1 $BIN/score-train -m experiment=paper_esol_gnn_cpu depth=score025 \
    depth.steps=8 seed=0,1,2 "${SWEEP[@]}" hydra.sweep.dir=multirun/dial/fixed_point/gnn_unroll8
  OMP_NUM_THREADS=1 $BIN/score-train -m experiment=paper_esol_gnn_cpu depth=score025 \
    seed=0,1,2 "${SWEEP[@]}" hydra.sweep.dir=multirun/dial/fixed_point/gnn_unroll4
  for d in multirun/dial/fixed_point/gnn_fp/*/; do  # the evaluations actually spent
    if [ -f "$d/results.json" ]; then $BIN/score-eval "$(run_dir "$d")"; fi
  done
}

part_fixed_point_implicit() {  # as fixed_point's solver runs, with DEQ's implicit gradient
  OMP_NUM_THREADS=1 $BIN/score-train -m experiment=paper_esol_gnn_cpu depth=score025 \
    depth.inject=add depth.solver=fixed_point depth.solver_max_iter=8 depth.solver_grad=implicit \
    seed=0,1,2 "${SWEEP[@]}" hydra.sweep.dir=multirun/dial/fixed_point/gnn_fp_implicit
  for d in multirun/dial/fixed_point/gnn_fp_implicit/*/; do
    if [ -f "$d/results.json" ]; then $BIN/score-eval "$(run_dir "$d")"; fi
  done
}

part_equal_time() {  # random-depth training against fixed 4-step SCORE for the same wall time
  local budget=(task.max_epochs=10000 task.early_stopping_patience=10000 +trainer.max_time=00:00:02:00)
  OMP_NUM_THREADS=1 $BIN/score-train -m experiment=paper_esol_gnn_cpu depth=score025 seed=0,1,2 \
    "${budget[@]}" "${SWEEP[@]}" hydra.sweep.dir=multirun/dial/equal_time/fixed
  OMP_NUM_THREADS=1 $BIN/score-train -m experiment=paper_esol_gnn_cpu depth=score025 seed=0,1,2 \
    depth.inject=add "depth.train_steps='uniform:2,8'" "${budget[@]}" "${SWEEP[@]}" \
    hydra.sweep.dir=multirun/dial/equal_time/random
  for d in multirun/dial/equal_time/*/*/; do
    if [ -f "$d/results.json" ]; then $BIN/score-eval "$(run_dir "$d")" depth.steps=4,8,16 depth.keep_horizon=false; fi
  done
}

part_gnn_deep() {  # ESOL-GNN: gpt_deep's deeper draws (2..16, gradients through the last 4)
  OMP_NUM_THREADS=1 $BIN/score-train -m experiment=paper_esol_gnn_cpu depth=score025 seed=0,1,2 \
    depth.inject=add "depth.train_steps='uniform:2,16'" depth.backprop_steps=4 "${SWEEP[@]}" \
    hydra.sweep.dir=multirun/dial/fixed_point/gnn_deep
  for d in multirun/dial/fixed_point/gnn_deep/*/; do
    if [ -f "$d/results.json" ]; then $BIN/score-eval "$(run_dir "$d")" depth.steps=4,8,16 depth.keep_horizon=false; fi
  done
  for d in multirun/dial/fixed_point/gnn_unroll4/*/; do  # the fixed-step baseline's dial
    if [ -f "$d/results.json" ] && [ ! -f "$d/eval.csv" ]; then
      $BIN/score-eval "$(run_dir "$d")" depth.steps=4,8,16 depth.keep_horizon=false
    fi
  done
}

part_gpt_equal_time() {  # nanoGPT: random depth (uniform:2,8: 5 steps on average) for 1600
  # iterations against fixed 4 steps for 2000: the same evaluations of F; two sweeps of the same
  # shape run one after the other on a quiet machine, so their wall times compare
  OMP_NUM_THREADS=1 $BIN/score-train -m task=shakespeare_char_cpu depth=score seed=0,1,2 \
    "${SWEEP[@]}" hydra.sweep.dir=multirun/dial/gpt_equal_time/fixed
  OMP_NUM_THREADS=1 $BIN/score-train -m task=shakespeare_char_cpu depth=score seed=0,1,2 \
    depth.inject=add "depth.train_steps='uniform:2,8'" task.max_steps=1600 "${SWEEP[@]}" \
    hydra.sweep.dir=multirun/dial/gpt_equal_time/random
}

part_gpt_dial() {  # nanoGPT CPU preset, fixed vs random depth, then 1x / 2x / 4x the steps
  OMP_NUM_THREADS=1 $BIN/score-train -m task=shakespeare_char_cpu depth=score seed=0,1,2 \
    "${SWEEP[@]}" hydra.sweep.dir=multirun/dial/gpt/fixed
  OMP_NUM_THREADS=1 $BIN/score-train -m task=shakespeare_char_cpu depth=score seed=0,1,2 \
    depth.inject=add "depth.train_steps='uniform:2,8'" "${SWEEP[@]}" \
    hydra.sweep.dir=multirun/dial/gpt/random
  for d in multirun/dial/gpt/*/*/; do
    if [ -f "$d/results.json" ]; then $BIN/score-eval "$(run_dir "$d")" depth.steps=4,8,16 depth.keep_horizon=false; fi
  done
}

part_gpt_fixed_point() {  # nanoGPT CPU preset: the fixed-point solver at 3 iterations + the
  # gradient step = 4 evaluations, as unrolled SCORE's 4 steps (gpt_dial's fixed runs)
  OMP_NUM_THREADS=1 $BIN/score-train -m task=shakespeare_char_cpu depth=score seed=0,1,2 \
    depth.inject=add depth.solver=fixed_point depth.solver_max_iter=3 "${SWEEP[@]}" \
    hydra.sweep.dir=multirun/dial/gpt/fixed_point
  for d in multirun/dial/gpt/fixed_point/*/; do
    if [ -f "$d/results.json" ]; then $BIN/score-eval "$(run_dir "$d")"; fi
  done
}

part_gpt_fixed_point_implicit() {  # gpt_fixed_point with DEQ's implicit gradient
  OMP_NUM_THREADS=1 $BIN/score-train -m task=shakespeare_char_cpu depth=score seed=0,1,2 \
    depth.inject=add depth.solver=fixed_point depth.solver_max_iter=3 depth.solver_grad=implicit \
    "${SWEEP[@]}" hydra.sweep.dir=multirun/dial/gpt/fixed_point_implicit
  for d in multirun/dial/gpt/fixed_point_implicit/*/; do
    if [ -f "$d/results.json" ]; then $BIN/score-eval "$(run_dir "$d")"; fi
  done
}

part_gpt_deep() {  # nanoGPT CPU preset: Huginn-style deeper draws (2..16 steps) with gradients
  # through the last 4 only, evaluated at 4 / 8 / 16 steps
  OMP_NUM_THREADS=1 $BIN/score-train -m task=shakespeare_char_cpu depth=score seed=0,1,2 \
    depth.inject=add "depth.train_steps='uniform:2,16'" depth.backprop_steps=4 "${SWEEP[@]}" \
    hydra.sweep.dir=multirun/dial/gpt/deep
  for d in multirun/dial/gpt/deep/*/; do
    if [ -f "$d/results.json" ]; then $BIN/score-eval "$(run_dir "$d")" depth.steps=4,8,16 depth.keep_horizon=false; fi
  done
}

part_gpt_halting() {  # per-sequence halting of the random-depth models (KL between successive
  # next-token distributions, Huginn's criterion), bounded by 8 and 16 steps
  for d in multirun/dial/gpt/random/*/ multirun/dial/gpt/deep/*/; do
    if [ -f "$d/results.json" ]; then
      $BIN/score-eval "$(run_dir "$d")" depth.steps=8,16 depth.keep_horizon=false depth.halt=kl \
        depth.adaptive_eps=0.01,0.03,0.1
    fi
  done
}

# A run folder as a score-eval override: quoted for Hydra, its own quotes escaped (folders of
# runs with "depth.train_steps='uniform:2,8'" hold them).
run_dir() { local d=${1%/}; printf "run_dir='%s'" "${d//\'/\\\'}"; }

parts=("$@")
[ ${#parts[@]} -eq 0 ] && { echo "usage: $0 ancre|fp_memory|fixed_point|fixed_point_implicit|gnn_deep|equal_time|gpt_equal_time|gpt_dial|gpt_fixed_point|gpt_fixed_point_implicit|gpt_deep|gpt_halting|all ..."; exit 2; }
[ "${parts[0]}" = all ] && parts=(ancre fp_memory fixed_point fixed_point_implicit gnn_deep equal_time gpt_equal_time
  gpt_dial gpt_fixed_point gpt_fixed_point_implicit gpt_deep gpt_halting)
for p in "${parts[@]}"; do
  echo "== $p ($(date +%T))"
  "part_$p"
done
