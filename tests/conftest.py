"""Test setup. The Triton interpreter reads TRITON_INTERPRET once, at `import triton`: set it
before anything imports triton, so kernel tests run on CPU tensors."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

from vipo_testing import AOT_TABLE  # noqa: E402


def pytest_collection_modifyitems(config, items):
    # Files holding slow tests first (a stable sort keeps each file together): under xdist
    # (`make test` runs `-n 2 --dist loadfile`) the long files start at once instead of last.
    slow_files = {item.path for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: item.path not in slow_files)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test, printed on failure so the case can be replayed."""
    value = int.from_bytes(os.urandom(4), "little")
    request.node.user_properties.append(("seed", value))
    torch.manual_seed(value)
    return value


def pytest_terminal_summary(terminalreporter, config):
    reports = [r for key in ("passed", "failed") for r in terminalreporter.stats.get(key, [])]
    tables = [
        value for r in reports for name, value in getattr(r, "user_properties", ()) if name == AOT_TABLE
    ]
    for table in tables[:1]:
        terminalreporter.write_sep(
            "-", "fused kernels compiled ahead of time (tests/kernels/test_compile.py)"
        )
        terminalreporter.write_line(table)
