# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Each sets everything up first (virtualenv, package, Fashion-MNIST), so either may run first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-slow bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)
	@bash scripts/install-fashion-mnist.sh

demo: setup
	$(BIN)/skipgrad demo $(DEMO_ARGS)

# pytest exits 5 when it collects nothing: that is a failure here, never a pass.
test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

test-slow: setup
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no slow tests: failing" >&2; exit 1; fi; exit $$rc

bench: setup
	$(BIN)/python benchmarks/sgm_overhead.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
