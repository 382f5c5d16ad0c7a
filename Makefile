# Two entry points (README Quickstart). Each creates .venv on first use and installs exactly
# what the project needs, in the order that keeps pip from pulling a CUDA torch on CPU.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
PYTEST_ARGS ?=

.PHONY: env smoke test clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8 megatron-core==0.16.1
	$(BIN)/pip install -q --no-build-isolation -e '.[test]'
	touch $@

# The main job on the embedded default config (configs/smoke_cpu.yaml): 2 gloo processes.
smoke: env
	DS_ACCELERATOR=cpu $(BIN)/deepspeed --num_gpus 2 launchers/train.py $(ARGS)

# The whole test suite. pytest's exit code 5 (nothing collected, e.g. a marker filter that
# matches nothing) is reported and passed through as success. Two pytest-xdist workers, one
# test file each at a time (a file's multi-process checks and fixtures stay together): the
# launchers' single-process start-up and the unit tests leave a core idle that the other
# worker fills (measured: 967 s against 1159 s in one process). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: env
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25 $(PYTEST_ARGS) \
	  tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; rc=0; fi; exit $$rc

clean:
	rm -rf $(VENV) runs
