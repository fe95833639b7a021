"""The commit a result came from: recorded by the benchmarks' results files and by studies."""

import subprocess
from pathlib import Path


def commit() -> str | None:
    """HEAD of the checkout this package runs from; None outside a git checkout."""
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
