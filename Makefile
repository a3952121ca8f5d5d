# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/main
SYNTH_PRODUCTS ?= 20000
SYNTH_IMPRESSIONS ?= 200000

.PHONY: run test install install-test clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Re-install when setup.py changes.
$(VENV)/.installed: setup.py | $(VENV)/bin/activate
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: setup.py | $(VENV)/bin/activate
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The main job on the built-in synthetic marketplace. It grows with the package:
# for now it writes the data set, validates it and trains the smoke config.
run: install
	$(VENV)/bin/q2e synth --products $(SYNTH_PRODUCTS) --impressions $(SYNTH_IMPRESSIONS) --seed 0 --out $(RUN_DIR)/data
	$(VENV)/bin/q2e validate --config configs/default.yaml --data $(RUN_DIR)/data
	$(VENV)/bin/q2e train --config configs/smoke.yaml --data $(RUN_DIR)/data --out $(RUN_DIR)/train

test: install-test
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs *.egg-info .pytest_cache
