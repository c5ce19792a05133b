# One command per task. `make demo` and `make test` install into .venv first when it is missing.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
SHARED_DATA := $(wildcard ../shared/data)
# Local data (../shared/data when it sits beside the checkout) unless PARTIAL_LORA_DATA is already set.
export PARTIAL_LORA_DATA ?= $(if $(SHARED_DATA),$(abspath $(SHARED_DATA)),)
ifeq ($(PARTIAL_LORA_DATA),)
unexport PARTIAL_LORA_DATA
endif

.PHONY: install demo test test-all bench clean

$(PYTHON):
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install -e '.[test]'

install: $(PYTHON)

demo: $(PYTHON)
	$(PYTHON) run.py experiment=demo

test: $(PYTHON)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PYTHON) -m pytest -m "not slow" -q

test-all: $(PYTHON)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PYTHON) -m pytest -q

# Masked adapters vs LoRA vs the frozen floor, and ratio derivation speed (MiniLM, SST-2, CPU): scripts/bench.py.
bench: $(PYTHON)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=. $(PYTHON) scripts/bench.py $(BENCH_ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
