# make run   set up .venv, bring up the local stack (S3 + MLflow on 127.0.0.1), run the pipeline DAG (kfp.local) on recipes/tiny.yaml
#            (RUN_FLAGS="--s3-port P --mlflow-port Q" moves the stack off 8333-8342 and 5000)
# make test  set up .venv, run the whole suite: unit, integration (real local services), e2e
# make fast  unit tests only (no services): quick feedback while editing
# make bench run every benchmark (each in its own process), write benchmarks/results/<date>.md/.json/.png (< 20 min)
# make lock  re-freeze constraints.txt from the current .venv after changing a pin in pyproject.toml

# Python 3.11 only (pyproject.toml: requires-python >=3.11,<3.12): python3.11 on PATH, else a 3.11 that uv
# manages (`uv python find`), else python3, which python-check refuses unless it is 3.11.
PYTHON ?= $(or $(shell command -v python3.11 || uv python find 3.11 2>/dev/null || command -v python3),python3.11)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RECIPE ?= recipes/tiny.yaml
RUN_FLAGS ?=   # e.g. make run RUN_FLAGS="--mlflow-port 5001 --s3-port 9333" when 5000 or 8333 is taken
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: run test fast bench lock stack-down clean python-check

# Stops at once, naming the Python it found, instead of pip failing minutes later on requires-python.
PY311 := import sys; sys.exit(sys.version_info[:2] != (3, 11))
python-check:
	@if [ -x $(BIN)/python ]; then \
	  $(BIN)/python -c '$(PY311)' || { echo "error: $(VENV) was made with $$($(BIN)/python --version 2>&1), the project needs Python 3.11: rm -rf $(VENV) and rerun" >&2; exit 1; }; \
	else \
	  "$(PYTHON)" -c '$(PY311)' 2>/dev/null || { \
	    echo "error: the project needs Python 3.11 (pyproject.toml: requires-python >=3.11,<3.12); PYTHON=$(PYTHON) is $$("$(PYTHON)" --version 2>/dev/null || echo 'not found')" >&2; \
	    echo "  install one (for example: pip install uv && uv python install 3.11), then: make PYTHON=\$$(uv python find 3.11) $(MAKECMDGOALS)" >&2; \
	    exit 1; }; \
	fi

$(STAMP): pyproject.toml constraints.txt | python-check
	@free_kb=$$(df -Pk . | awk 'NR==2 {print $$4}'); [ "$$free_kb" -ge 9000000 ] || \
	  echo "warning: $$((free_kb / 1048576)) GiB free here; the environment needs about 8 GiB (torch's CUDA build)" >&2
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=25"
	# torch is named in the same command as everything that depends on it (otherwise pip may pick another torch build)
	$(BIN)/python -m pip install -c constraints.txt -e ".[test]"
	$(BIN)/python -m pip check
	touch $@

run: $(STAMP)
	$(BIN)/onevision run --recipe $(RECIPE) $(RUN_FLAGS)

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
