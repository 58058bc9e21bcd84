# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv if it is
# missing and install everything (pinned CPU requirements, Detectron2 by hash, loco_det itself).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.loco_det-installed
DEMO_GRID ?= det_configs/grids/demo.yaml
DEMO_OUT ?= runs/demo
DEMO_DIGITS_OUT ?= runs/demo-digits
STUDY_OUT ?= runs/study
DIGITS_OUT ?= runs/digits
# the study runs two jobs at a time, one thread each (measured faster on 2 cores than one job
# on two threads)
STUDY_JOBS ?= 2
PYTEST_ARGS ?=
# pytest-xdist workers: most tests wait on one single-threaded subprocess, so two workers use
# both cores (measured: 13m52s with one, 7m25s with two on 2 cores).
TEST_WORKERS ?= 2

.PHONY: setup demo study digits test test-fast clean-demo

setup: $(STAMP)

$(STAMP): requirements/cpu.txt pyproject.toml tools/install_detectron2.py tools/detectron2_v0.6.patch.json
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/cpu.txt
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

demo: $(STAMP)
ifeq ($(FRESH),1)
	rm -rf $(DEMO_OUT) $(DEMO_DIGITS_OUT)
endif
	$(PY) -m loco_det.cli grid digits --profile demo --jobs $(STUDY_JOBS) --output-dir $(DEMO_DIGITS_OUT)
	$(PY) tools/run_benchmark.py $(DEMO_GRID) --out $(DEMO_OUT)
	@echo "reports: $(DEMO_DIGITS_OUT)/report.md (the rules learning on real digits), $(DEMO_OUT)/report.md (the whole chain)"

# the CPU-scale study (docs/study.md): the digits track, the embedded-data track
# (det_configs/grids/study.yaml), then one report over both in $(STUDY_OUT); each grid resumes
study: $(STAMP)
ifeq ($(FRESH),1)
	rm -rf $(STUDY_OUT)
endif
	$(PY) -m loco_det.cli grid digits --profile study --jobs $(STUDY_JOBS) --output-dir $(STUDY_OUT)/digits
	$(PY) tools/run_benchmark.py det_configs/grids/study.yaml --jobs $(STUDY_JOBS) --out $(STUDY_OUT)/embedded
	$(PY) -m loco_det.cli report $(STUDY_OUT)/digits $(STUDY_OUT)/embedded --output-dir $(STUDY_OUT)

# the digits grid (det_configs/grids/digits.yaml): every rule on real scans, five seeds,
# linear and kNN readout per stage (docs/learning.md)
digits: $(STAMP)
	$(PY) -m loco_det.cli grid digits --jobs $(STUDY_JOBS) --output-dir $(DIGITS_OUT)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

# everything but the tests marked slow (whole chains of real tools: grid runs, kill-and-resume
# rounds, the GPU check's CPU form); `make test` runs those too
test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

clean-demo:
	rm -rf $(DEMO_OUT) $(DEMO_DIGITS_OUT)

# GPU check (docs/gpu_check.md). gpu-wheels runs here (needs PyPI, not .venv); gpu-check runs
# on the GPU machine with that machine's python3, torch and numpy, from the carried folder.
GPU_WHEELS ?= .gpu_wheels
.PHONY: gpu-wheels gpu-check
gpu-wheels:
	$(PYTHON) tools/gpu_wheels.py --dest $(GPU_WHEELS)

gpu-check:
	$(PYTHON) tools/gpu_check.py --wheels $(GPU_WHEELS)
