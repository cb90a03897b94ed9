# make install: .venv with torch and the package (building mirai._C: C++ kernels, plus the CUDA kernels when a GPU
#               is visible or MIRAI_BUILD_CUDA=1; see setup.py)
# make test:    install if needed, then pytest (one process per core, at most 4: TEST_WORKERS=N to change)
# make demo:    install if needed, then the embedded demo (runs/demo/report.md)
# make bench:   install if needed, then the EMA, foresight, optimizer, linear + CE, RoPE and training-step benchmarks (needs a CUDA GPU;
#               results appended to benchmarks/results/*.jsonl)
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mirai-installed
# test processes: one per core, at most 4 (each loads torch; the two-rank tests start two more)
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[install 1/3] torch 2.14.1 into $(VENV)"
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q ninja pybind11 setuptools wheel
	@echo "[install 2/3] building mirai._C (one line per compiled source)"
	$(PY) setup.py -q build_ext --inplace 2>&1 | sed -u -E 's#^(\[[0-9]+/[0-9]+\]) .* -c ([^ ]+) -o .*#\1 compiling \2#'
	@echo "[install 3/3] the package and its dev extra (DeepSpeed, timm, pytest, ...)"
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	$(PY) -c "import mirai._ext as ext; print('mirai._C built:', ext.describe())"
	touch $(STAMP)

test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -n $(TEST_WORKERS)

demo: install
	$(PY) -m mirai demo

bench: install
	$(PY) benchmarks/bench_ema.py
	$(PY) benchmarks/bench_foresight.py
	$(PY) benchmarks/bench_optim.py
	$(PY) benchmarks/bench_linear_ce.py
	$(PY) benchmarks/bench_rope.py
	$(PY) benchmarks/bench_step.py --point-timeout 900
	$(PY) benchmarks/bench_step.py --backend single --point-timeout 900
	$(PY) benchmarks/bench_step.py --backend single --fuse-ema --point-timeout 900

clean:
	rm -rf build *.egg-info mirai/_C*.so $(STAMP)
