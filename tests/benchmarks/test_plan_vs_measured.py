"""benchmarks/plan_vs_measured.py: a step result's vipo run, rebuilt from the config it recorded and
traced by `vipo plan`, beside the peak the run measured."""

import json

import pytest

from vipo.benchmarks import plan_vs_measured
from vipo.engine import plan
from vipo.engine.cli import main
from vipo.engine.config import to_dict


@pytest.fixture(scope="module")
def step_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "step.json"
    assert (
        main(["bench", "step", "sd15-tiny", "--smoke", "--steps", "1", "--warmup", "0", "--out", str(out)])
        == 0
    )
    return out


def test_the_recorded_config_is_the_run_that_was_measured(step_json):
    run = json.loads(step_json.read_text())["runs"][0]["runs"]["vipo"]
    rebuilt = to_dict(plan_vs_measured.planned_config(run))
    assert rebuilt["train"].pop("device") == "cpu"
    recorded = json.loads(json.dumps(run["config"]))
    recorded["train"].pop("device")
    assert rebuilt == json.loads(json.dumps(recorded))  # every key, as JSON holds it


def test_a_gpu_measurement_is_set_beside_the_plan_and_a_cpu_run_is_not_compared(step_json, tmp_path):
    reports = json.loads(step_json.read_text())["runs"]
    cpu_row = plan_vs_measured.compare(reports[0])
    assert cpu_row["measured_peak_gib"] is None and "not measured" in cpu_row["verdict"]
    traced = plan.trace_rank(plan_vs_measured.planned_config(reports[0]["runs"]["vipo"]), 1)
    assert cpu_row["planned_peak_gib"] == traced.peak_bytes / 2**30
    # As a GPU run writes it: the allocator's peak, 20% above the plan, then 5% above.
    for above, within in ((1.20, False), (1.05, True)):
        reports[0]["runs"]["vipo"]["peak_memory_gib"] = cpu_row["planned_peak_gib"] * above
        gpu = tmp_path / "gpu-step.json"
        gpu.write_text(json.dumps({"kind": "step", "runs": reports}))
        out = tmp_path / "compared.json"
        assert plan_vs_measured.main([str(gpu), "--out", str(out)]) == 0
        (row,) = json.loads(out.read_text())["rows"]
        assert row["plan_over_measured"] == pytest.approx(1 / above)
        assert row["within_target"] is within


def test_a_file_that_is_not_a_step_result_ends_in_one_line(tmp_path, capsys):
    bad = tmp_path / "kernel.json"
    bad.write_text(json.dumps({"kind": "kernel"}))
    assert plan_vs_measured.main([str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a step result file" in err
