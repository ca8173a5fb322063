# score_exp — the two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Offline data: read the byte-exact mirror beside the checkout when it exists and nothing else was set.
ifeq ($(origin SCORE_DATA_MIRROR), undefined)
ifneq ($(wildcard ../shared/data),)
export SCORE_DATA_MIRROR := $(abspath ../shared/data)
endif
endif
# Runs never prompt for a W&B login and never hang on the network.
export WANDB_SILENT ?= true

ARGS ?=

.PHONY: help venv run test test-fast lint format clean clean-data reproduce-cpu reproduce tune-cpu tune \
	gpu-check claims-datasets-cpu tune-gnn-cpu test-cluster results results-page verify-results

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  (ARGS='...' passes Hydra overrides to make run, e.g. ARGS='depth=stacked seed=1')"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

venv: $(STAMP)  ## create .venv and install the project (pip, torch pinned to 2.13.0)

run: $(STAMP)  ## train the default experiment (MLP on ESOL, depth=score) on CPU
	$(BIN)/score-train $(ARGS)

# Tests run in TEST_JOBS processes (pytest-xdist; `TEST_JOBS=0` runs them in this one), each
# taking whole files, the heaviest first (tests/conftest.py: HEAVIEST_FIRST).
TEST_JOBS ?= auto
TEST_DIST := --dist loadfile --no-loadscope-reorder

test: $(STAMP)  ## run the whole test suite (but the Slurm tests: make test-cluster)
	$(BIN)/python -m pytest -n $(TEST_JOBS) $(TEST_DIST) -m "not slurm" $(ARGS)

test-fast: $(STAMP)  ## tests without the slow (training) ones
	$(BIN)/python -m pytest -n $(TEST_JOBS) $(TEST_DIST) -m "not slow and not slurm" $(ARGS)

# Real Slurm clusters on this machine (need root; slurm-wlm + munge installed when missing): one
# node (scripts/slurm_local.sh) and two nodes in namespaces on a bridge (scripts/slurm_two_nodes.sh),
# the Slurm tests against them (one process: the jobs share the machine; tests/test_slurm.py, then
# tests/test_slurm_two_nodes.py), then both clusters stopped, whatever the tests did.
test-cluster: $(STAMP)  ## start local 1- and 2-node Slurm clusters, run the cluster tests (pytest -m slurm), stop them
	@trap 'scripts/slurm_local.sh down; scripts/slurm_two_nodes.sh down' EXIT; \
	scripts/slurm_local.sh up || echo "make test-cluster: Slurm did not start (the tests say so)"; \
	scripts/slurm_two_nodes.sh up || echo "make test-cluster: the two-node Slurm did not start (the tests say so)"; \
	SLURM_CONF=$$(scripts/slurm_local.sh conf) SLURM_TWO_NODES_CONF=$$(scripts/slurm_two_nodes.sh conf) \
	  $(BIN)/python -m pytest -n 0 -m slurm $(ARGS)

gpu-check: $(STAMP)  ## on a GPU machine: CUDA tests, nanoGPT GPU preset, score-bench, DDP -> outputs/gpu_check/
	$(BIN)/python -m score_exp.bench.gpu_check $(ARGS)

lint: $(STAMP)  ## ruff check + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)  ## ruff fix + format
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The paper's sweeps (configs/experiment/paper_*.yaml) and their report. Finished runs are
# skipped and interrupted ones resume, so re-running after a crash only does what is left.
REPRO_CPU := paper_esol_mlp_cpu paper_esol_gnn_cpu paper_shakespeare_cpu paper_integrators_cpu paper_dt_cpu \
	claims_esol_gnn_deep_cpu claims_esol_gnn_deep_skip_cpu
REPRO_GPU := paper_esol_mlp paper_esol_gnn paper_shakespeare paper_integrators paper_dt \
	claims_esol_gnn_deep claims_esol_gnn_deep_skip
JOBS ?= 2

# $(call sweeps_cpu,EXPERIMENTS,FOLDER): each experiment's sweep into FOLDER/<experiment> (JOBS
# parallel runs, 1 thread each), then the report of FOLDER and the wall time.
define sweeps_cpu
	@failed=""; start=$$(date +%s); for e in $(1); do \
	  echo "== $$e"; \
	  OMP_NUM_THREADS=1 $(BIN)/score-train -m experiment=$$e hydra/launcher=joblib \
	    hydra.launcher.n_jobs=$(JOBS) trainer.enable_progress_bar=false \
	    hydra.sweep.dir=$(2)/$$e $(ARGS) || failed="$$failed $$e"; \
	done; \
	$(BIN)/score-report $(2) || exit $$?; \
	echo "$@: $$(( ($$(date +%s) - start) / 60 )) min"; \
	if [ -n "$$failed" ]; then echo "sweeps with failed runs:$$failed (see the report)"; exit 1; fi
endef

reproduce-cpu: $(STAMP)  ## reduced paper sweeps + report on a CPU (JOBS parallel runs, 1 thread each)
	$(call sweeps_cpu,$(REPRO_CPU),multirun/reproduce_cpu)

# The claims on three MoleculeNet sets: MLP and GNN (score, stacked x 10 paired seeds; PyG's
# AttentiveFP as the peer at its own published settings and at our batch = the same gradient
# steps), and on the MLP the integrator, dt x steps and depth grids (5 seeds); claims.md sums every
# claim up across ESOL, FreeSolv and Lipophilicity. Every run trains to early stopping in portable
# numerics (numerics=portable, set by the experiment files: the same bits on any x86-64 CPU).
CLAIMS_DATASETS_CPU := claims_moleculenet_mlp_cpu claims_moleculenet_gnn_cpu \
	claims_moleculenet_gnn_reference_cpu claims_moleculenet_gnn_equal_steps_cpu \
	claims_moleculenet_integrators_mlp_cpu claims_moleculenet_dt_mlp_cpu claims_moleculenet_deep_mlp_cpu

claims-datasets-cpu: $(STAMP)  ## every claim on ESOL, FreeSolv, Lipophilicity (MLP, GNN, AttentiveFP; MLP grids; portable numerics; hours on 2 cores) + report
	$(call sweeps_cpu,$(CLAIMS_DATASETS_CPU),multirun/claims_datasets_cpu)

reproduce: $(STAMP)  ## the full paper sweeps + report (GPU-sized; add ARGS='hydra/launcher=slurm ...')
	@failed=""; for e in $(REPRO_GPU); do \
	  echo "== $$e"; \
	  $(BIN)/score-train -m experiment=$$e hydra.sweep.dir=multirun/reproduce/$$e $(ARGS) || failed="$$failed $$e"; \
	done; \
	$(BIN)/score-report multirun/reproduce || exit $$?; \
	if [ -n "$$failed" ]; then echo "sweeps with failed runs:$$failed (see the report)"; exit 1; fi

# Tuning: one Optuna study per depth variant (score-tune study: same trial budget, best val metric;
# SQLite in the study folder, so re-running resumes; JOBS trials at a time, threads of one process
# on that one SQLite file), repeated for every study seed in STUDY_SEEDS (the TPE
# sampler's seed), then each study's best configuration over SEEDS seeds (stage 2, experiment
# tuned_<task>_study<k>) and the report of those runs: paired statistics and claims per study and
# pooled across the study seeds (a verdict only when every study agrees). CPU-sized: the MLP task
# (tune-cpu) or the GNN (tune-gnn-cpu: TUNE_TASK=esol_gnn, SCORE = score025 and stacked).
TUNE_VARIANTS ?= score stacked stacked_plain skip05
TUNE_TASK ?= esol_mlp
# Peers tuned beside the variants with the same budget (experiment tune_<dataset>_<peer>_cpu),
# re-trained and reported in the same experiment: tune-gnn-cpu tunes AttentiveFP.
TUNE_PEERS ?=
STUDY_SEEDS ?= 0 1 2
SEEDS ?= 5
TUNE_DIR ?= multirun/tune_cpu/$(TUNE_TASK)
# make tune: trials at a time (one GPU shared by the trials' processes).
TUNE_JOBS ?= 1

tune-cpu: $(STAMP)  ## tune each depth variant (Optuna, CPU budget) x 3 study seeds, re-train the bests over 5 seeds, report
	@start=$$(date +%s); for k in $(STUDY_SEEDS); do for v in $(TUNE_VARIANTS); do \
	  echo "== study $(TUNE_TASK) / study seed $$k / $$v"; \
	  OMP_NUM_THREADS=1 $(BIN)/score-tune study experiment=tune_$(TUNE_TASK)_cpu depth=$$v \
	    --seed $$k --jobs $(JOBS) --dir $(TUNE_DIR)/study$$k/$$v $(ARGS) || exit $$?; \
	done; \
	for p in $(TUNE_PEERS); do \
	  echo "== study $(TUNE_TASK) / study seed $$k / peer $$p"; \
	  OMP_NUM_THREADS=1 $(BIN)/score-tune study experiment=tune_$(subst _gnn,,$(TUNE_TASK))_$${p}_cpu \
	    --seed $$k --jobs $(JOBS) --dir $(TUNE_DIR)/study$$k/$$p $(ARGS) || exit $$?; \
	done; \
	OMP_NUM_THREADS=1 $(BIN)/score-tune retrain --out $(TUNE_DIR)/retrain/study$$k \
	  --study-seed $$k --seeds $(SEEDS) --jobs $(JOBS) --name tuned_$(TUNE_TASK)_cpu $(TUNE_DIR)/study$$k \
	  $(if $(RETRAIN_ARGS),-- $(RETRAIN_ARGS)) || exit $$?; \
	done; \
	$(BIN)/score-report $(TUNE_DIR)/retrain || exit $$?; \
	echo "$@ ($(TUNE_TASK)): $$(( ($$(date +%s) - start) / 60 )) min"

tune-gnn-cpu: $(STAMP)  ## the same for the ESOL GNN (score025, stacked and the peer AttentiveFP; tune_esol_gnn_cpu's budget)
	$(MAKE) tune-cpu TUNE_TASK=esol_gnn TUNE_VARIANTS="$(if $(filter command line,$(origin TUNE_VARIANTS)),$(TUNE_VARIANTS),score025 stacked)" \
	  TUNE_PEERS="$(if $(filter command line,$(origin TUNE_PEERS)),$(TUNE_PEERS),attentivefp)"

# Published results: the report of claims-datasets-cpu's runs (and of the tune-cpu studies when
# present, in docs/results/tune_<task>/) as a committed snapshot with its provenance; the headline
# blocks (the README's short form, docs/reproducing.md's in full) are rewritten from it, then every
# table is re-rendered from runs.json and compared.
RESULTS_RUNS ?= multirun/claims_datasets_cpu
RESULTS_TUNE ?= $(wildcard multirun/tune_cpu/*/retrain)
RESULTS_DIR ?= docs/results
RESULTS_README ?= README.md
RESULTS_PAGE ?= docs/reproducing.md

# Refused when a run was trained on a tree with uncommitted changes (git '-dirty') or outside the
# portable numerics mode: ALLOW_UNPUBLISHABLE=1 publishes them anyway, marked in PROVENANCE.md.
results: $(STAMP)  ## publish docs/results/ (report, claims, plots, index.html, runs.csv + PROVENANCE.md) from claims-datasets-cpu's runs
	$(BIN)/python -m score_exp.report.snapshot $(RESULTS_RUNS) --tune $(RESULTS_TUNE) \
	  --out $(RESULTS_DIR) --readme $(RESULTS_README) \
	  --page $(RESULTS_PAGE) $(if $(WALL),--wall "$(WALL)") \
	  $(if $(ALLOW_UNPUBLISHABLE),--allow-unpublishable) $(if $(TUNE_WALL),--tune-wall "$(TUNE_WALL)") \
	  --train-command "make claims-datasets-cpu" --tune-train-command "make tune-cpu; make tune-gnn-cpu" \
	  --command "make results RESULTS_RUNS='$(RESULTS_RUNS)' RESULTS_TUNE='$(RESULTS_TUNE)'"
	$(BIN)/python -m score_exp.report.snapshot --check --out $(RESULTS_DIR)

# Re-train a sample of the published runs (2 per experiment and task, the quickest, within about
# 8 min of single-thread training run 2 at a time) and compare the bits with runs.json: exit 1 on any
# difference, 2 when the snapshot holds runs made outside the portable mode.
verify-results: $(STAMP)  ## re-train a sample of docs/results/'s runs here and check they give the same bits
	$(BIN)/python -m score_exp.runs.verify $(RESULTS_DIR) --jobs $(JOBS) $(ARGS)

# The committed snapshot re-rendered by the current report code from its own runs.json files (no
# run folder, nothing trained): tables, plots, headline and the page docs/results/index.html.
results-page: $(STAMP)  ## re-render docs/results/ (tables, plots, index.html) from its runs.json, then check it
	$(BIN)/python -m score_exp.report.rerender --out $(RESULTS_DIR) \
	  --readme $(RESULTS_README) --page $(RESULTS_PAGE)
	$(BIN)/python -m score_exp.report.snapshot --check --out $(RESULTS_DIR)

tune: $(STAMP)  ## the GPU-sized studies (MLP and GNN + the peer AttentiveFP, 40 trials each) + re-training + report
	@for t in esol_mlp esol_gnn; do \
	  vs="$(TUNE_VARIANTS)"; [ $$t = esol_gnn ] && vs=$${vs/score /score025 }; \
	  for v in $$vs; do \
	    $(BIN)/score-tune study experiment=tune_$$t depth=$$v --jobs $(TUNE_JOBS) \
	      --dir multirun/tune/$$t/$$v $(ARGS) || exit $$?; \
	  done; \
	  if [ $$t = esol_gnn ]; then \
	    $(BIN)/score-tune study experiment=tune_esol_attentivefp --jobs $(TUNE_JOBS) \
	      --dir multirun/tune/$$t/attentivefp $(ARGS) || exit $$?; \
	  fi; \
	  $(BIN)/score-tune retrain multirun/tune/$$t --seeds $(SEEDS) --name tuned_$$t || exit $$?; \
	  $(BIN)/score-report multirun/tune/$$t/retrain || exit $$?; \
	done

clean:  ## remove caches and run outputs (keeps .venv and data/)
	rm -rf outputs multirun lightning_logs wandb .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +

clean-data:  ## empty the data cache (data/)
	find data -mindepth 1 -not -name README.md -exec rm -rf {} +
