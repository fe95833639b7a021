"""`vipo plan`: peak memory and FLOPs of one training step at the recipe's real size, traced on a
CPU without allocating it.

    vipo plan vipo-sdxl-poly --gpus 8 --gpu-memory 80GiB --batch-search [--json]

How it traces (one step of the engine's own code, nothing copied; trace.py):

    FakeTensorMode      every tensor is a fake CPU tensor: shapes, dtypes and strides, no storage.
                        The engine's Trainer is built inside it from the recipe (random weights of
                        the real architecture, configs/models/; compile off; the configured
                        reference mode, param_dtype, autocast and activation checkpointing); a recipe
                        naming a weights folder (model.path) builds the model.config it names, else
                        the family's released architecture (families.sized_architecture).
    the step            strategy.zero_grad, Trainer.forward_backward (encode, reference, policy
                        forward, loss, backward through the trainer's phase marks), then the update's
                        clip + AdamW step (Strategy._clip, optimizer.step: update() without its host
                        syncs, which a fake tensor cannot answer). The optimizer state already exists
                        (one warm-up step on zero gradients), so this is a steady-state step; with
                        train.grad_accum_steps > 1 it is the last micro-batch (the gradients of the
                        earlier ones are resident from its start).
    StepMemTracker      torch's MemTracker (parameters, buffers, gradients, activations,
                        temporaries, optimizer state; tracking.py), module-wise snapshots off: they
                        scan every module at every op (the SDXL UNet's forward + backward alone took
                        9.3 minutes with them, 13 s without) and refuse a module that runs twice in
                        a step (the adapter reference). It keeps the peak of each phase instead.
    TotalFlopCounter    torch's FlopCounterMode on the same trace, read at every phase mark; FLOPs as
                        executed (the encoders, and under checkpointing the recomputation, are in).
                        Without its module tracker: that one sets gradient hooks on every module's
                        tensors, also in a checkpointed block's recomputation, holding them until
                        the hooks fire (for Wan, whose blocks share inputs, after the last block),
                        which made every recomputed block count at once (tracking.py).

Attention: fake CPU tensors dispatch SDPA to `aten._scaled_dot_product_flash_attention_for_cpu`
(every attention op the trace sees is counted per phase and reported). Like the CUDA flash and
memory-efficient kernels it returns (output, logsumexp [B, H, S]) and its backward reads q, k, v,
output and logsumexp: no S x S matrix is ever a tensor, so none is counted. On the meta device SDPA
falls back to the math path (bmm + softmax, saving S x S scores): that is why this is not a meta
trace. FlopCounterMode has no entry for the CPU kernel; CPU_FLASH_FLOPS counts it with torch's own
SDPA formulas.

Autocast: Trainer.autocast on the CPU device is CPU autocast, whose op lists differ from CUDA's.
Under train.mixed_precision=bf16 the ops in CUDA_FP32_OPS get CUDA's policy for the trace
(GroupNorm, LayerNorm, upsampling, softmax keep fp32 activations as on a GPU); the tests check the
table against CUDA autocast's own kernels run on fake CUDA tensors.

Cyclic garbage: under activation checkpointing the trackers' own hooks (set again on every
recomputed block's outputs) leave closures in reference cycles that hold tensors until Python's
collector runs; the plain step leaves none (gc.DEBUG_SAVEALL on the SDXL-tiny UNet: no garbage
without MemTracker, thousands of closures with it). Left to the collector's thresholds the same SDXL
step moved by 1.6 GB from run to run, and never collecting added a third at tiny size (14 GB at
SDXL 1024px). So the collector is off during the trace and runs after each recomputed block's
backward and at every phase mark: the artefact is gone and a plan is the same every time.

AdamW runs fused, as the strategy builds it on a GPU (one kernel, no temporaries). Not counted: the
CUDA context and the caching allocator's fragmentation (leave a few GiB).

Strategies:
    ddp     rank 0 of --gpus on the fake process group (see fsdp), DDPStrategy as it runs, one
            replica with train.batch_pairs / --gpus pairs. DDP's C++ reducer takes no fake
            tensors, so its wrap is replaced by what it leaves in memory: with
            gradient_as_bucket_view every .grad a view of its buckets, one flat buffer per dtype
            (trace._ddp_bucket_views; a real-tensor test matches DDP's own reducer). The traced
            micro-batch is the last, which DDP runs as the module's own forward and backward.
            With context parallelism (Wan, FLUX) its context group's collectives are real calls.
    fsdp    rank 0 of --gpus ranks in this one process: torch's fake process group (fake_world;
            its collectives move no data and return outputs of the right shape), the launcher's
            variables set, so the Trainer's own init_world, fully_shard (every block, the root,
            the copy reference), mixed-precision policy and hybrid mesh run as on --gpus GPUs.
            All-gathered weights, reduce-scatter buffers and the sharded gradients and AdamW state
            are allocations of the trace like any other (MemTracker sees them at dispatch), so
            torch's FSDPMemTracker, which relabels the same bytes by FSDP state, is not needed for
            the peak. The device meshes are built outside the fake mode (their rank tables are
            host integers: parallel.device_mesh). Context parallelism (Ulysses / ring) is traced
            here too: each rank's token shard, the all-to-alls' outputs. DTensor's sharding
            propagation, which runs each op on fake tensors of the global shapes to learn its
            output's metadata, allocates nothing on a GPU and is not counted (tracking.py).
    zero2 / zero3
            rank 0 of a fake process group as for fsdp: the Trainer's own deepspeed.initialize,
            with the config a GPU run gets (parallel.deepspeed_config(gpu=True): overlap_comm,
            so ZeRO-2 allocates its two gradient buckets), DeepSpeed's backward (its bucketed
            reduce-scatter into the fp32 partitions) and its step (AdamW on the partitions, the
            gather of updated weights). Three things are changed for the trace: Module.to onto
            the device a module is on returns it (DeepSpeed's engine calls it; torch would swap
            each fake parameter with itself), ZeRO's host check of the gradient norm answers
            "finite" (a fake norm has no value; an overflowing step skips the update and
            allocates less), and DeepSpeed's cached process groups are dropped with each fake
            world. The per-category lines follow MemTracker's labels, which do not know ZeRO's
            flat buffers (its gradient buckets show as gradients; ZeRO-3's partitions of
            weights as other); the peak and the phases are checked against real tensors.
            With grad_accum_steps > 1 one earlier micro-batch runs untraced first, so ZeRO's
            buffers hold what they hold at the last one. Not traced: ZeRO offload in
            parallel.deepspeed_config (host and device memory are one on a CPU), refused.
    optim.optimizer=adamw8bit
            bitsandbytes' own AdamW8bit, built and stepped under the fake mode (its update is a
            custom op with a registered fake kernel, in place, no temporaries, as its CUDA kernel);
            its two 256-entry quantization maps are made of real tensors (bitsandbytes builds
            them from Python lists of tensor values). Its state is counted as it allocates it
            (tested against real tensors and budget.bytes_to_come). none / ddp only, as in training.
    parallel.cpu_offload (fsdp)
            What FSDP2's CPUOffloadPolicy keeps in host memory is marked as such in the tracker
            and left out of the device's peak and split: the sharded weights of the policy and
            of the copy reference, the optimizer's state (it steps on the host), and each
            sharded gradient from the moment its reduce-scatter returns (FSDP copies it to the
            host there; on a CPU trace that copy is a no-op, so the reduce-scatter's output is
            marked). The host's own bytes are reported beside the plan (host_peak_bytes_per_rank,
            and by role at the device's peak). Before each all-gather FSDP copies a shard to the
            device (FSDPParam.all_gather_inputs); under bf16 mixed precision the cast that follows
            makes the traced copy (in bf16), so only the fp32 copy of one parameter's shard before
            its cast is not traced; under fp32 compute the shards' device copies (1/N of one
            block's weights, freed after the all-gather) are not. Nor are the host's pinned-memory limits.
    reference.offload (none / ddp / zero2)
            The copy's host buffers (reference.HostWeights) are marked as host memory like
            cpu_offload's. Each reference pass copies them to the device as the run does (a new
            tensor on a CPU trace too), so that copy is traced for the pass and freed before the
            policy forward; it is reported as the reference where the peak is in the pass.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

from ..config import REPLICATED_REFERENCE, ConfigError, RunConfig
from ..errors import RunError
from ..families import sized_architecture
from .trace import StepTrace, fake_world, pixel_shape, trace_step
from .tracking import CUDA_FP32_OPS, PHASES, cuda_autocast_policy

__all__ = [
    "CUDA_FP32_OPS",
    "PHASES",
    "ConfigError",
    "RunError",
    "StepTrace",
    "cmd_plan",
    "cuda_autocast_policy",
    "fake_world",
    "largest_batch",
    "largest_fitting",
    "make_plan",
    "parse_bytes",
    "plan_config",
    "trace_rank",
    "trace_step",
]

GIB = 2**30
TRACED_STRATEGIES = ("none", "ddp", "fsdp", "zero2", "zero3")
SHARDED = ("fsdp", "zero2", "zero3")  # traced on rank 0 of a fake process group
PLACEHOLDER_CACHE = "latent-cache-of-vipo-plan"  # data.cache is read by no one: the batch is made here

# ---------------------------------------------------------------------------------------------
# The plan: configs to trace, the verdict, the batch search


def _zero_offload(path: str | None) -> str | None:
    """The offload section a DeepSpeed config file turns on ("offload_optimizer" /
    "offload_param" to a device other than none), or None."""
    if not path:
        return None
    try:
        zero = json.loads(Path(path).read_text(encoding="utf-8")).get("zero_optimization", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return None  # the Trainer's own reading names what is wrong with the file
    for key in ("offload_optimizer", "offload_param"):
        section = zero.get(key)
        if isinstance(section, dict) and section.get("device", "none") != "none":
            return key
    return None


def plan_config(cfg: RunConfig, gpus: int, *, pairs: int | None = None, checkpointing: bool | None = None):
    """The config one rank traces: the recipe on one CPU process, its per-GPU share of the micro-batch
    (`pairs` overrides it), real-architecture random weights where it names a weights folder."""
    strategy = cfg.parallel.strategy
    if strategy not in TRACED_STRATEGIES:
        raise RunError(
            f"vipo plan: parallel.strategy={strategy} is not built yet (traced: {', '.join(TRACED_STRATEGIES)}); "
            "parallel.strategy=ddp gives one full replica"
        )
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    if gpus > 1 and strategy == "none":
        raise ConfigError(f"--gpus {gpus} with parallel.strategy=none: add parallel.strategy=ddp")
    if strategy in ("zero2", "zero3") and _zero_offload(cfg.parallel.deepspeed_config):
        raise RunError(
            f"vipo plan: ZeRO offload (zero_optimization.{_zero_offload(cfg.parallel.deepspeed_config)} in "
            f"parallel.deepspeed_config) is not built yet (a CPU trace cannot tell host from device memory); "
            "without it the plan bounds the offloaded run from above"
        )
    context = cfg.parallel.context_parallel.size  # ranks that share each pair (engine/context_parallel.py)
    if gpus % context:
        raise ConfigError(
            f"--gpus {gpus}: parallel.context_parallel ulysses x ring = {context} must divide it"
        )
    groups = gpus // context  # data-parallel groups: the global micro-batch splits over these
    if pairs is None:
        pairs, rest = divmod(cfg.train.batch_pairs, groups)
        if rest or not pairs:
            over = f"{groups} data groups of {context} GPUs" if context > 1 else f"--gpus {gpus}"
            raise ConfigError(
                f"train.batch_pairs={cfg.train.batch_pairs} is the global micro-batch and must split evenly "
                f"over {over}: use a multiple of {groups}"
            )
    model = dataclasses.replace(
        cfg.model,
        path=None,
        config=sized_architecture(cfg.model),
        init_from=None,  # weights do not change memory or FLOPs
        gradient_checkpointing=cfg.model.gradient_checkpointing if checkpointing is None else checkpointing,
    )
    data = dataclasses.replace(cfg.data, prefetch_batches=0)
    if data.cache or cfg.reference.mode == "precomputed":  # precomputed trains from the latent cache only
        data = dataclasses.replace(data, cache=PLACEHOLDER_CACHE)
    # The global micro-batch of `gpus` ranks: rank 0 of a fake group of them (fake_world) takes its share.
    train = dataclasses.replace(cfg.train, batch_pairs=pairs * groups, device="cpu", compile="off")
    return dataclasses.replace(cfg, model=model, data=data, train=train)


def on_group(cfg: RunConfig) -> bool:
    """Whether one rank's step is traced as rank 0 of a fake process group: every strategy but none
    (ddp's replica runs DDPStrategy; with context parallelism its context group splits each
    sample's tokens)."""
    return cfg.parallel.strategy in (*SHARDED, "ddp")


def trace_rank(cfg: RunConfig, gpus: int, **kwargs) -> StepTrace:
    """One rank's step: rank 0 of `gpus` on a fake process group. ddp: one replica with its share,
    its gradients views of DDP's buckets (trace._ddp_bucket_views); fsdp / zero: the engine's own
    fully_shard or deepspeed.initialize over the fake group."""
    traced = plan_config(cfg, gpus, **kwargs)
    with fake_world(gpus) if on_group(cfg) else nullcontext():
        return trace_step(traced)


def largest_batch(cfg: RunConfig, gpus: int, limit: int, checkpointing: bool, cap: int = 1024) -> dict:
    """The most pairs per GPU whose traced step fits `limit` bytes, every candidate traced.
    {"pairs": 0} when one pair does not fit."""
    traced: dict[int, int] = {}

    def fits(pairs: int) -> bool:
        traced[pairs] = trace_rank(cfg, gpus, pairs=pairs, checkpointing=checkpointing).peak_bytes
        return traced[pairs] <= limit

    return {"pairs": largest_fitting(fits, cap), "traced": dict(sorted(traced.items()))}


def largest_fitting(fits, cap: int) -> int:
    """The largest n in [1, cap] with fits(n), for a `fits` that stays false once false (memory grows
    with the batch): doubling, then bisection; 0 when fits(1) is false."""
    if not fits(1):
        return 0
    low = 1
    while 2 * low <= cap and fits(2 * low):
        low *= 2
    high = min(2 * low, cap + 1)  # the smallest size known not to fit (or past the cap)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def parse_bytes(text: str) -> int:
    """`80GiB`, `80GB`, `24 GiB`, `512MiB` or a number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError(f"--gpu-memory {text!r}: use e.g. 80GiB, 40GB or 512MiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20}
    scale |= {"GIB": 2**30, "TIB": 2**40}
    if unit not in scale or number <= 0:
        raise ConfigError(f"--gpu-memory {text!r}: use e.g. 80GiB, 40GB or 512MiB")
    return int(number * scale[unit])


def make_plan(cfg: RunConfig, gpus: int = 1, gpu_memory: int = 80 * GIB, batch_search: bool = False) -> dict:
    """Everything `vipo plan` reports, as one JSON-able dict."""
    trace = trace_rank(cfg, gpus)
    traced_cfg = plan_config(cfg, gpus)
    total = trace.peak_bytes
    result = {
        "model": {
            "family": cfg.model.family,
            "config": traced_cfg.model.config,
            "pixels": list(pixel_shape(cfg)),
            "lora_rank": cfg.model.lora_rank,
            "param_dtype": cfg.model.param_dtype,
            "gradient_checkpointing": traced_cfg.model.gradient_checkpointing,
        },
        "reference_mode": cfg.reference.mode if cfg.loss.objective != "sft" else None,
        "reference_dtype": cfg.reference.dtype,
        "reference_offload": cfg.reference.offload,
        "objective": cfg.loss.objective,
        "optimizer": cfg.optim.optimizer,
        "mixed_precision": cfg.train.mixed_precision,
        "latent_cache": bool(cfg.data.cache),
        "strategy": cfg.parallel.strategy,
        "gpus": gpus,
        "pairs_per_gpu": trace.pairs,
        "peak_bytes_per_gpu": total,
        "peak_phase": trace.peak_phase,
        "split_bytes": trace.split,
        "phase_peak_bytes": trace.phase_peaks,
        "exact_bytes": trace.exact,
        "flops_per_phase": trace.flops,
        "flops_per_pair": trace.flops_per_pair,
        "flops_share": {
            phase: round(value / max(1, sum(trace.flops.values())), 4) for phase, value in trace.flops.items()
        },
        "attention_ops": trace.attention_ops,
        "gpu_memory_bytes": gpu_memory,
        "fits": total <= gpu_memory,
        "overflow_bytes": max(0, total - gpu_memory),
        "cpu_offload": cfg.parallel.strategy == "fsdp" and cfg.parallel.cpu_offload,
        "host_peak_bytes_per_rank": trace.host_peak_bytes,
        "host_split_bytes_at_peak": trace.host_split,
        "trace_seconds": round(trace.seconds, 2),
        "method": "FakeTensorMode CPU trace of Trainer.forward_backward + clip + optimizer step; MemTracker; "
        "FlopCounterMode without module tracking (see engine/plan/__init__.py)",
        "not_counted": "the CUDA context and the allocator's fragmentation",
    }
    if batch_search:
        result["batch_search"] = {
            "with_checkpointing": largest_batch(cfg, gpus, gpu_memory, True),
            "without_checkpointing": largest_batch(cfg, gpus, gpu_memory, False),
        }
    return result


# ---------------------------------------------------------------------------------------------
# The command


def _gib(value: int) -> str:
    return f"{value / GIB:.2f} GiB"


def render(plan: dict) -> str:
    model = plan["model"]
    pixels = "x".join(str(side) for side in model["pixels"][1:])
    lines = [
        f"vipo plan: {model['family']} ({model['config']}) {pixels}, {plan['pairs_per_gpu']} pairs per GPU, "
        f"{plan['gpus']} GPU(s), strategy {plan['strategy']}, reference {plan['reference_mode']}"
        + (" (offloaded)" if plan.get("reference_offload") else "")
        + ", "
        f"mixed precision {plan['mixed_precision']}, checkpointing {'on' if model['gradient_checkpointing'] else 'off'}"
        + (f", optimizer {plan['optimizer']}" if plan.get("optimizer", "adamw") != "adamw" else ""),
        f"peak memory per GPU {_gib(plan['peak_bytes_per_gpu'])} in {plan['peak_phase']}: "
        + (
            f"fits {_gib(plan['gpu_memory_bytes'])} ({_gib(plan['gpu_memory_bytes'] - plan['peak_bytes_per_gpu'])} free)"
            if plan["fits"]
            else f"does NOT fit {_gib(plan['gpu_memory_bytes'])} (over by {_gib(plan['overflow_bytes'])})"
        ),
    ]
    lines += [f"  {name:22s} {_gib(value):>12s}" for name, value in plan["split_bytes"].items() if value]
    lines.append("peak by phase: " + ", ".join(f"{k} {_gib(v)}" for k, v in plan["phase_peak_bytes"].items()))
    if plan.get("cpu_offload") or plan.get("reference_offload"):
        held = ", ".join(f"{k} {_gib(v)}" for k, v in plan["host_split_bytes_at_peak"].items() if v)
        why = "parallel.cpu_offload" if plan.get("cpu_offload") else "reference.offload"
        lines.append(
            f"host memory per rank ({why}, left out above): up to "
            f"{_gib(plan['host_peak_bytes_per_rank'])}; at the device's peak {held or 'none'}"
        )
    per_pair = plan["pairs_per_gpu"]
    lines.append(
        f"FLOPs per pair {plan['flops_per_pair'] / 1e12:.3f} TFLOP: "
        + ", ".join(f"{k} {v / per_pair / 1e12:.3f}" for k, v in plan["flops_per_phase"].items() if v)
    )
    ops = Counter()
    for phase_ops in plan["attention_ops"].values():
        ops.update(phase_ops)
    lines.append("attention ops traced: " + (", ".join(f"{k} x{v}" for k, v in ops.items()) or "none"))
    for name, found in plan.get("batch_search", {}).items():
        lines.append(
            f"largest micro-batch {name.replace('_', ' ')}: {found['pairs']} pairs per GPU (traced "
            + ", ".join(f"{p}: {_gib(b)}" for p, b in found["traced"].items())
            + ")"
        )
    lines.append(
        f"traced in {plan['trace_seconds']:.1f} s on fake tensors; not counted: {plan['not_counted']}"
    )
    return "\n".join(lines)


def remedies(plan: dict) -> list[str]:
    """The settings that take bytes off this plan's peak, each with the exact bytes it removes where
    the trace counted them (the encoders, the reference copy) or what it shards."""
    split, found = plan["split_bytes"], []
    if plan["strategy"] in ("none", "ddp") and plan["gpus"] > 1:
        found.append("parallel.strategy=fsdp (shards weights, gradients, AdamW state and the reference)")
    if split.get("encoders") and not plan["latent_cache"]:
        found.append(
            f"a latent cache (`vipo cache`, then data.cache=...): -{_gib(split['encoders'])} of encoders"
        )
    if (
        plan["reference_mode"] == "copy"
        and plan["mixed_precision"] == "bf16"
        and plan["reference_dtype"] == "policy"
    ):
        found.append(f"reference.dtype=bfloat16: -{_gib(split['reference'] // 2)} of the reference copy")
    if (
        plan["reference_mode"] == "copy"
        and plan["strategy"] in REPLICATED_REFERENCE
        and not plan.get("reference_offload")
        and plan.get("peak_phase") != "reference"
        and split.get("reference")
    ):
        found.append(
            f"reference.offload=true: -{_gib(split['reference'])} of the reference copy (copied from the "
            "host for each reference pass)"
        )
    if (
        plan["strategy"] in ("none", "ddp")
        and plan.get("optimizer", "adamw") == "adamw"
        and split.get("optimizer")
    ):
        # AdamW8bit: one byte a moment (and a float32 scale per 256) for the weights' two to four
        elements = plan["exact_bytes"]["trainable"] // (
            2 if plan["model"]["param_dtype"] == "bfloat16" else 4
        )
        saved = split["optimizer"] - 2 * elements
        if saved > 0:
            found.append(f"optim.optimizer=adamw8bit: about -{_gib(saved)} of AdamW state")
    if plan["strategy"] == "fsdp" and not plan.get("cpu_offload"):
        # FSDP2's CPUOffloadPolicy: shards of the weights and the optimizer's state leave the GPU
        # (and the gradients reduced by the peak, which the split does not tell from the rest)
        held = sum(split.get(key, 0) for key in ("parameters", "reference", "optimizer"))
        if held:
            found.append(
                f"parallel.cpu_offload=true: at least -{_gib(held)} of sharded weights and AdamW state "
                "(host-device copies every step)"
            )
    if not plan["model"]["gradient_checkpointing"]:
        found.append("model.gradient_checkpointing=true")
    if plan["pairs_per_gpu"] > 1:
        found.append("fewer pairs per GPU (train.batch_pairs, with train.grad_accum_steps)")
    if not plan["model"]["lora_rank"]:
        found.append("a LoRA (model.lora_rank=64 reference.mode=adapter)")
    return found


@contextlib.contextmanager
def _stdout_to_stderr():
    """stdout is the plan's alone (a script reads --json): what libraries write there while it
    traces (DeepSpeed announces the extensions it builds and logs through a handler bound to
    stdout at import) goes to stderr, at the file descriptor as well as sys.stdout."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (an embedding host): Python-level writes only
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def cmd_plan(args: argparse.Namespace) -> int:
    from ..cli import load_recipe

    cfg = load_recipe(args.recipe, args.overrides)
    with _stdout_to_stderr():
        plan = make_plan(cfg, args.gpus, parse_bytes(args.gpu_memory), args.batch_search)
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        print(render(plan))
    if not plan["fits"]:  # exit 1, one line: a pre-flight check in a script stops here
        print(
            f"vipo plan: {_gib(plan['peak_bytes_per_gpu'])} per GPU does not fit --gpu-memory {args.gpu_memory} "
            f"(over by {_gib(plan['overflow_bytes'])}, peak in {plan['peak_phase']}); to try: "
            + "; ".join(remedies(plan)),
            file=sys.stderr,
        )
        return 1
    return 0
