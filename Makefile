# The two commands a new user needs: `make demo` and `make test`. Both create .venv from pyproject.toml first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EXTRAS := notebooks,train,dev

# `make test-portable` runs the notebooks under another CPU kernel family than this machine's: AVX2 on a CPU with
# AVX-512 (what an AMD EPYC user gets), the generic kernels on one without. CI runs `make test` only.
AVX512 := $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo yes)
PORTABLE_ENV := $(if $(AVX512),ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2,ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41)
NBVAL := -m pytest --nbval notebooks --nbval-current-env --nbval-sanitize-with notebooks/nbval_sanitize.cfg -p no:cacheprovider

.PHONY: demo test test-portable lint lab tour benchmark gpu-check paper-speed clean

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
	$(PY) $(NBVAL)

test-portable: $(STAMP)
	$(PORTABLE_ENV) $(PY) -c "import torch; print('CPU kernels:', torch.backends.cpu.get_cpu_capability())"
	$(PORTABLE_ENV) $(PY) $(NBVAL)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

benchmark: $(STAMP)
	$(PY) scripts/benchmark.py --models atlas_base_patch16 vit_base_patch16_224 --sizes 1024

# The prepared check for one CUDA GPU (about 8 minutes on an H100/H200); `python scripts/gpu_check.py` runs it without the venv too.
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py

# The runtime columns of the paper's Tables 1, 2, 3 and 6 side by side on one CUDA GPU (at most 6 minutes).
paper-speed: $(STAMP)
	$(PY) scripts/paper_speed.py

clean:
	rm -rf $(VENV) results runs
