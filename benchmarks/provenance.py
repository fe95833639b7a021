"""What every results file records about where its numbers came from: package versions and the
commit. One place, so the kernel and step benchmarks cannot drift apart."""

import importlib
import platform

import torch

from vipo.engine.provenance import commit  # noqa: F401  (re-exported: the results files' commit)


def versions(*packages: str) -> dict:
    """Python, torch, CUDA and Triton versions, plus each of `packages` (None where missing)."""
    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", *packages):
        try:
            found[name] = importlib.import_module(name).__version__
        except ImportError:
            found[name] = None
    return found
