# The two front-door commands: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip
# CPU machines get the local CPU build of torch first, so nothing pulls multi-gigabyte CUDA wheels.
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test install install-test benchmarks docker clean

$(VENV)/.created:
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PIP) install -q --upgrade pip
	@if $(VPY) -c "import torch" 2>/dev/null; then \
	  echo "using the torch already installed: $$($(VPY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "GPU machine: torch comes with the package requirements"; \
	else \
	  echo "CPU machine: installing $(TORCH_CPU) first"; $(PIP) install -q "$(TORCH_CPU)"; \
	fi
	touch $@

$(VENV)/.installed: $(VENV)/.created setup.py
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed setup.py
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(VENV)/bin/megatron-papo train

test: $(VENV)/.installed-test
	$(VPY) -m pytest -q $(PYTEST_ARGS) tests

benchmarks: $(VENV)/.installed-test
	$(VPY) benchmarks/ops_memory.py
	$(VPY) benchmarks/rollout_throughput.py
	$(VPY) benchmarks/papo_overhead.py
	$(VPY) benchmarks/packing.py

docker:
	docker build -t megatron-papo:latest .

clean:
	rm -rf $(VENV) runs .pytest_cache
