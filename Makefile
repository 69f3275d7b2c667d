# The two commands: `make run` (the whole pipeline on the embedded default) and `make test`.
# Each creates .venv when missing and (re)installs the package when pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test venv venv-dev clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -e ".[dev]"
	touch $@

venv: $(VENV)/.installed
venv-dev: $(VENV)/.installed-dev

run: venv
	$(PY) jobs/full_run.py $(ARGS)

# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
test: venv-dev
	$(PY) -m pytest -ra $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf outputs mlflow.db mlartifacts .pytest_cache
