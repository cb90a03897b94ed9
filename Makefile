# make install: .venv with torch and the package (building mirai._C)
# make test:    install if needed, then pytest
# make demo:    install if needed, then the embedded demo (runs/demo/report.md)
# make bench:   install if needed, then the EMA, foresight, optimizer, linear + CE, RoPE and training-step benchmarks (needs a CUDA GPU;
#               results appended to benchmarks/results/*.jsonl)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mirai-installed
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q ninja pybind11
	$(PY) -m pip install --no-build-isolation -e '.[dev]'
	$(PY) -c "import mirai._C, mirai; print('mirai._C built:', mirai._ext.describe())"
	touch $(STAMP)

test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q

demo: install
	$(PY) -m mirai.demo

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
	rm -rf build *.egg-info mirai/_C*.so
