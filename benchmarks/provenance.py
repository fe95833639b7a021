"""What every results file records about where its numbers came from: package versions and the
commit. One place, so the kernel and step benchmarks cannot drift apart."""

import importlib
import platform
import subprocess
from pathlib import Path

import torch


def versions(*packages: str) -> dict:
    """Python, torch, CUDA and Triton versions, plus each of `packages` (None where missing)."""
    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", *packages):
        try:
            found[name] = importlib.import_module(name).__version__
        except ImportError:
            found[name] = None
    return found


def commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
