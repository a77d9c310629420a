# punchd developer entry points.  `make test` and `make demo` work on a fresh
# machine: they create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint typecheck unit demo bench clean

# The editable install puts the checkout on sys.path (pyproject.toml's
# dev-mode-dirs), which is how twistd finds twisted/plugins/punchd_plugins.py.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; import twisted.plugins; list(getPlugins(IPlugin, twisted.plugins))"
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check punchd netlab tests bench fuzz twisted/plugins
	$(BIN)/ruff format --check punchd netlab tests bench fuzz twisted/plugins

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck unit

demo: $(STAMP)
	$(BIN)/python -m netlab.demo

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) dist .mypy_cache .ruff_cache .pytest_cache

# Coverage-guided fuzzing (fuzz/): FUZZ_SECONDS per target, FUZZ_TARGETS to
# pick some (default: all).  atheris is installed here only: the test suite's
# slice of the campaign (tests/test_fuzz.py) runs without it.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?=

.PHONY: fuzz
fuzz: $(STAMP)
	$(BIN)/python -c "import atheris" 2>/dev/null || $(BIN)/python -m pip install -q 'atheris >= 2.3'
	$(BIN)/python -m fuzz.run --seconds $(FUZZ_SECONDS) $(FUZZ_TARGETS)
