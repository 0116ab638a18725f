# Two entry points: `make run` (the main simulated experiment) and `make test`.
# Both create .venv and install the project first. On a machine without a GPU the
# CPU build of torch (torch==2.13.0, on local disk) is installed before anything
# else so that no multi-GB CUDA build is ever pulled.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install clean bench

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/nectar run --out runs/main --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --timeout=900

clean:
	rm -rf $(VENV) runs
