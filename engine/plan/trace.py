"""One training step of the engine, traced on fake tensors (or run on real ones, the truth check)."""

import functools
import gc
import math
import os
import sys
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from unittest import mock

import torch
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, _MemRefType

from .. import parallel
from ..config import RunConfig
from ..parallel import LAUNCH_ENV
from .budget import local_shard
from .tracking import (
    PHASES,
    StepMemTracker,
    TotalFlopCounter,
    _merged,
    collections_at_marks,
    cuda_autocast_policy,
)

# ---------------------------------------------------------------------------------------------
# One step


@dataclass
class StepTrace:
    """What one traced step measured (bytes and FLOPs of one rank)."""

    pairs: int
    peak_bytes: int
    peak_phase: str
    split: dict[str, int]  # the peak by what holds it; sums to peak_bytes
    phase_peaks: dict[str, int]
    flops: dict[str, int]  # per phase, as executed (checkpoint recompute falls in backward)
    exact: dict[str, int]  # counted from the model: policy, trainable, reference, encoders bytes
    attention_ops: dict[str, dict[str, int]]
    seconds: float
    after_step: dict[str, int] = field(default_factory=dict)  # held when the step ends, by MemTracker kind
    host_peak_bytes: int = 0  # parallel.cpu_offload: the most host memory the offloaded state took
    host_split: dict[str, int] = field(default_factory=dict)  # host memory by role at the device's peak

    @property
    def flops_per_pair(self) -> int:
        return sum(self.flops.values()) // self.pairs


class _ZeroTable:
    """reference.mode=precomputed's table: e_ref [2B] from the host, as the real table hands it."""

    def lookup(self, ids, epoch) -> torch.Tensor:
        return torch.zeros(2 * len(ids))


def _bytes(module) -> int:
    if not isinstance(module, torch.nn.Module):
        return 0
    tensors = [local_shard(t) for t in (*module.parameters(), *module.buffers())]
    return sum(t.numel() * t.element_size() for t in tensors)


@contextmanager
def fake_world(size: int):
    """Rank 0 of `size` processes in this one: torch's fake process group (its collectives move no
    data and give outputs of the right shapes), with the launcher's variables set, so the engine's
    init_world joins it and its strategy shards as on `size` GPUs. Both are undone on exit."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("vipo plan traces a sharded step in a process with no process group")
    saved = {key: os.environ.get(key) for key in LAUNCH_ENV}
    os.environ.update(
        RANK="0", WORLD_SIZE=str(size), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="0"
    )
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        _forget_deepspeed_groups()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _forget_deepspeed_groups() -> None:
    """DeepSpeed keeps the process groups it made (and its communication backend) in module
    globals for the life of the process, which in training is one process group's. A plan
    traces many fake worlds one after another: each new engine must make its groups anew."""
    groups, comm = sys.modules.get("deepspeed.utils.groups"), sys.modules.get("deepspeed.comm.comm")
    if groups is not None:
        for name, value in list(vars(groups).items()):
            if name.startswith("_") and name.endswith(("_GROUP", "_GROUP_RANKS")):
                setattr(groups, name, {} if isinstance(value, dict) else None)
        groups.mesh_device = None
    if comm is not None:
        comm.cdb = None


def pixel_shape(cfg: RunConfig) -> tuple[int, ...]:
    """One sample's pixels [3, H, W] (or [3, F, H, W]) at the recipe's resolution."""
    from ..families import FAMILIES

    data = cfg.data
    if data.buckets:  # the largest bucket: the one that decides the peak
        width, height = max(data.buckets, key=lambda size: size[0] * size[1])
    elif data.bucket_area:
        width = height = math.isqrt(data.bucket_area)
    else:
        width = height = data.resolution
    if FAMILIES[cfg.model.family].video:
        return (3, data.num_frames, height, width)
    return (3, height, width)


def _batch(trainer, cfg: RunConfig, shapes, fake: bool):
    """This rank's share of the global micro-batch."""
    from ..objectives import LatentPairBatch, PairBatch

    pairs = cfg.train.batch_pairs // trainer.world.data_size
    ids = [f"plan-{i}" for i in range(pairs)]
    make = torch.empty if fake else torch.randn
    if cfg.data.cache:
        latent_shape, cond_shapes = shapes
        dtype = trainer.adapter.dtype
        latents = make((2 * pairs, *latent_shape), dtype=dtype)
        cond = {key: make((pairs, *shape), dtype=dtype) for key, shape in cond_shapes.items()}
        return LatentPairBatch(ids, 0, latents, cond)
    pixels = make((2 * pairs, *pixel_shape(cfg)))
    return PairBatch(ids, ["a red cube on the table"] * pairs, pixels if fake else pixels.clamp(-1, 1))


def _probe(trainer, cfg: RunConfig, fake: bool, shapes):
    """Trainer._probe's (latents, cond) of one sample at the recipe's size: encoded from pixels, or,
    from a latent cache (`shapes`: the encoders are freed), of the cache's shapes."""
    make = torch.empty if fake else torch.zeros
    if shapes is not None:
        latent_shape, cond_shapes = shapes
        dtype = trainer.adapter.dtype
        cond = {key: make((1, *shape), dtype=dtype) for key, shape in cond_shapes.items()}
        return make((1, *latent_shape), dtype=dtype), cond
    pixels = make((1, *pixel_shape(cfg)), device=trainer.device)
    return trainer.adapter.encode_pixels(pixels), trainer.adapter.encode_prompts([""])


def _cache_shapes(cfg: RunConfig):
    """(one latent's shape, one prompt's conditioning shapes) from a frozen build's encoders: what
    `vipo cache` stored. Built and freed before the traced trainer."""
    from ..models import build_adapter

    adapter = build_adapter(cfg.model, torch.device("cpu"), seed=cfg.train.seed, trainable=False)
    with torch.no_grad():
        latent = adapter.encode_pixels(torch.zeros(1, *pixel_shape(cfg)))
        cond = adapter.encode_prompts([""])
    return tuple(latent.shape[1:]), {key: tuple(value.shape[1:]) for key, value in cond.items()}


def _no_output_memo(mode) -> None:
    """Keep a fake mode from memoizing the outputs of its ops by their (fresh, never looked up again)
    meta tensors: the memo's weak reference makes every `module.to(...)` of a fake-built module fail
    (torch swaps fake parameters, which a weakly referenced tensor refuses). Real tensors entering
    the mode keep their memo."""
    converter = mode.fake_tensor_converter
    memo = converter.set_tensor_memo
    converter.set_tensor_memo = lambda tensor, fake: (
        None if tensor.device.type == "meta" else memo(tensor, fake)
    )


@contextmanager
def _moves_in_place():
    """Module.to onto the device and dtype a module already has returns it unchanged. DeepSpeed's
    engine calls `module.to(device)` on a model already there; torch then swaps every parameter
    with its own copy, which fails for fake parameters the memory tracker holds weak references to."""
    move = torch.nn.Module.to

    def to(module, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        tensors = [*module.parameters(), *module.buffers()]
        if dtype is None and device is not None and all(t.device == torch.device(device) for t in tensors):
            return module
        return move(module, *args, **kwargs)

    with mock.patch.object(torch.nn.Module, "to", to):
        yield


@contextmanager
def _deepspeed_patches_undone():
    """DeepSpeed's engine patches torch for the life of the process (ZeRO-3: `F.linear` becomes its
    memory-efficient linear; `torch.manual_seed` and `Module` gain wrappers). Right for the run
    that made the engine, wrong for the next trace in the same process (a batch search, the
    strategy table: a baseline traced after a zero3 cell saved less): undone when the trace ends."""
    import torch.nn.functional as F

    saved = [(holder, dict(vars(holder))) for holder in (F, torch.nn.Module)]
    seed = torch.manual_seed
    try:
        yield
    finally:
        torch.manual_seed = seed
        for holder, before in saved:
            for name in set(vars(holder)) - set(before):
                delattr(holder, name)
            for name, value in before.items():
                if vars(holder).get(name) is not value:
                    setattr(holder, name, value)


@contextmanager
def _zero_host_checks():
    """The two host reads of ZeRO's step that a fake tensor cannot answer. `is_invalid_grad_norm`
    (bool() of the gradient norm) answers finite: the step a GPU takes when nothing overflows (an
    overflowing step allocates less: it skips the update). ZeRO-3's `assert_ints_same_as_other_ranks`
    (rank 0's module and parameter order broadcast, read back with .item() and compared) passes:
    a fake world's other ranks are rank 0 itself."""
    from deepspeed.runtime.zero import (
        partition_parameters,
        partitioned_param_coordinator,
        stage3,
        stage_1_and_2,
    )

    with ExitStack() as patches:
        for module in (stage_1_and_2, stage3):
            patches.enter_context(mock.patch.object(module, "is_invalid_grad_norm", lambda norm: False))
        for module in (partition_parameters, partitioned_param_coordinator, stage3):
            patches.enter_context(
                mock.patch.object(module, "assert_ints_same_as_other_ranks", lambda ints: None)
            )
        for optimizer in (stage_1_and_2.DeepSpeedZeroOptimizer, stage3.DeepSpeedZeroOptimizer_Stage3):
            patches.enter_context(
                mock.patch.object(optimizer, "has_overflow", lambda self, *args, **kw: False)
            )
        yield


def _deepspeed_tensors(trainer, engine) -> list[torch.Tensor]:
    """Every tensor DeepSpeed holds for the policy and the reference outside their modules: the
    ZeRO optimizer's fp32 partitions, flat bf16 groups and gradient buffers (found by walking its
    attributes and DeepSpeed's own objects under them), and ZeRO-3's partition of each parameter
    (`ds_tensor`). MemTracker sees tensors made before it only when it is told of them."""
    found, seen = [], set()

    def walk(value, depth: int) -> None:
        if id(value) in seen or depth > 6:
            return
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple, set)):
            for item in value:
                walk(item, depth + 1)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item, depth + 1)
        elif isinstance(value, torch.optim.Optimizer):  # the AdamW ZeRO runs: its fp32 partitions
            walk(value.param_groups, depth + 1)
            walk(value.state, depth + 1)
        elif type(value).__module__.startswith("deepspeed") and not isinstance(value, torch.nn.Module):
            for item in vars(value).values() if hasattr(value, "__dict__") else ():
                walk(item, depth + 1)

    walk(engine.optimizer, 0)
    for network in (trainer.network, getattr(trainer.reference, "network", None)):
        for param in network.parameters() if isinstance(network, torch.nn.Module) else ():
            walk(getattr(param, "ds_tensor", None), 0)
    return found


def _adamw_state(trainer, engine) -> None:
    """AdamW's state as after a first step, by one step on zero gradients: on the trainable
    parameters, or ZeRO's fp32 partitions. ZeRO-2 keeps its partitions in the AdamW's groups;
    ZeRO-3 puts each sub-group's partition there only for its own step, so it is done so here."""
    optimizer = trainer.optimizer
    zero = getattr(engine, "optimizer", None)
    flats = getattr(zero, "fp32_partitioned_groups_flat", None)
    if flats is None:  # the parameters, or ZeRO-2's single_partition_of_fp32_groups (in the groups)
        tensors = [p for group in optimizer.param_groups for p in group["params"]]
        kept = [tensor.grad for tensor in tensors]  # ddp's: views of its buckets, which stay
        for tensor, grad in zip(tensors, kept, strict=True):
            tensor.grad = torch.zeros_like(tensor) if grad is None else grad
        optimizer.step()
        for tensor, grad in zip(tensors, kept, strict=True):
            tensor.grad = grad
        return
    for sub_group, flat in enumerate(flats):
        group = optimizer.param_groups[zero.sub_group_to_group_id[sub_group]]
        kept, group["params"] = group["params"], [flat]
        flat.grad = torch.zeros_like(flat)
        optimizer.step()
        flat.grad, group["params"] = None, kept


def _fsdp_params(module):
    """The FSDPParams of every fully_shard'ed module under `module` (none for a plain module)."""
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules() if isinstance(module, torch.nn.Module) else ():
        if isinstance(sub, FSDPModule):
            for group in sub._get_fsdp_state()._fsdp_param_groups:
                yield from group.fsdp_params


def _mark_offloaded(tracker, trainer, ref_network) -> None:
    """parallel.cpu_offload: what FSDP2's CPUOffloadPolicy keeps in host memory, marked so the
    device's peak leaves it out: the sharded weights (policy and copy reference), the sharded
    gradients (also those of earlier micro-batches) and the optimizer's state, which steps on the
    host with the sharded weights."""
    for fsdp_param in _fsdp_params(trainer.network):
        tracker.mark_host(fsdp_param._sharded_param_data, "policy")
        tracker.mark_host(fsdp_param.sharded_param.grad, "gradients")
    for fsdp_param in _fsdp_params(ref_network):
        tracker.mark_host(fsdp_param._sharded_param_data, "reference")
    for state in trainer.optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                tracker.mark_host(value, "optimizer")


@contextmanager
def _gradients_to_host(tracker):
    """FSDP2's reduce-scatter under CPUOffloadPolicy copies each sharded gradient to the host and
    drops the device's (foreach_reduce: `.to("cpu")`, a no-op on a CPU trace, which keeps the
    reduce-scatter output as the gradient): that output is host memory once the call returns."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    reduce = _fsdp_param_group.foreach_reduce

    def foreach_reduce(fsdp_params, *args, **kwargs):
        result = reduce(fsdp_params, *args, **kwargs)
        for fsdp_param in fsdp_params:
            if fsdp_param.offload_to_cpu:
                tracker.mark_host(fsdp_param.sharded_param.grad, "gradients")
        return result

    with mock.patch.object(_fsdp_param_group, "foreach_reduce", foreach_reduce):
        yield


@contextmanager
def _real_quantization_maps():
    """bitsandbytes' AdamW8bit builds its two 256-entry quantization maps from Python lists of
    tensor values when it is constructed; under the fake mode a value has none, so the maps (1 KiB
    each, shared by every parameter) are made of real tensors."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from ..optim import import_bitsandbytes

    functional = import_bitsandbytes().functional
    made = functional.create_dynamic_map

    def create_dynamic_map(*args, **kwargs):
        with unset_fake_temporarily():
            return made(*args, **kwargs)

    with mock.patch.object(functional, "create_dynamic_map", create_dynamic_map):
        yield


def _ddp_bucket_views(network, world):
    """parallel.apply_ddp on fake tensors, whose C++ reducer takes none: what DDP leaves in memory
    and nothing else. With gradient_as_bucket_view its buckets are one buffer per dtype the size of
    every trainable parameter (bucket_cap_mb cuts it into pieces of it, no padding) and each .grad
    is a view of it; the autograd engine accumulates into the views in place, the reducer averages
    them in place and all-reduces the buckets in place. The replica stays unwrapped: the traced
    micro-batch is the last, which DDP runs as the module's own forward and backward."""
    groups: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for param in network.parameters():
        if param.requires_grad:
            groups.setdefault(param.dtype, []).append(param)
    for dtype, params in groups.items():
        bucket = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
        offset = 0
        for param in params:
            param.grad = bucket[offset : offset + param.numel()].view_as(param)
            offset += param.numel()
    return network


def bucket_as_it_is(seen: list | None, bucket):
    """A DDP comm hook for the fake process group, whose all-reduce gives DDP's reducer no result it
    takes: the bucket as it is (NCCL's all-reduce, in place, allocates nothing either). Its state,
    when a list, collects the buckets."""
    if seen is not None:
        seen.append(bucket.buffer())
    done = torch.futures.Future()
    done.set_result(bucket.buffer())
    return done


def _ddp_on_the_fake_group(network, world):
    """The real parallel.apply_ddp (real tensors, the truth check of _ddp_bucket_views), its
    all-reduce bucket_as_it_is."""
    wrapped = _real_apply_ddp(network, world)
    wrapped.register_comm_hook(None, bucket_as_it_is)
    return wrapped


_real_apply_ddp = parallel.apply_ddp


def trace_step(cfg: RunConfig, *, fake: bool = True) -> StepTrace:
    """Trace one step of `cfg` (a config from `plan_config`): fake tensors, or (`fake=False`, tiny
    models only) real CPU tensors measured the same way, the truth check of the fake trace."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vipo.loaders.procedural import ProceduralPairs

    from ..reference.precomputed import PrecomputedReference
    from ..trainer import Trainer

    started = time.perf_counter()
    reference = None
    if cfg.reference.mode == "precomputed":

        def reference(adapter):
            return PrecomputedReference(adapter, _ZeroTable())

    with ExitStack() as stack:
        if cfg.parallel.strategy in ("zero2", "zero3"):
            stack.enter_context(_deepspeed_patches_undone())
        stack.enter_context(warnings.catch_warnings())
        # deepcopy (the copy reference) asks a fake tensor for its data pointer; harmless here
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        if fake:
            _no_output_memo(stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True)))
            if cfg.parallel.strategy in ("zero2", "zero3"):
                stack.enter_context(_moves_in_place())
            if cfg.optim.optimizer == "adamw8bit":
                stack.enter_context(_real_quantization_maps())
        if cfg.train.mixed_precision == "bf16":
            stack.enter_context(cuda_autocast_policy())
        shapes = _cache_shapes(cfg) if cfg.data.cache else None
        # The pair source only sizes the sampler and gives the vocabulary; its records are never drawn.
        source = ProceduralPairs(max(8, cfg.train.batch_pairs), resolution=16, seed=cfg.train.seed)
        # FSDP's first forward: one sample at the recipe's size, not the stand-in source's 16 px
        probe = mock.patch.object(Trainer, "_probe", lambda self: _probe(self, cfg, fake, shapes))
        stack.enter_context(probe)
        # ZeRO as a GPU run configures it (overlap_comm: two gradient buckets instead of one)
        gpu_config = functools.partial(parallel.deepspeed_config, gpu=True)
        stack.enter_context(mock.patch.object(parallel, "deepspeed_config", gpu_config))
        if cfg.parallel.strategy == "ddp":  # DDP's reducer is C++ and takes no fake tensors
            wrap = _ddp_bucket_views if fake else _ddp_on_the_fake_group
            stack.enter_context(mock.patch.object(parallel, "apply_ddp", wrap))
        trainer = stack.enter_context(Trainer(cfg, progress=False, data=source, reference=reference))
        if cfg.optim.optimizer == "adamw":  # the AdamW a GPU run builds (strategies: fused on cuda)
            for group in trainer.optimizer.param_groups:
                group.update(fused=True, foreach=False)
        engine = getattr(trainer.strategy, "engine", None)  # DeepSpeed's, under zero2 / zero3
        _adamw_state(trainer, engine)  # the optimizer state of a step after the first
        trainer.strategy.zero_grad()
        if engine is not None and fake:
            stack.enter_context(_zero_host_checks())
        accum = cfg.train.grad_accum_steps
        if accum > 1 and engine is not None:  # ZeRO accumulates in its own buffers: run a micro-batch
            trainer.forward_backward(_batch(trainer, cfg, shapes, fake), accum=accum, last=False)
        elif accum > 1:  # the last micro-batch: the earlier ones' gradients are there from its start
            for param in trainer.params:
                if param.grad is None:  # (ddp's are views of its buckets already)
                    param.grad = torch.zeros_like(param)
        adapter = trainer.adapter
        encoders = [v for k, v in vars(adapter).items() if k.startswith(("text_encoder", "vae"))]
        ref_network = getattr(trainer.reference, "network", None)
        tracker = StepMemTracker()
        tracker.track_external(trainer.network, ref_network, *[e for e in encoders if _bytes(e)])
        tracker.track_external(trainer.optimizer)
        if engine is not None:  # ZeRO's partitions and buffers, made at initialize, held by no module
            tracker.track_external(*_deepspeed_tensors(trainer, engine))
        offload = cfg.parallel.strategy == "fsdp" and cfg.parallel.cpu_offload
        if offload:
            _mark_offloaded(tracker, trainer, ref_network)
            stack.enter_context(_gradients_to_host(tracker))
        host_weights = getattr(trainer.reference, "host", None)
        if host_weights is not None:  # reference.offload: the copy's weights between its passes
            for flat in host_weights.flats:
                tracker.mark_host(flat, "reference")
        counter = TotalFlopCounter()
        flops: dict[str, int] = {}

        def mark(phase: str) -> None:
            gc.collect()  # cyclic garbage goes at phase ends, never at a threshold (see below)
            flops[phase] = counter.get_total_flops() - sum(flops.values())
            later = PHASES[PHASES.index(phase) + 1 :]
            tracker.phase = later[0] if later else phase

        trainer.mark = mark
        stack.enter_context(collections_at_marks())

        with tracker, counter:
            if accum == 1:
                trainer.strategy.zero_grad()
            batch = _batch(trainer, cfg, shapes, fake)
            mark("data")
            trainer.forward_backward(batch, accum=accum, last=True)
            if engine is not None:  # ZeRO's step: its clip, partitions' AdamW, and the gather after
                engine.step()
            else:
                trainer.strategy._clip()  # strategy.update's clip and step, without its host syncs
                trainer.optimizer.step()
            mark("optimizer")
        after = _merged(tracker.get_tracker_snapshot("current"))
        world_shares = trainer.world.data_size
        trainable = sum(local_shard(p).numel() * p.element_size() for p in trainer.params)
        exact = {
            "policy": _bytes(trainer.network),
            "trainable": trainable,
            "trainable_tensors": len(trainer.params),
            "reference": _bytes(ref_network),
            "encoders": sum(_bytes(e) for e in encoders),
        }
    peak = tracker.peak()  # the device's: host memory (parallel.cpu_offload) left out
    host_roles = tracker.host_at_peak[1]
    held = sum(peak.get(key, 0) for key in (_MemRefType.PARAM, _MemRefType.BUFFER, _MemRefType.OTH))
    split = {
        "parameters": exact["policy"] - host_roles.get("policy", 0),
        "reference": exact["reference"] - host_roles.get("reference", 0),
        "encoders": exact["encoders"],
        "gradients": peak.get(_MemRefType.GRAD, 0),
        "optimizer": peak.get(_MemRefType.OPT, 0),
        "activations": peak.get(_MemRefType.ACT, 0),
        "temporaries": peak.get(_MemRefType.TEMP, 0),
        "other": held - exact["policy"] - exact["reference"] - exact["encoders"],
    }
    split["other"] += host_roles.get("policy", 0) + host_roles.get("reference", 0)
    if host_weights is not None and tracker.peak_phase == "reference":
        # reference.offload: the pass's device copy of the weights is whole for all of the pass
        split["reference"] += host_weights.nbytes
        split["other"] -= host_weights.nbytes
    return StepTrace(
        pairs=cfg.train.batch_pairs // world_shares,
        peak_bytes=peak.get(_TOTAL_KEY, 0),
        peak_phase=tracker.peak_phase,
        split=split,
        phase_peaks=tracker.phase_peaks,
        flops={phase: flops.get(phase, 0) for phase in PHASES if phase in flops},
        exact=exact,
        attention_ops={phase: dict(ops) for phase, ops in tracker.attention_ops.items()},
        seconds=time.perf_counter() - started,
        after_step={str(getattr(key, "value", key)): value for key, value in after.items()},
        host_peak_bytes=tracker.host_peak,
        host_split=dict(host_roles),
    )
