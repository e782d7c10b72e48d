# make run   set up .venv, bring up the local stack (S3 + MLflow on 127.0.0.1), run the pipeline DAG (kfp.local) on recipes/tiny.yaml
# make test  set up .venv, run the whole suite: unit, integration (real local services), e2e
# make fast  unit tests only (no services): quick feedback while editing
# make bench run every benchmark (each in its own process), write benchmarks/results/<date>.md/.json/.png (< 20 min)
# make lock  re-freeze constraints.txt from the current .venv after changing a pin in pyproject.toml

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RECIPE ?= recipes/tiny.yaml
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: run test fast bench lock stack-down clean

$(STAMP): pyproject.toml constraints.txt
	@free_kb=$$(df -Pk . | awk 'NR==2 {print $$4}'); [ "$$free_kb" -ge 9000000 ] || \
	  echo "warning: $$((free_kb / 1048576)) GiB free here; the environment needs about 8 GiB (torch's CUDA build)" >&2
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=25"
	# torch is named in the same command as everything that depends on it (otherwise pip may pick another torch build)
	$(BIN)/python -m pip install -c constraints.txt -e ".[test]"
	$(BIN)/python -m pip check
	touch $@

run: $(STAMP)
	$(BIN)/onevision run --recipe $(RECIPE)

test: $(STAMP)
	$(BIN)/python -m pytest tests --durations=15

fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not integration and not e2e"

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

lock:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v onevision > constraints.txt.new
	{ head -2 constraints.txt; cat constraints.txt.new; } > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt
	rm -f constraints.txt.new

stack-down:
	$(BIN)/onevision stack down

clean: stack-down
	rm -rf .onevision
