"""benchmarks/gpu_check.sh, the one prepared GPU check, rehearsed on CPU as CI can: every step's
imports and arguments, with the packages the GPU image lacks made unimportable."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"


@pytest.mark.slow
def test_the_dry_run_rehearses_every_step_without_the_packages_the_gpu_image_lacks(tmp_path):
    proc = subprocess.run(
        [str(SCRIPT), "--dry-run", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == [
        "kernel-tests",
        "bench-kernel",
        "step-sd15-512",
        "step-sdxl-1024",
        "step-wan-720p",
        "bench-loader",
    ]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert "collected" in steps["kernel-tests"]["headline"] and "-m gpu" in steps["kernel-tests"]["command"]
    assert (
        "of baseline" in steps["step-sd15-512"]["headline"]
        and "sdxl-1024" in steps["step-sdxl-1024"]["command"]
    )
    modules = summary["environment"]["optional_modules"]
    assert modules["deepspeed"] is False and modules["nvidia.dali"] is False  # as on the GPU image
    assert modules["vipo.engine"] is True
    assert {p.name for p in tmp_path.iterdir()} <= {"environment.json", "summary.json", "log.txt"}
    assert "step-sdxl-1024" in proc.stdout.split("headline")[-1]  # the summary table comes last


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would run the whole check")
def test_outside_a_dry_run_it_refuses_a_machine_without_cuda(tmp_path):
    proc = subprocess.run([str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no CUDA device here" in proc.stderr
