# The two front-door commands: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip
# CPU machines get the local CPU build of torch first, so nothing pulls multi-gigabyte CUDA wheels.
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test install install-test benchmarks docker clean gpu-wheels gpu-check

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

docker:
	docker build -t megatron-papo:latest .

# The prepared GPU check (tools/gpu_check.py). gpu-wheels (where pip reaches the registry) downloads megatron-core
# and the Python dependencies into .gpu_wheels/; gpu-check (on the GPU machine, whose python3 has torch) installs
# from there without an index, taking what the machine already has, then runs the check.
GPU_PYTHON ?= python3
GPU_CORE_REQS := megatron-core==0.16.1 numpy pyyaml pillow psutil safetensors sentencepiece tqdm webdataset \
                 mathruler==0.1.0 pylatexenc
gpu-wheels:
	tools/gpu_wheels.sh

gpu-check:
	@if [ -d .gpu_wheels ]; then \
	  $(GPU_PYTHON) -m pip install -q --no-index --find-links .gpu_wheels $(GPU_CORE_REQS) && \
	  { $(GPU_PYTHON) -m pip install -q --no-index --find-links .gpu_wheels "transformers>=5.0,<6" || \
	    echo "transformers not installable here: section 2 will fail"; }; \
	fi
	PYTHONPATH=$(CURDIR) PYTHONUNBUFFERED=1 $(GPU_PYTHON) tools/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
