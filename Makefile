# One command per task. `make demo` and `make test` install into .venv first when it is missing.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
SHARED_DATA := $(wildcard ../shared/data)
# Local data (../shared/data when it sits beside the checkout) unless PARTIAL_LORA_DATA is already set.
export PARTIAL_LORA_DATA ?= $(if $(SHARED_DATA),$(abspath $(SHARED_DATA)),)
ifeq ($(PARTIAL_LORA_DATA),)
unexport PARTIAL_LORA_DATA
endif

SCALE ?= paper        # paper (GPU clusters) or cpu (MiniLM and a reduced protocol, for CPUs)
LAUNCHER ?= local     # hydra/launcher: local, parallel (joblib) or slurm (submitit)
TABLES := table1 table2 table3 table4 table5 table6
FIGURES := fig2 fig3 fig4 fig5 fig6 fig7 fig11 fig12 fig17

.PHONY: install demo test test-all bench clean tables claims leaderboard $(TABLES) $(FIGURES)

$(PYTHON):
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install -e '.[test]'

install: $(PYTHON)

demo: $(PYTHON)
	$(PYTHON) run.py experiment=demo

# One test file per worker, one core each: most tests wait on a one-core subprocess, and test_readme's commands
# are planned per file.
test: $(PYTHON)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 $(PYTHON) -m pytest -m "not slow" -q -n auto --dist loadfile

test-all: $(PYTHON)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PYTHON) -m pytest -q

# Each target sweeps what its conf/experiment/<target>.yaml names (finished runs are skipped), then
# renders results/tables/<target>_<scale>.{md,tex} or results/figures/<target>_<scale>.png.
$(TABLES) $(FIGURES): $(PYTHON)
	$(PYTHON) scripts/reproduce.py $@ --scale $(strip $(SCALE)) --launcher $(strip $(LAUNCHER))

# Every table and figure from the records and caches present, the leaderboard, and results/README.md (every
# target's state at every scale); runs nothing.
tables: $(PYTHON)
	$(PYTHON) scripts/reproduce.py $(TABLES) $(FIGURES) leaderboard index --scale $(strip $(SCALE)) --render-only

# Per method and task: test metric with its 95% interval over seeds, parameters, adapter file size, step time, peak
# memory and the Pareto front, from the records of Table 6's and the claims' runs (make table6 / make claims run
# them): results/leaderboard_<scale>.{md,png}. Runs nothing.
leaderboard: $(PYTHON)
	$(PYTHON) scripts/reproduce.py leaderboard --scale $(strip $(SCALE)) --render-only

# The paper's claims as paired comparisons with verdicts: runs what is missing, then renders
# results/claims/claims_<scale>.{md,png} (conf/experiment/claims.yaml).
claims: $(PYTHON)
	$(PYTHON) scripts/reproduce.py claims --scale $(strip $(SCALE)) --launcher $(strip $(LAUNCHER))

# Masked adapters vs LoRA vs the frozen floor, and ratio derivation speed (MiniLM, SST-2, CPU): scripts/bench.py.
bench: $(PYTHON)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=. $(PYTHON) scripts/bench.py $(BENCH_ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
