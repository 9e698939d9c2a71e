# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned to a build that installs from this platform's local wheel (CPU); unpinned,
# pip would pull a multi-GB CUDA build. docker/Dockerfile pins the CUDA build of the same version.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/perta-stream demo

test: setup
	$(PY) -m pytest -q

# Every CPU benchmark with the settings README reports (over an hour on 2 cores); results in
# benchmarks/results/. The GPU benchmark is benchmarks/gpu_stats.py, on a CUDA machine.
bench: setup
	$(PY) benchmarks/bench_merge.py --repeats 3
	$(PY) benchmarks/bench_stats.py --samples 64 --repeats 3
	$(PY) benchmarks/bench_stats_families.py
	$(PY) benchmarks/bench_one_pass.py
	$(PY) benchmarks/bench_stats_write.py
	$(PY) benchmarks/bench_hub.py --size-gb 0.8 --repeat 3
	$(PY) benchmarks/bench_distributed.py
	$(PY) benchmarks/bench_tofu_forget10.py --rebuild

clean:
	rm -rf $(VENV) .perta_cache .pytest_cache
