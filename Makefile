# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# torch first and pinned: on these machines 2.13.0 is a local CPU wheel.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,cuda,rpc]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m sige_export.demo

test: $(STAMP)
	$(PY) -m pytest -x -q --durations=15 tests

clean:
	rm -rf $(VENV) build *.egg-info
