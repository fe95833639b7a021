"""The loader benchmark's pipeline rows: each recipe's own data path through BatchStream with 0
and more workers, at tiny size on CPU (the harness and its arithmetic, not speed)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from vipo.benchmarks.bench_loader import cores_per_gpu, pairs_per_gpu
from vipo.configs import find_recipe
from vipo.engine.config import load_config

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_loader.py"


def test_a_gpu_decodes_its_share_of_the_micro_batch_and_a_context_group_shares_a_pair():
    per_gpu = {
        recipe: pairs_per_gpu(load_config(find_recipe(recipe), []), 8)
        for recipe in ("sd15-pickapic-poly", "vipo-sdxl-poly", "vipo-wan-poly")
    }
    # 64 / 8 GPUs; 32 / 8; 4 pairs over 4 groups of 2 (Ulysses 2): each GPU reads its group's pair.
    assert per_gpu == {"sd15-pickapic-poly": 8, "vipo-sdxl-poly": 4, "vipo-wan-poly": 1}
    assert cores_per_gpu(0.1, 8, 0.2) == {"step_s": 0.2, "decode_cores": 4.0, "cores_per_gpu": 5}
    assert cores_per_gpu(0.1, 8, 0.3)["cores_per_gpu"] == 4  # 2.67 decode cores, rounded up, + 1


def test_pipeline_rows_time_every_recipe_and_worker_count_and_give_cores_per_gpu(tmp_path):
    out = tmp_path / "pipeline.json"
    command = [sys.executable, str(SCRIPT), "--smoke", "--pipeline-only", "--workers", "0,1"]
    result = subprocess.run(
        [*command, "--step-time", "vipo-sdxl-poly=0.5", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["recipe"], r["workers"]): r for r in report["rows"] if r["kind"] == "pipeline"}
    recipes = ("sd15-pickapic-poly", "vipo-sdxl-poly", "vipo-wan-poly")
    assert set(rows) == {(recipe, workers) for recipe in recipes for workers in (0, 1)}
    # The recipes' own output sizes: 512 px crops, the 1024 px bucket, and for the smoke's 4:3 clips
    # the nearer of Wan's two buckets (1280x720, 960x960), 5 frames.
    assert rows[("sd15-pickapic-poly", 0)]["output"] == [512, 512, 3]
    assert rows[("vipo-sdxl-poly", 1)]["output"] == [1024, 1024, 3]
    assert rows[("vipo-wan-poly", 0)]["output"] == [5, 960, 960, 3]
    assert set(rows[("vipo-wan-poly", 0)]["clips_by"]) == {"clips_pyav"}  # no CPU decoder in DALI for H.264
    # Training's choice of decoder: on a machine without a GPU, PIL / PyAV in the loader.
    assert {row["decoder"] for row in rows.values()} == {
        "loader" if not torch.cuda.is_available() else "mixed"
    }
    for row in rows.values():
        assert row["pairs_per_s"] > 0 and row["pairs"] == row["batch_pairs"] * (
            4 if "wan" in row["recipe"] else 8
        )
    for recipe in recipes:
        single = rows[(recipe, 0)]
        assert math.isclose(single["pairs_per_s_per_core"] * single["cpu_s_per_pair"], 1.0)
    sdxl = report["pipelines"]["vipo-sdxl-poly"]
    expected = cores_per_gpu(sdxl["cpu_s_per_pair"], sdxl["pairs_per_gpu_step"], 0.5)
    assert {k: sdxl[k] for k in expected} == expected and report["step_times_s"] == {"vipo-sdxl-poly": 0.5}
    assert "cores_per_gpu" not in report["pipelines"]["vipo-wan-poly"]  # no step time given for it
    refused = subprocess.run(
        [*command, "--step-time", "vipo-sdxl-poly=fast"], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2 and "expected RECIPE=SECONDS" in refused.stderr
