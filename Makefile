# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned to a build that installs from this platform's local wheel (CPU); unpinned,
# pip would pull a multi-GB CUDA build. docker/Dockerfile pins the CUDA build of the same version.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test test-hub-lower bench docs docs-pages clean

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

# The documentation site (mkdocs.yml, docs/) into site/; --strict turns a broken link, anchor,
# snippet or API reference into a failure. docs-pages regenerates the committed CLI reference
# (tests/test_docs_reference.py fails while it is stale).
$(VENV)/.docs-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[docs]"
	touch $@

docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

docs-pages: setup
	$(PY) tools/docs/cli_reference.py --write

# `make test` runs against the newest huggingface_hub (2.x, on httpx2) and transformers. This runs
# the tests that go through huggingface_hub (the Hub client, hf:// locations, HTTP errors, and
# transformers' configs, which huggingface_hub validates) in a venv of their own, against the
# oldest releases pyproject.toml admits (its two `>=` lines, pinned exactly): a 1.x on httpx.
# --no-compile: byte-compiling every installed module is most of an install's time (torch: 27 s
# with it, 7 s without, on 2 shared cores); Python compiles what the tests import as they run.
LOWER_VENV := .venv-hub-lower
# This venv's packages come from the registry a second time in a run; one retry of an install
# that failed (a dropped connection mid-download) keeps a registry hiccup from failing CI.
LOWER_PIP := $(LOWER_VENV)/bin/python -m pip install --quiet --no-compile --retries 10
LOWER_PINS := $(shell sed -n -E 's/^ *"(huggingface_hub|transformers)>=([0-9.]+)",$$/\1==\2/p' pyproject.toml)
LOWER_TESTS := tests/test_hub.py tests/test_api.py \
	tests/test_distributed.py::test_hub_output_under_a_launcher_is_refused_before_anything_is_written \
	tests/test_stats_families.py::test_config_only_dry_run_plans_every_stored_tensor \
	tests/test_stats_families.py::test_tying_the_other_way

$(LOWER_VENV)/.installed: pyproject.toml Makefile
	@test "$(words $(LOWER_PINS))" = 2 || { echo "pyproject.toml has no huggingface_hub>= or transformers>= line to pin"; exit 1; }
	test -x $(LOWER_VENV)/bin/python || $(PYTHON) -m venv $(LOWER_VENV)
	$(LOWER_PIP) "$(TORCH_PIN)" || $(LOWER_PIP) "$(TORCH_PIN)"
	$(LOWER_PIP) -e ".[dev]" $(LOWER_PINS) || $(LOWER_PIP) -e ".[dev]" $(LOWER_PINS)
	touch $@

test-hub-lower: $(LOWER_VENV)/.installed
	$(LOWER_VENV)/bin/python -m pip list 2>/dev/null | grep -E '^(huggingface_hub|httpx2?|transformers) '
	$(LOWER_VENV)/bin/python -m pytest -q $(LOWER_TESTS)

# Every CPU benchmark with the settings docs/benchmarks.md reports (over an hour on 2 cores); results in
# benchmarks/results/. The GPU benchmarks (benchmarks/gpu_stats.py, gpu_one_pass.py) run on a CUDA
# machine through benchmarks/gpu_check.sh.
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
	rm -rf $(VENV) $(LOWER_VENV) .perta_cache .pytest_cache site
