# Two commands: `make demo` and `make test`. Each builds .venv from requirements.lock first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lock clean venv

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/retrain demo

test: $(STAMP)
	OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q

bench: $(STAMP)
	cd bench && for b in [a-z]*.py; do ../$(BIN)/python $$b --json || exit 1; done

# Regenerate the lock file (needs `uv` on PATH; only maintainers run this).
lock:
	uv pip compile pyproject.toml --extra test --extra sql --python-version 3.11 --generate-hashes -o requirements.lock

clean:
	rm -rf $(VENV) .retrain .pytest_cache
