# Two commands on a fresh machine: `make demo` and `make test` (both create .venv when missing).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint format bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dubito label --output runs/demo

test: lint
	$(BIN)/python -m pytest --durations=10

# the development loop: every test but the end-to-end studies (marked slow), in a few minutes
test-fast: lint
	$(BIN)/python -m pytest -m "not slow" -q

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[bench]'
	$(BIN)/python -m benchmarks.mc speed
	$(BIN)/python -m benchmarks.mc memory
	$(BIN)/python -m benchmarks.mc_chunking
	$(BIN)/python -m benchmarks.data_loading
	$(BIN)/python -m benchmarks.ray_scoring

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
