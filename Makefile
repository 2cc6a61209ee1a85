# slicebridge: every target does its own set-up; re-running reuses the envs.
#   make test    build both envs, run the test suite
#   make demo    build both envs, run the main job on a small embedded model
#   make bench   build both envs, run the benchmarks into bench/results/

PYTHON   ?= python3.11
ENVS     ?= .envs
BASE     := $(ENVS)/base
SLICEGPT := $(ENVS)/slicegpt
PIP      := pip install --quiet --disable-pip-version-check
PYTEST_ARGS ?=

export SLICEBRIDGE_TEST_SLICEGPT_ENV := $(abspath $(SLICEGPT))

.PHONY: envs test demo bench clean-envs

envs: $(BASE)/.ready $(SLICEGPT)/.ready

# The base env: the package installed editable, the latest transformers.
$(BASE)/.ready: requirements/base-env.txt pyproject.toml
	@echo "== base env: $(BASE)"
	test -x $(BASE)/bin/python || $(PYTHON) -m venv $(BASE)
	$(BASE)/bin/$(PIP) -r requirements/base-env.txt
	$(BASE)/bin/$(PIP) -e .
	touch $@

# The stand-in slicegpt env: a second interpreter with the official package's pins.
# slicebridge is NOT installed here: the server bootstraps its code in.
$(SLICEGPT)/.ready: requirements/slicegpt-env.txt
	@echo "== stand-in slicegpt env: $(SLICEGPT)"
	test -x $(SLICEGPT)/bin/python || $(PYTHON) -m venv $(SLICEGPT)
	$(SLICEGPT)/bin/$(PIP) -r requirements/slicegpt-env.txt
	touch $@

test: envs
	$(BASE)/bin/python -m pytest $(PYTEST_ARGS)

demo: envs
	$(BASE)/bin/python -m slicebridge.client.cli demo --env $(SLICEGPT)

bench: envs
	$(BASE)/bin/python bench/run.py --env $(SLICEGPT)

clean-envs:
	rm -rf $(ENVS)
