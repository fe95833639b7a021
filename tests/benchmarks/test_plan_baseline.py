"""benchmarks/plan_baseline.py: vipo's step and the official-style baseline traced the same way in
one run, at tiny size (what the trace sees and how the ratios are formed, not the full-size result)."""

import json

import pytest

from vipo.benchmarks import plan_baseline
from vipo.engine import plan
from vipo.engine.config import load_config

TINY = "configs/train/tiny-sd15-poly.yaml"


def test_both_steps_are_traced_alike_and_the_ratios_are_formed_from_one_run(tmp_path):
    out = tmp_path / "baseline.json"
    report = plan_baseline.main(
        [TINY, "train.batch_pairs=2", f"train.output_dir={tmp_path}/run", "--out", str(out)]
    )
    assert json.loads(out.read_text())["ratios"] == report["ratios"]
    vipo, baseline = report["vipo"], report["baseline"]
    # The same model and passes (encoders, reference, policy forward and backward, no
    # checkpointing): the FLOPs of every phase agree, though the official loop orders them otherwise.
    assert baseline["flops_per_phase"] == {
        phase: vipo["flops_per_phase"][phase] for phase in baseline["flops_per_phase"]
    }
    assert list(baseline["flops_per_phase"]) == list(plan_baseline.BASELINE_PHASES)
    assert report["ratios"]["flops_per_pair vipo / baseline"] == 1.0
    # The GPU run's settings: fp16 autocast, traced as bf16; the frozen reference in 16 bits.
    assert baseline["settings"]["precision_of_the_gpu_run"] == "fp16_autocast"
    assert baseline["settings"]["precision"] == "bf16_autocast"
    assert (
        baseline["split_bytes"]["Parameter"] < 2 * vipo["exact_bytes"]["policy"]
    )  # fp32 policy + 16-bit copy
    ratio = vipo["peak_bytes_per_gpu"] / baseline["peak_bytes_per_gpu"]
    assert report["ratios"]["peak_memory vipo / baseline"] == ratio and baseline["peak_bytes_per_gpu"] > 0
    assert (
        baseline["phase_peak_bytes"]["backward"] > baseline["phase_peak_bytes"]["data"]
    )  # activations were seen


def test_a_context_parallel_recipe_has_no_baseline_and_says_why(tmp_path):
    recipe = tmp_path / "wan.yaml"
    recipe.write_text("model: {family: wan, config: wan-tiny}\ndata: {num_pairs: 16, resolution: 16}\n")
    args = [
        f"train.output_dir={tmp_path}/run",
        "parallel.strategy=ddp",
        "parallel.context_parallel.ulysses=2",
    ]
    with pytest.raises(plan.RunError, match="baseline step has no context parallelism"):
        plan_baseline.trace_baseline(load_config(recipe, args), 4)


def test_the_baseline_of_many_gpus_steps_one_gpus_share_of_the_micro_batch(tmp_path):
    """train.batch_pairs is the global micro-batch: on 4 GPUs a replica steps a quarter of it, the
    same step as one GPU with that quarter."""
    args = [f"train.output_dir={tmp_path}/run", "parallel.strategy=ddp"]
    shared = plan_baseline.trace_baseline(load_config(TINY, [*args, "train.batch_pairs=4"]), 4)
    alone = plan_baseline.trace_baseline(load_config(TINY, [*args, "train.batch_pairs=1"]), 1)
    assert shared["peak_bytes_per_gpu"] == alone["peak_bytes_per_gpu"] > 0
    assert shared["flops_per_pair"] == alone["flops_per_pair"] > 0
    assert shared["phase_peak_bytes"] == alone["phase_peak_bytes"]
