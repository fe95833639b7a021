"""The scaling model on paper: byte counts against hand-computed cases, the shape of the efficiency
curve, the memory arithmetic against README's table, and the script's JSON."""

import importlib.util
import json
import math
import subprocess
import sys
from dataclasses import fields
from itertools import pairwise
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "scaling.py"
_spec = importlib.util.spec_from_file_location("scaling", SCRIPT)
scaling = importlib.util.module_from_spec(_spec)
sys.modules["scaling"] = scaling  # dataclasses look their module up while the class is built
_spec.loader.exec_module(scaling)

GB = 1e9


def total_bus_bytes(collectives, gpus):
    return sum(c.bus_bytes(gpus) for c in collectives)


def test_ring_all_reduce_of_one_gb_on_eight_gpus_sends_1_75_gb_per_gpu():
    assert scaling.Collective("g", "all_reduce", 1 * GB, 1).bus_bytes(8) == pytest.approx(1.75 * GB)
    assert scaling.Collective("w", "all_gather", 1 * GB, 1).bus_bytes(8) == pytest.approx(0.875 * GB)
    assert scaling.Collective("g", "reduce_scatter", 1 * GB, 1).bus_bytes(2) == pytest.approx(0.5 * GB)
    assert scaling.Collective("g", "all_reduce", 1 * GB, 1).bus_bytes(1) == 0.0


def test_ddp_all_reduces_fp32_gradients_once_per_step_whatever_the_accumulation():
    params = 250_000_000  # 1 GB of fp32 gradients
    for accum in (1, 4):
        (grads,) = scaling.traffic("ddp", params, fsdp_units=10, grad_accum=accum)
        assert grads.kind == "all_reduce" and grads.size_bytes == 1 * GB
        assert grads.calls == math.ceil(1 * GB / (25 * 2**20))
    assert total_bus_bytes(scaling.traffic("ddp", params, 10), 8) == pytest.approx(1.75 * GB)


def test_fsdp_gathers_twice_reduces_fp32_and_gathers_the_reference_every_micro_step():
    params = 1_000_000_000  # bf16 weights 2 GB, fp32 gradients 4 GB
    step = scaling.traffic("fsdp", params, fsdp_units=10, grad_accum=2)
    # 2 micro-steps x 7/8 x (2 x 2 GB policy gathers + 4 GB reduce-scatter + 2 GB reference gather)
    assert total_bus_bytes(step, 8) == pytest.approx(2 * 0.875 * 10 * GB)
    assert sum(c.calls for c in step) == 2 * (2 * 10 + 10 + 10)
    kept = scaling.traffic("fsdp", params, 10, grad_accum=2, reshard_after_forward=False)
    assert total_bus_bytes(kept, 8) == pytest.approx(2 * 0.875 * 8 * GB)
    adapter = scaling.traffic("fsdp", params, 10, grad_accum=2, copy_reference=False)
    assert total_bus_bytes(adapter, 8) == pytest.approx(2 * 0.875 * 8 * GB)


def test_zero2_reduces_bf16_every_micro_step_and_gathers_weights_once():
    params = 1_000_000_000
    step = scaling.traffic("zero2", params, fsdp_units=10, grad_accum=3)
    assert total_bus_bytes(step, 8) == pytest.approx(0.875 * (3 * 2 + 2) * GB)
    assert {c.kind for c in step} == {"reduce_scatter", "all_gather"}


def test_zero3_moves_fsdp_bytes_but_bf16_gradients():
    params = 1_000_000_000
    step = scaling.traffic("zero3", params, fsdp_units=10)
    assert total_bus_bytes(step, 8) == pytest.approx(0.875 * (2 * 2 + 2 + 2) * GB)
    with pytest.raises(ValueError, match="hsdp"):
        scaling.traffic("hsdp", params, 10)


def test_bus_bandwidth_is_nvlink_in_a_node_and_infiniband_rails_across():
    rails, one_nic = scaling.FABRICS["rails"], scaling.FABRICS["one-nic"]
    assert rails.busbw(8) == one_nic.busbw(8) == 360 * GB
    assert rails.busbw(16) == min(360, 8 * 45) * GB
    assert one_nic.busbw(512) == 45 * GB
    # ring: base 10 us + 7 NVLink hops; on 2 nodes 14 NVLink hops and 1 InfiniBand hop
    assert rails.latency("all_gather", 8) == pytest.approx(17e-6)
    assert rails.latency("reduce_scatter", 16) == pytest.approx((10 + 14 + 4) * 1e-6)
    # all-reduce at 64 nodes: the tree (7 NVLink + 6 IB hops, twice) beats the ring
    assert rails.latency("all_reduce", 512) == pytest.approx((10 + 2 * (7 + 6 * 4)) * 1e-6)
    assert rails.latency("all_gather", 1) == 0.0


def test_efficiency_formula_on_hand_cases():
    assert scaling.efficiency(1.0, 0.5, 0.0) == pytest.approx(1 / 1.5)
    assert scaling.efficiency(1.0, 0.5, 0.8) == pytest.approx(1 / 1.1)
    assert scaling.efficiency(1.0, 3.0, 1.0) == pytest.approx(1 / 3.0)  # overlap hides at most the compute
    with pytest.raises(ValueError, match="overlap"):
        scaling.efficiency(1.0, 1.0, 1.5)


def all_rows(gpus, overlaps, grad_accum=1):
    seconds = {name: w.assumed_seconds_per_pair() for name, w in scaling.WORKLOADS.items()}
    return scaling.table(seconds, gpus, overlaps, grad_accum=grad_accum)


def test_efficiency_never_rises_with_the_gpu_count_and_is_one_on_one_gpu():
    gpus, overlaps = (1, 2, 8, 16, 64, 512, 4096), (0.0, 0.5, 0.8)
    rows = all_rows(gpus, overlaps)
    curves = {}
    for row in rows:
        curves.setdefault((row.fabric, row.model, row.strategy), []).append(row)
    for key, curve in curves.items():
        assert [r.gpus for r in curve] == list(gpus)
        assert curve[0].comm_s == 0.0 and all(v == 1.0 for v in curve[0].efficiency.values()), key
        for overlap in map(str, overlaps):
            values = [r.efficiency[overlap] for r in curve]
            assert all(a >= b for a, b in pairwise(values)), (key, overlap, values)
        assert curve[-1].efficiency["0.0"] < 1.0, key


def test_more_overlap_never_lowers_efficiency():
    overlaps = (0.0, 0.2, 0.5, 0.8, 1.0)
    for row in all_rows((8, 64, 512), overlaps):
        values = [row.efficiency[str(o)] for o in overlaps]
        assert all(a <= b for a, b in pairwise(values)), (row.model, row.strategy, row.gpus, values)


def test_accumulation_amortises_ddp_and_zero2_but_not_fsdp():
    one, four = all_rows((64,), (0.0,)), all_rows((64,), (0.0,), grad_accum=4)
    for a, b in zip(one, four, strict=True):
        if a.strategy in ("ddp", "zero2"):
            assert b.efficiency["0.0"] > a.efficiency["0.0"], (a.model, a.strategy)
        else:  # every collective happens every micro-step
            assert b.efficiency["0.0"] == pytest.approx(a.efficiency["0.0"]), (a.model, a.strategy)


@pytest.mark.parametrize(
    "model, strategy, readme_gib",
    [
        ("sdxl", "ddp", 47.8),
        ("sdxl", "fsdp", 6.2),
        ("sdxl", "zero2", 18.5),
        ("sdxl", "zero3", 5.6),
        ("flux", "ddp", 221.7),
        ("flux", "fsdp", 29.0),
        ("flux", "zero2", 85.9),
        ("flux", "zero3", 26.2),
        ("wan", "ddp", 26.4),
        ("wan", "fsdp", 3.5),
        ("wan", "zero2", 10.2),
        ("wan", "zero3", 3.1),
    ],
)
def test_state_memory_on_eight_gpus_matches_the_readme_table(model, strategy, readme_gib):
    w = scaling.WORKLOADS[model]
    assert scaling.state_gib(strategy, w.params, 8, w.largest_unit_params) == pytest.approx(
        readme_gib, abs=0.05
    )


def test_flux_full_fine_tune_fits_only_sharded_weights():
    rows = [r for r in all_rows((8, 64), (0.0,)) if r.model == "flux" and r.fabric == "rails"]
    assert {r.strategy for r in rows if r.fits} == {"fsdp", "zero3"}


def test_default_step_time_is_counted_flops_at_the_assumed_mfu():
    flux = scaling.WORKLOADS["flux"]
    assert flux.assumed_seconds_per_pair() == pytest.approx(8 * 74.4 / (0.4 * 989.0))
    assert flux.assumed_seconds_per_pair(mfu=0.8) == pytest.approx(flux.assumed_seconds_per_pair() / 2)


def test_script_writes_every_field_and_says_nothing_is_measured(tmp_path):
    out = tmp_path / "scaling.json"
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--gpus",
            "8",
            "64",
            "--overlap",
            "0",
            "0.8",
            "--seconds-per-pair",
            "flux=3.0",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "NOT MEASURED" in done.stdout and "| rails | flux | fsdp |" in done.stdout
    report = json.loads(out.read_text())
    assert report["measured"] is False
    assumptions = report["assumptions"]
    for key in (
        "seconds_per_pair",
        "seconds_per_pair_source",
        "workloads",
        "fabrics",
        "overlaps",
        "gpus",
        "grad_accum",
        "reshard_after_forward",
        "state_budget_gib",
    ):
        assert key in assumptions, key
    assert assumptions["seconds_per_pair"]["flux"] == 3.0
    assert assumptions["seconds_per_pair_source"]["flux"].startswith("measured")
    assert assumptions["seconds_per_pair_source"]["sdxl"].startswith("ASSUMED")
    assert set(assumptions["fabrics"]) == {"rails", "one-nic"}
    rows = report["rows"]
    assert len(rows) == 2 * 3 * 4 * 2  # fabrics x models x strategies x GPU counts
    names = {f.name for f in fields(scaling.Row)}
    for row in rows:
        assert set(row) == names
        assert set(row["efficiency"]) == {"0.0", "0.8"}
        assert 0.0 < row["efficiency"]["0.0"] <= row["efficiency"]["0.8"] <= 1.0
    flux = next(r for r in rows if r["model"] == "flux" and r["strategy"] == "fsdp" and r["gpus"] == 8)
    assert flux["compute_s"] == 3.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seconds-per-pair", "sd3=1"], "MODEL=VALUE"),
        (["--seconds-per-pair", "flux=fast"], "not a number"),
        (["--micro-batch", "wan=0"], "positive"),
        (["--mfu", "2"], "--mfu"),
    ],
)
def test_bad_arguments_end_in_one_clear_line(argv, message):
    with pytest.raises(SystemExit, match=message):
        scaling.main(argv)


def test_readme_table_is_the_default_output():
    readme = (SCRIPT.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Scaling model", 1)[1]
    documented = [line for line in section.splitlines() if line.startswith(("| rails |", "| one-nic |"))]
    seconds = {name: w.assumed_seconds_per_pair() for name, w in scaling.WORKLOADS.items()}
    rendered = scaling.render(scaling.table(seconds), (0.0, 0.8)).splitlines()[2:]
    assert documented == rendered
