# Two entry points: `make run` (the main simulated experiment) and `make test`.
# Both create .venv and install the project first, with the exact versions of
# constraints.txt (the lock: what the suite passed with). On a machine without a GPU
# the CPU build of torch (on local disk) is installed before anything else so that no
# multi-GB CUDA build is ever pulled. `make lock` refreshes constraints.txt.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := constraints.txt
PIP_VERSION := 26.3
TORCH_CPU := 2.13.0

.PHONY: run test install clean bench lock

$(STAMP): pyproject.toml $(LOCK)
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q pip==$(PIP_VERSION)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q -c $(LOCK) torch
	$(BIN)/pip install -q -c $(LOCK) -e ".[test]"
	touch $(STAMP)

# The newest versions pyproject.toml's ranges admit (torch: the CPU build on disk),
# frozen into constraints.txt; run `make test` on the result before committing it.
lock:
	rm -rf .lock-venv && $(PY) -m venv .lock-venv
	.lock-venv/bin/pip install -q pip==$(PIP_VERSION)
	.lock-venv/bin/pip install -q torch==$(TORCH_CPU)
	.lock-venv/bin/pip install -q -e ".[test]"
	{ sed -n '/^#/p' $(LOCK); .lock-venv/bin/pip freeze --exclude-editable; } > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK)
	rm -rf .lock-venv

install: $(STAMP)

run: $(STAMP)
	$(BIN)/nectar run --out runs/main --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --timeout=900

clean:
	rm -rf $(VENV) runs .lock-venv
