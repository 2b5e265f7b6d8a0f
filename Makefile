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

# pytest-xdist: one worker per core (JOBS=0 runs the suite in this process), each with its share
# of the cores' threads; a file's tests run in one worker, the Ray tests' files all in one
# (tests/conftest.py)
JOBS ?= auto
PYTEST := $(BIN)/python -m pytest -n $(JOBS) --dist loadfile

test: lint
	$(PYTEST) --durations=10

# the development loop: every test but the end-to-end studies (marked slow), in a few minutes
test-fast: lint
	$(PYTEST) -m "not slow" -q

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
