"""How `vipo bench step` times a step, whichever step it is (step_vipo.py, step_baseline.py).

A run is any object with `device`, `step(clock) -> loss` (one micro-batch and one optimizer
update, calling `clock.start()` first and `clock.mark(phase)` as each phase ends), optionally
`summary() -> dict` and `close()`. `measure(build, work)` builds it, warms it up and times it:

    headline pass   steps back to back, not synchronised between phases; CUDA events around each
                    step (time.perf_counter on CPU). `mean` is the first start to the last end over
                    the steps, gaps included: the throughput. Quantiles by torch.quantile.
    split pass      the device synchronised at each phase boundary: mean ms per phase, and the
                    wall time of these steps measured from outside (the phases must add up to it)

Peak memory: the allocator's peak over the headline pass, weights and optimizer state included
(CUDA only). A CUDA out-of-memory is a result too.
"""

import gc
import math
import sys
import time

import torch

PHASES = ("data", "encode", "reference", "policy_forward", "loss", "backward", "optimizer")
SDPA_BACKENDS = ("flash", "mem_efficient", "math", "cudnn")
QUANTILES = {"q20": 0.2, "median": 0.5, "q80": 0.8}


class PhaseClock:
    """Phase boundaries inside a step. Disabled (the headline pass): free. Enabled (the split pass):
    the device is synchronised at each boundary and the wall time since the last one is added."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled = device, enabled
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.last = 0.0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        if self.enabled:
            self.sync()
            self.last = time.perf_counter()

    def mark(self, phase: str) -> None:
        if self.enabled:
            self.sync()
            now = time.perf_counter()
            self.totals[phase] += now - self.last
            self.last = now


def quantiles(samples_ms: list[float]) -> dict[str, float]:
    """min, q20, median, q80 and max of per-step times (torch.quantile, linear interpolation)."""
    values = torch.tensor(samples_ms, dtype=torch.float64)
    found = torch.quantile(values, torch.tensor(list(QUANTILES.values()), dtype=torch.float64)).tolist()
    return {
        "min": values.min().item(),
        **dict(zip(QUANTILES, found, strict=True)),
        "max": values.max().item(),
    }


def timed_pass(run, steps: int) -> tuple[dict, torch.Tensor]:
    """The headline pass: {"mean", "min", "q20", "median", "q80", "max"} in ms, and the last loss."""
    clock = PhaseClock(run.device, enabled=False)
    loss = None
    if run.device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)
        ]
        for start, end in events:
            start.record()
            loss = run.step(clock)
            end.record()
        torch.cuda.synchronize(run.device)
        per_step = [start.elapsed_time(end) for start, end in events]
        total = events[0][0].elapsed_time(events[-1][1])
    else:
        per_step = []
        began = time.perf_counter()
        for _ in range(steps):
            started = time.perf_counter()
            loss = run.step(clock)
            per_step.append((time.perf_counter() - started) * 1e3)
        total = (time.perf_counter() - began) * 1e3
    return {"mean": total / steps, **quantiles(per_step)}, loss


def split_pass(run, steps: int) -> tuple[dict, float]:
    """Mean ms of each phase, and the mean wall time of these synchronised steps measured from
    outside: the phases must add up to it (no work left between the marks)."""
    clock = PhaseClock(run.device, enabled=True)
    clock.sync()
    started = time.perf_counter()
    for _ in range(steps):
        run.step(clock)
    clock.sync()
    wall_ms = (time.perf_counter() - started) * 1e3 / steps
    return {phase: seconds * 1e3 / steps for phase, seconds in clock.totals.items()}, wall_ms


def measure(build, work, result: dict | None = None) -> dict:
    """Build a run (`build()`), warm it up, time it, split it: every figure of one run, added to
    `result`. Process-wide state a run may change (SDPA backends, compile caches) is restored."""
    device, cuda = work.device, work.device.type == "cuda"
    result = dict(result or {})
    run = None
    sdpa_backends = {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")() for name in SDPA_BACKENDS}
    try:
        started = time.perf_counter()
        run = build()
        result["setup_s"] = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(work.warmup):
            run.step(PhaseClock(device, enabled=False))
        if cuda:
            torch.cuda.synchronize(device)
        result["warmup_s"] = time.perf_counter() - started
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        step_ms, loss = timed_pass(run, work.steps)
        if cuda:
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        else:
            result["peak_memory_gib"] = result["peak_reserved_gib"] = None  # no allocator statistics on CPU
        result["step_ms"] = step_ms
        result["pairs_per_s"] = work.batch_pairs / (step_ms["mean"] / 1e3)
        result["samples_per_s"] = 2 * result["pairs_per_s"]
        result["loss"] = float(loss)
        result["loss_is_finite"] = math.isfinite(result["loss"])
        split, split_wall = split_pass(run, work.split_steps)
        result["split_ms"] = split
        result["split_total_ms"] = sum(split.values())
        result["split_step_ms"] = split_wall
        # What the boundary syncs cost against the headline step (near 1 when the GPU is the bottleneck).
        result["split_vs_headline"] = split_wall / step_ms["median"]
        result.update(run.summary() if hasattr(run, "summary") else {})
    except torch.OutOfMemoryError as err:
        result["error"] = f"out of memory: {str(err).splitlines()[0]}"
    finally:
        if run is not None and hasattr(run, "close"):
            run.close()
        del run
        gc.collect()
        for name, enabled in sdpa_backends.items():  # model.attention=sdpa_* switches them process-wide
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(enabled)
        dynamo = sys.modules.get("torch._dynamo")
        if dynamo is not None:  # compiled graphs of this run's modules go with them
            dynamo.reset()
        if cuda:
            torch.cuda.empty_cache()
    return result
