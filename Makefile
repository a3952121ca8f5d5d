# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/main
SYNTH_PRODUCTS ?= 20000
SYNTH_IMPRESSIONS ?= 200000

.PHONY: test install install-test clean

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

test: install-test
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs *.egg-info .pytest_cache
