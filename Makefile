# The two commands a new user needs: `make demo` and `make test`. Both create .venv from pyproject.toml first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EXTRAS := notebooks,train,dev

.PHONY: demo test lint lab tour benchmark clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

tour: $(STAMP)
	$(PY) scripts/tour.py

test: $(STAMP) lint
	$(PY) -m pytest tests
	$(PY) -m pytest --nbval notebooks --nbval-sanitize-with notebooks/nbval_sanitize.cfg -p no:cacheprovider

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

benchmark: $(STAMP)
	$(PY) scripts/benchmark.py --models atlas_base_patch16 vit_base_patch16_224 --sizes 1024

clean:
	rm -rf $(VENV) results runs
