"""The pytest-benchmark files here import the scripts beside them as `vipo.benchmarks.*`: run them
with vipo installed (`make install`, editable) or on gpu_check.py's PYTHONPATH. Without either, one
clear line instead of an ImportError per file."""

import importlib.util

import pytest

if importlib.util.find_spec("vipo") is None or importlib.util.find_spec("vipo.benchmarks") is None:
    raise pytest.UsageError(
        "benchmarks/: vipo.benchmarks is not importable; install vipo (`make install`, or "
        "`pip install -e .`) or put gpu_check.py's vipo folder on PYTHONPATH"
    )
