# The two commands: `make run` (the whole pipeline on the embedded default) and `make test`.
# Each first installs the Debian packages it needs that are missing (scripts/system_deps.sh: as root, else it
# stops before the venv is built and prints the command), then creates .venv when missing and (re)installs the
# package when pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=
# pip keeps no copy of the wheels it downloads: the CUDA build of torch and its libraries are several GB, which a
# cache would double on disk (a CI machine once ran out of space installing them)
export PIP_NO_CACHE_DIR := 1
# test processes (pytest-xdist), each test file in one of them (its module fixtures, e.g. a cluster, made once):
# the waits of Ray / MLflow start-ups overlap; wall times in docs/results.md
TEST_WORKERS ?= 2

.PHONY: run pretrain test venv venv-dev sysdeps-run sysdeps-test clean

sysdeps-run:
	@scripts/system_deps.sh run

sysdeps-test:
	@scripts/system_deps.sh test

$(VENV)/.installed: pyproject.toml | sysdeps-run
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed | sysdeps-test
	$(PY) -m pip install -e ".[dev]"
	touch $@

venv: sysdeps-run $(VENV)/.installed
venv-dev: sysdeps-test $(VENV)/.installed-dev

run: venv
	$(PY) jobs/full_run.py $(ARGS)

# Pretrain the ViT on unlabelled camera images (stages ingest + pretrain; DINO by default); prints the path of the
# timm-layout backbone checkpoint to pass as --set features.weights=PATH --set teacher.weights=PATH.
# The shipped checkpoint (weights/) came from: make pretrain ARGS="--config configs/pretrain_mae.yaml"
pretrain: venv
	$(PY) jobs/pretrain.py $(ARGS)

# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
test: venv-dev
	$(PY) -m pytest -ra -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf outputs mlflow.db mlartifacts mlruns .pytest_cache  # mlruns: artifacts of stores made before they moved beside the db
