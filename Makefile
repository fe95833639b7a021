# The two commands of the README: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRAS ?= train,dev,video,deepspeed,bnb
# Test environment: the Triton interpreter must be on before `import triton`; hub lookups
# would otherwise retry for minutes before failing; DeepSpeed has no CUDA here. One OpenMP
# thread a process: two xdist workers (and the 2-rank tests' processes) already fill 2 cores, and
# oversubscribed OpenMP threads spin (a 5 s test took 300 s with 2 threads a worker).
TEST_ENV := TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu \
            OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

.PHONY: install demo test lint bench clean

$(VENV)/.installed: setup.py pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c requirements/constraints.txt -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/vipo demo

# Two xdist workers (one per core on CI), a file to a worker: module fixtures run once.
PYTEST_JOBS ?= -n 2 --dist loadfile --no-loadscope-reorder

test: install
	$(TEST_ENV) $(VENV)/bin/pytest -q $(PYTEST_JOBS) $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check engine kernels loaders benchmarks tests configs setup.py
	$(VENV)/bin/ruff format --check engine kernels loaders benchmarks tests configs setup.py

bench: install
	$(VENV)/bin/python benchmarks/bench_kernel.py

clean:
	rm -rf $(VENV) build *.egg-info runs .pytest_cache .benchmarks
