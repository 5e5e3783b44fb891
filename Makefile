# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv from requirements.lock when it is missing, and run fully offline.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ORACLE := .venv-oracle
ORACLE_STAMP := $(ORACLE)/.installed

export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HOME := $(CURDIR)/.cache/huggingface
export PREFECT_HOME := $(CURDIR)/.cache/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false
export MPLBACKEND := Agg

.PHONY: setup oracle browser demo test lint clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# FusionBench (fusion-bench on PyPI), the test oracle of tests/test_oracle_fusionbench.py: its pinned
# wheels go into a plain directory on top of .venv (no deps: torch and the rest come from .venv); only
# the oracle's subprocess puts it on its PYTHONPATH, never the test process. ~3 s, ~41 MB.
oracle: $(ORACLE_STAMP)

$(ORACLE_STAMP): requirements-oracle.lock $(STAMP)
	rm -rf $(ORACLE)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes --target $(ORACLE) -r requirements-oracle.lock
	touch $(ORACLE_STAMP)

demo: setup
	dvc repro
	@echo
	@cat metrics/results.md
	@echo
	-@$(PY) benchmarks/faithfulness.py --run demo=.
	@echo "Chosen hyperparameters: metrics/selection.json. Full report: reports/report.html (or reports/report.md)."

# The report test opens reports/report.html in headless Chromium (Debian's package).
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

test: setup oracle browser
	CATMERGE_REQUIRE_ORACLE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check catmerge stages flows tests

# Removes the artifacts; `dvc repro` then restores them from the DVC cache (.dvc/cache) where it can.
clean:
	rm -rf data .cache
