# Two commands on a fresh machine: `make demo` (the main job) and `make test`. Each builds .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: venv demo test bench results clean

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and alone (the local CPU wheel here, CUDA build elsewhere), then the rest pinned to it
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt
	$(PY) -m pip install -q -c constraints.txt --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(VENV)/bin/twostep demo

test: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -q

# The ablation benchmarks (from the shipped teachers): digits endpoints, then the detail world's learning curves,
# then DMD2 against the paper's recipe and the discriminator's strength on the detail world (their paper arm reused
# from the block before); about three hours on 2 cores. Then any slow-marked tests.
bench: $(STAMP)
	$(OFFLINE) $(VENV)/bin/twostep bench --workers 2 --results docs/results.md
	$(OFFLINE) $(VENV)/bin/twostep bench --world detail --workers 2 --out runs/bench_detail --results docs/results.md
	$(OFFLINE) $(VENV)/bin/twostep bench --world detail --suite dmd2 --workers 2 --out runs/bench_detail --results docs/results.md
	$(OFFLINE) $(VENV)/bin/twostep bench --world detail --suite discriminator --workers 2 --out runs/bench_detail --results docs/results.md
	$(OFFLINE) $(PY) -m pytest -q -m slow || test $$? -eq 5

# Regenerates the command-written sections of docs/results.md from the demo's teacher.
results: $(STAMP)
	$(OFFLINE) $(VENV)/bin/twostep demo --results docs/results.md

clean:
	rm -rf runs .pytest_cache
