"""The kernel benchmark harness runs end to end at tiny size on CPU (it checks the script and
its result file, not speed: CPU timings of interpreted kernels mean nothing)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernel.py"


@pytest.mark.slow
def test_kernel_benchmark_writes_a_complete_result_file(tmp_path):
    out = tmp_path / "kernel.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["versions"]["torch"] and report["date"] and report["device"]
    assert report["copy"]["gbps"] > 0
    assert [row["shape_name"] for row in report["rows"]] == ["smoke-image", "smoke-video"]
    for row in report["rows"]:
        assert set(row["providers"]) == {"fused", "eager", "compiled_eager"}
        for timing in row["providers"].values():
            assert timing["median_ms"] > 0 and timing["q20_ms"] <= timing["median_ms"] <= timing["q80_ms"]
            assert timing["bytes_moved"] == 6 * 2 * __import__("math").prod(row["shape"])
        assert row["speedup_vs_eager"] > 0


def test_kernel_benchmark_refuses_unknown_shapes_and_a_missing_gpu(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    bad = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--shapes", "nope"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and "unknown shape" in bad.stderr
    if not __import__("torch").cuda.is_available():
        no_gpu = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env)
        assert no_gpu.returncode == 2 and "--smoke" in no_gpu.stderr
