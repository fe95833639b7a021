"""vipo's step and the official-style baseline step (benchmarks/step_baseline.py) traced the same
way in one run: peak memory per GPU and model FLOPs per pair of each, and their ratios.

    python benchmarks/plan_baseline.py vipo-sdxl-poly train.batch_pairs=2 \
        --out benchmarks/results/plan-baseline-sdxl-1024-cpu-trace.json

vipo's side is `vipo plan`'s trace of the recipe (engine/plan: the Trainer's forward_backward,
clip and AdamW step on fake tensors, at the recipe's real size). The baseline's side is
`BaselineStep.step`, the DPO branch of the official Diffusion-DPO train.py as `vipo bench step`
times it, with the same model, pairs per GPU and resolution, under the same fake-tensor mode,
CPU emulation of CUDA's autocast policy, MemTracker (StepMemTracker) and FLOP counter, after a
first AdamW step so both hold their optimizer state. Its settings are the GPU defaults of
`vipo bench step` (SD1.5 / SDXL: fp16 autocast with fp16 frozen parts; DiTs: bf16), except that
fp16 is traced as bf16: the same bytes, and no GradScaler, whose overflow checks read values a
fake tensor does not have (its state is a few scalars). Not counted on either side: the CUDA
context and allocator fragmentation; the baseline's pixel batch (25 MB a 1024px pair) arrives
already on the device. Traced on a CPU, not measured on a GPU.
"""

import argparse
import datetime
import gc
import itertools
import json
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch.distributed._tools.mem_tracker import _TOTAL_KEY

from vipo.benchmarks import provenance
from vipo.benchmarks.step_baseline import ENCODER_PREFIXES, BaselineStep, baseline_settings
from vipo.benchmarks.step_workload import Workload
from vipo.engine import plan as vipo_plan
from vipo.engine.plan.trace import _no_output_memo, pixel_shape
from vipo.engine.plan.tracking import (
    StepMemTracker,
    TotalFlopCounter,
    _merged,
    collections_at_marks,
    cuda_autocast_policy,
)

# The order in which the official loop ends its phases (policy before reference).
BASELINE_PHASES = ("data", "encode", "policy_forward", "reference", "loss", "backward", "optimizer")


class _Marks:
    """BaselineStep's clock: each mark ends a phase, collects cyclic garbage (as vipo's trace
    does), books the FLOPs since the last mark and names the next phase for the tracker."""

    def __init__(self, tracker: StepMemTracker, counter: TotalFlopCounter):
        self.tracker, self.counter, self.flops = tracker, counter, {}

    def start(self) -> None:
        self.tracker.phase = BASELINE_PHASES[0]

    def mark(self, phase: str) -> None:
        gc.collect()
        self.flops[phase] = self.counter.get_total_flops() - sum(self.flops.values())
        later = BASELINE_PHASES[BASELINE_PHASES.index(phase) + 1 :]
        self.tracker.phase = later[0] if later else phase


@contextmanager
def _cast_through_data():
    """`Module.to(dtype)` (the baseline's cast of its frozen parts) by replacing each floating
    tensor's `.data`: under fake tensors torch swaps the tensors instead, which fails on the fake
    mode's weakly referenced parameters. The same bytes either way; other `.to` calls pass through."""
    original = torch.nn.Module.to

    def to(module, *args, **kwargs):
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.dtype):
            return original(module, *args, **kwargs)
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(args[0])
        return module

    torch.nn.Module.to = to
    try:
        yield
    finally:
        torch.nn.Module.to = original


def trace_baseline(cfg, gpus: int) -> dict:
    """The baseline step of `cfg`'s model at its per-GPU pairs and resolution, traced."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from vipo.loaders.procedural import ProceduralPairs

    if cfg.parallel.context_parallel.size > 1:
        raise vipo_plan.RunError(
            "the official-style baseline step has no context parallelism: its rank holds every token of "
            "a pair; compare with parallel.context_parallel.ulysses=1 parallel.context_parallel.ring=1"
        )
    one = vipo_plan.plan_config(cfg, gpus)  # the real architecture on the CPU, the global micro-batch
    pairs = one.train.batch_pairs // gpus  # this GPU's (no context parallelism: one rank a data group)
    family = one.model.family
    settings, why = baseline_settings(family, one.model.lora_rank, torch.device("cuda"), [])
    traced = settings.precision
    if settings.precision == "fp16_autocast":
        settings.precision = "bf16_autocast"  # the same bytes, no GradScaler (see the docstring)
    work = Workload(
        name=family,
        family=family,
        config=one.model.config,
        device=torch.device("cpu"),
        batch_pairs=pairs,
        pixel_shape=pixel_shape(one),
        steps=1,
        warmup=0,
        split_steps=0,
    )
    vocabulary = ProceduralPairs(8, resolution=16, seed=one.train.seed).vocabulary()
    started = time.perf_counter()
    with ExitStack() as stack:
        # ShapeEnv: the official loop's .item() logs give symbols instead of failing on fake values.
        _no_output_memo(stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())))
        stack.enter_context(cuda_autocast_policy())
        with _cast_through_data():
            step = BaselineStep(
                work, one.model, settings, one.loss, seed=one.train.seed, vocabulary=vocabulary
            )
        for param in step.params:  # the optimizer state of a step after the first
            param.grad = torch.zeros_like(param)
        step.optimizer.step()
        step.optimizer.zero_grad(set_to_none=True)
        encoders = [
            module
            for name, module in vars(step.adapter).items()
            if name.startswith(ENCODER_PREFIXES) and isinstance(module, torch.nn.Module)
        ]
        tracker, counter = StepMemTracker(), TotalFlopCounter()
        tracker.track_external(step.adapter.network, step.reference, *encoders)
        tracker.track_external(step.optimizer)
        marks = _Marks(tracker, counter)
        stack.enter_context(collections_at_marks())
        with tracker, counter:
            step.step(marks)
        after = _merged(tracker.get_tracker_snapshot("current"))
    peak = tracker.peak()
    flops = sum(marks.flops.values())
    # The official script runs under accelerate's DDP, whose default gradient_as_bucket_view=False
    # keeps a second copy of every gradient: DDP's buckets, allocated when it wraps the model (not
    # traced: its C++ reducer takes no fake tensors). vipo's ddp makes its gradients the buckets.
    extra = {}
    if cfg.parallel.strategy == "ddp":
        extra["ddp_gradient_buckets"] = sum(p.numel() * p.element_size() for p in step.params)
    return {
        "settings": {**vars(settings), "precision_of_the_gpu_run": traced, "why": why},
        "peak_bytes_per_gpu": int(peak.get(_TOTAL_KEY, 0)) + sum(extra.values()),
        "split_bytes": {
            str(getattr(key, "value", key)): value for key, value in peak.items() if key != _TOTAL_KEY
        }
        | extra,
        "added_not_traced": sorted(extra),
        "peak_phase": tracker.peak_phase,
        "phase_peak_bytes": dict(tracker.phase_peaks),
        "flops_per_phase": marks.flops,
        "flops_per_pair": flops // pairs,
        "after_step_bytes": {str(getattr(key, "value", key)): value for key, value in after.items()},
        "trace_seconds": round(time.perf_counter() - started, 1),
    }


def compare(cfg, gpus: int) -> dict:
    """vipo's plan and the baseline's trace of the same step size, and vipo / baseline."""
    vipo = vipo_plan.make_plan(cfg, gpus)
    baseline = trace_baseline(cfg, gpus)
    return {
        "vipo": vipo,
        "baseline": baseline,
        "ratios": {
            "peak_memory vipo / baseline": vipo["peak_bytes_per_gpu"] / baseline["peak_bytes_per_gpu"],
            "flops_per_pair vipo / baseline": vipo["flops_per_pair"] / baseline["flops_per_pair"],
        },
    }


def main(argv=None) -> dict:
    from vipo.engine.cli import load_recipe

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="recipe file or built-in name")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_pairs=2")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs sharing train.batch_pairs (default 1)")
    parser.add_argument("--out", type=Path, help="result file (JSON)")
    args = parser.parse_args(argv)
    cfg = load_recipe(args.recipe, args.overrides)
    started = time.perf_counter()
    report = {
        "kind": "plan-baseline",
        "what": "vipo's step and the official-style baseline step, both traced on fake tensors on a CPU, "
        "not measured on a GPU",
        "command": " ".join(["python benchmarks/plan_baseline.py", *sys.argv[1:]] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": provenance.commit(),
        "versions": provenance.versions("diffusers", "transformers"),
        **compare(cfg, args.gpus),
    }
    report["wall_s"] = round(time.perf_counter() - started, 1)
    gib = 2**30
    for side in ("vipo", "baseline"):
        row = report[side]
        print(
            f"{side:8} peak {row['peak_bytes_per_gpu'] / gib:7.2f} GiB in {row['peak_phase']:14} "
            f"{row['flops_per_pair'] / 1e12:9.2f} TFLOP a pair"
        )
    for name, value in report["ratios"].items():
        print(f"{name}: {value:.3f}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
