"""The loader benchmark runs end to end at tiny size on CPU: it checks the harness and its result
file (every decoder and sampler row, provenance, shapes), not speed (CPU timings on shared machines
are noise)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("nvidia.dali")  # the DALI rows are half of what the harness compares
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_loader.py"


def test_loader_benchmark_writes_every_decoder_row_and_its_provenance(tmp_path):
    out = tmp_path / "loader.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["kind"] == "loader" and report["smoke"] is True and report["device_type"] == "cpu"
    assert report["date"] and report["device"] and "commit" in report
    assert report["versions"]["av"] and report["versions"]["PIL"] and report["versions"]["nvidia.dali"]
    assert report["shapes"]["jpeg"] == [64, 64, 3] and report["shapes"]["clip"] == [5, 48, 64, 3]
    rows = {(row["kind"], row.get("codec"), row["backend"]): row for row in report["rows"]}
    assert (
        rows[("image", None, "pil")]["pairs_per_s"] > 0
        and rows[("image", None, "dali-cpu")]["pairs_per_s"] > 0
    )
    for backend in ("pil", "dali-cpu"):  # a micro-batch's decode, crop, resize and flip
        row = rows[("image-batch", None, backend)]
        assert row["pairs_per_s"] > 0 and row["batch_pairs"] == 2 and row["target"] == 32
    for codec in ("vp9", "h264"):
        assert (
            rows[("video", codec, "pyav")]["frames_per_s"] > 0
            and rows[("video", codec, "pyav")]["items"] == 5
        )
    assert rows[("video", "vp9", "dali-cpu")]["frames_per_s"] > 0  # DALI's CPU decoder does VP9 ...
    assert "cannot decode h264" in rows[("video", "h264", "dali-cpu")]["unsupported"]  # ... not H.264
    assert set(report["ratios"]) == {
        "image: dali-cpu / pil",
        "image-batch: dali-cpu / pil",
        "video-vp9: dali-cpu / pyav",
        "sampler-10000: cached / regenerate",
    }
    assert_sampler_rows(report)


def assert_sampler_rows(report):
    """The sampler's smoke sizes: cached at 10k and 100k pairs, the regenerating one at 10k."""
    rows = {(row["backend"], row["pairs"]): row for row in report["rows"] if row["kind"] == "sampler"}
    assert set(rows) == {("cached", 10_000), ("cached", 100_000), ("regenerate", 10_000)}
    for row in rows.values():
        assert row["calls_per_s"] > 0 and row["first_call_s"] > 0 and row["mean_s"] > 0
        assert row["batch_per_rank"] == 8 and row["ranks"] == 8
    assert rows[("cached", 10_000)]["repeats"] == 50 and rows[("regenerate", 10_000)]["repeats"] == 3
    assert report["shapes"]["sampler"]["pairs"] == [10_000, 100_000]


def test_a_sampler_only_run_writes_the_sampler_rows_alone(tmp_path):
    out = tmp_path / "sampler.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--sampler-only", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["sampler_only"] is True and report["versions"]["numpy"]
    assert {row["kind"] for row in report["rows"]} == {"sampler"} and set(report["shapes"]) == {"sampler"}
    assert set(report["ratios"]) == {"sampler-10000: cached / regenerate"}
    assert_sampler_rows(report)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU run writes into results/ by design")
def test_a_cpu_run_refuses_to_write_into_results(tmp_path):
    target = SCRIPT.parent / "results" / "loader-cpu-test.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(target)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "never committed" in result.stderr and not target.exists()
