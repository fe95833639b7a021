"""Many processes: the process group, and one function per strategy that wraps the policy (and a
`copy` reference) for it. torchtitan's order: activation checkpointing (the model's own, set by
the trainer), then sharding block by block, then the root.

    none   one process; nothing is wrapped
    ddp    DistributedDataParallel: a replica per rank, gradients all-reduced (views of its buckets)
    fsdp   FSDP2 `fully_shard` on every block the model declares unsplittable, then the root
    zero2  DeepSpeed ZeRO-2: optimizer state and gradients sharded
    zero3  DeepSpeed ZeRO-3: weights sharded too

Launch with `torchrun --nproc_per_node=N -m vipo.engine train ...` or the deepspeed launcher;
both set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, which is all this reads.
Every rank takes an equal share of the global micro-batch (`train.batch_pairs` is global).
"""

import copy
import gc
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .config import REPLICATED_REFERENCE, ConfigError
from .errors import RunError

log = logging.getLogger(__name__)

DEEPSPEED = ("zero2", "zero3")
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class World:
    """Where this process stands: rank r of `size`, on `device`. `owns_group`: this object
    created the process group and tears it down in `shutdown`."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False
    context: int = 1  # ranks per context-parallel group (engine/context_parallel.py): they share samples

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Which share of the global batch (and of its noise) this rank takes."""
        return self.rank // self.context

    @property
    def data_size(self) -> int:
        """How many shares the global batch splits into: ranks / context group size."""
        return self.size // self.context

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every rank's metrics averaged over ranks, in one all-reduce: equal shares of the
        global batch make the mean of rank means the global mean."""
        if not self.distributed or self.size == 1:
            return values
        stacked = torch.stack([value.float().reshape(()).to(self.device) for value in values.values()])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        return dict(zip(values, (stacked / self.size).unbind(), strict=True))

    def max(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise maximum of a small CPU tensor over ranks (one all-reduce): how every
        rank takes the same decision from flags that only some ranks raised."""
        if not self.distributed or self.size == 1:
            return values
        reduced = values.to(self.device)
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
        return reduced.cpu()

    def gather(self, obj):
        """A picklable object from every rank, as a list on every rank."""
        if not self.distributed or self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"train.device is {name!r} but no CUDA device is available")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def world_from_env() -> tuple[int, int]:
    """(rank, world size) of a process a launcher started (RANK / WORLD_SIZE), for commands that
    split their work over independent processes without a process group (vipo cache, score-reference)."""
    try:
        rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(
            f"RANK/WORLD_SIZE must be integers, got {os.environ.get('RANK')!r}/"
            f"{os.environ.get('WORLD_SIZE')!r}"
        ) from None
    if not 0 <= rank < world_size:
        raise ConfigError(f"RANK {rank} is outside WORLD_SIZE {world_size}")
    return rank, world_size


def device_from_env(name: str) -> torch.device:
    """train.device for such a process: its LOCAL_RANK's GPU under `cuda`."""
    return pick_device(name, int(os.environ.get("LOCAL_RANK", "0")))


def init_world(parallel_cfg, device_name: str) -> World:
    """The process group from the launcher's environment: nccl on CUDA, gloo on CPU. Without a
    launcher a distributed strategy runs as a group of one (same code path, world size 1)."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if parallel_cfg.strategy == "none":
        if env_world > 1:
            raise RunError(
                f"launched as {env_world} processes but parallel.strategy is 'none': set "
                "parallel.strategy=ddp, fsdp, zero2 or zero3"
            )
        return World(device=pick_device(device_name))
    if not os.environ.get("RANK"):  # no launcher: a group of one
        log.warning(
            "parallel.strategy=%s without a launcher: this runs as ONE process. Launch it with "
            "`torchrun --nproc_per_node=N -m vipo.engine train ...` (or the deepspeed launcher) for N GPUs",
            parallel_cfg.strategy,
        )
        for key, value in (
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", str(_free_port())),
        ):
            os.environ.setdefault(key, value)
    missing = [key for key in LAUNCH_ENV if key not in os.environ]
    if missing:
        raise RunError(f"parallel.strategy={parallel_cfg.strategy}: launcher variables {missing} are not set")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = pick_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    world = World(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)
    if not world.is_main:  # one voice per run: rank 0 logs, the others only warn
        logging.getLogger("vipo").setLevel(logging.WARNING)
    return world


def shutdown(world: World, *, clean: bool = True) -> None:
    """Tear down a group this process created, leaving nothing to interpreter exit (where
    two-process ZeRO-3 on CPU was seen to die with "terminate called without an active
    exception"): the engines are already freed, then every rank reaches a barrier before any
    destroys the group, so no rank leaves while another still talks to it. After an error
    (`clean=False`) there is no barrier: the other ranks may never reach it."""
    if not (world.owns_group and dist.is_initialized()):
        return
    gc.collect()  # engines and their hooks go before the group they use
    if clean:
        dist.barrier()
    dist.destroy_process_group()
    world.owns_group = False


# ---------------------------------------------------------------------------------------------
# Blocks


def blocks(network: nn.Module) -> list[nn.Module]:
    """The units to shard: every submodule whose class the model declares unsplittable
    (diffusers' `_no_split_modules`: the transformer / UNet blocks), innermost first."""
    names = set(getattr(network, "_no_split_modules", None) or ())
    if not names:
        raise RunError(
            f"{type(network).__name__} declares no blocks (_no_split_modules): fsdp needs them to shard"
        )
    found = [
        module for module in network.modules() if type(module).__name__ in names and module is not network
    ]
    if not found:
        raise RunError(f"{type(network).__name__}: none of its blocks {sorted(names)} is in the model")
    return found[::-1]  # modules() is pre-order: reversed, children come before their parents


# ---------------------------------------------------------------------------------------------
# One function per strategy


def apply_ddp(network: nn.Module, world: World) -> nn.Module:
    """DDP with gradient_as_bucket_view: each gradient is a view into DDP's all-reduce buckets, so
    a replica holds one copy of its gradients instead of two (the buckets and .grad). Every
    trainable parameter gets a zero gradient before the wrap, which DDP turns into its bucket view
    there, so the first step's micro-batches accumulate in the buckets too; DDPStrategy zeroes them
    in place from then on (set_to_none would drop the views until the next all-reduce)."""
    from torch.nn.parallel import DistributedDataParallel

    for param in network.parameters():
        if param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(network, device_ids=device_ids, gradient_as_bucket_view=True)


def device_mesh(device_type: str, shape: tuple[int, ...], names: tuple[str, ...] | None = None):
    """init_device_mesh, its table of ranks made of real host integers also when the caller runs
    under a fake tensor mode (`vipo plan` shards a fake-tensor model over a fake process group)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import init_device_mesh

    with unset_fake_temporarily():
        return init_device_mesh(device_type, shape, mesh_dim_names=names)


def apply_fsdp(network: nn.Module, world: World, parallel_cfg, mixed_precision: str) -> nn.Module:
    """FSDP2 in place: each block, then the root (which holds what no block owns). bf16 weights
    in forward/backward with fp32 gradient reduction under mixed_precision=bf16; the sharded
    fp32 weights stay the optimizer's. With parallel.shard_size < world size the mesh is 2-D
    (replicate x shard) and FSDP2 runs hybrid sharding: gathers stay inside a shard group
    (NVLink), only the gradient all-reduce crosses groups (InfiniBand)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    shard = min(parallel_cfg.shard_size or world.size, world.size)  # one node or less: plain FSDP
    if world.size % shard:
        raise RunError(f"parallel.shard_size={shard} must divide the {world.size} processes")
    if shard == world.size:
        mesh = device_mesh(world.device.type, (world.size,))
    else:  # HSDP: shard inside groups of `shard` ranks (a node), replicate across the groups
        mesh = device_mesh(world.device.type, (world.size // shard, shard), ("replicate", "shard"))
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision == "bf16"
        else MixedPrecisionPolicy()
    )
    # Pinned host memory makes the copies to the GPU asynchronous; without a GPU there is none to pin.
    offload = (
        CPUOffloadPolicy(pin_memory=world.device.type == "cuda")
        if parallel_cfg.cpu_offload
        else OffloadPolicy()
    )
    options = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
    for block in blocks(network):
        fully_shard(block, reshard_after_forward=parallel_cfg.reshard_after_forward, **options)
    # The root's weights are needed again first in backward: keep them gathered.
    fully_shard(network, reshard_after_forward=False, **options)
    return network


def meta_start(parallel_cfg, model_cfg, world: World) -> bool:
    """Whether this run starts FSDP from rank 0's weights (parallel.meta_init): the same answer
    on every rank."""
    return (
        parallel_cfg.strategy == "fsdp" and parallel_cfg.meta_init and world.size > 1 and bool(model_cfg.path)
    )


def full_weights(network: nn.Module, world: World) -> dict[str, torch.Tensor] | None:
    """Rank 0's full state before sharding (references, no copy: they outlive fully_shard's
    swap of the parameters until `materialise` has sent them)."""
    return network.state_dict() if world.is_main else None


@torch.no_grad()
def materialise(
    network: nn.Module,
    full: dict[str, torch.Tensor] | None,
    world: World,
    *,
    buffers_from: nn.Module | None = None,
) -> None:
    """After fully_shard: the meta ranks allocate their shards, and every rank takes its shard of
    rank 0's `full` weights (DCP's broadcast_from_rank0, one tensor at a time). Buffers, which
    FSDP does not shard and which need not be in the state dict (Wan's rotary tables), are rank
    0's too: its network's own, or with `buffers_from` (a copy made on the meta device on every
    rank, rank 0 included) that module's."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if buffers_from is not None or not world.is_main:
        network.to_empty(device=world.device)
    set_model_state_dict(  # on a copy of the dict: the call puts its shards into the one it gets
        network,
        dict(full) if world.is_main else {},
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )
    sources = dict(buffers_from.named_buffers()) if buffers_from is not None else {}
    for name, buffer in network.named_buffers():
        if world.is_main and buffers_from is not None:
            buffer.copy_(sources[name])
        dist.broadcast(buffer, src=0)
    if world.is_main:
        shard = sum(p.to_local().numel() for p in network.parameters())
        whole = sum(p.numel() for p in network.parameters())
        log.info(
            "sharded rank 0's %.1fM weights over %d ranks (%.1fM each)", whole / 1e6, world.size, shard / 1e6
        )


@torch.no_grad()
def first_forward(
    adapter, network: nn.Module, latents: torch.Tensor, cond: dict, device: torch.device
) -> None:
    """One forward of one sample through an FSDP root, in the training state. FSDP2 settles
    each block's gradient dtypes at the root's first forward from which weights require grad
    then; PEFT turns that off for the LoRA weights while the adapter reference runs (the first
    forward of every step), which would leave bf16 LoRA gradients unreduced to fp32."""
    from torch.distributed.fsdp import FSDPModule

    latents = latents[:1]
    t = adapter.sample_timesteps(1, torch.Generator(device=device).manual_seed(0))
    adapter.predict(network, latents, t, cond)
    for module in network.modules():  # no backward follows to free what the forward gathered
        if isinstance(module, FSDPModule):
            module.reshard()


def deepspeed_config(parallel_cfg, train_cfg, optim_cfg, world: World, gpu: bool | None = None) -> dict:
    """The DeepSpeed config of a recipe, or the user's JSON with vipo's batch and clipping
    filled in. The recipe owns optimizer and schedule (so every strategy trains alike); a
    file that sets them, or a batch size that disagrees with the recipe, is refused. `gpu`
    (default: whether the world's device is CUDA) is the machine the config is for: `vipo plan`
    traces on a CPU the config a GPU run gets (overlap_comm, which doubles ZeRO-2's buckets)."""
    gpu = world.device.type == "cuda" if gpu is None else gpu
    stage = 2 if parallel_cfg.strategy == "zero2" else 3
    per_rank = train_cfg.batch_pairs // world.size
    owned = {
        "train_micro_batch_size_per_gpu": per_rank,
        "gradient_accumulation_steps": train_cfg.grad_accum_steps,
        "train_batch_size": per_rank * train_cfg.grad_accum_steps * world.size,
        "gradient_clipping": optim_cfg.max_grad_norm,
    }
    if parallel_cfg.deepspeed_config:
        where = parallel_cfg.deepspeed_config
        try:
            config = json.loads(Path(where).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ConfigError(f"parallel.deepspeed_config {where}: not valid JSON: {err}") from None
        for key in ("optimizer", "scheduler"):
            if key in config:
                raise ConfigError(
                    f"parallel.deepspeed_config {where}: remove '{key}'; the recipe's optim.* section sets it"
                )
        for key, value in owned.items():
            if key in config and config[key] != "auto" and config[key] != value:
                raise ConfigError(
                    f"parallel.deepspeed_config {where}: {key} is {config[key]!r} but the recipe gives "
                    f'{value!r} (set it from train.* / optim.*, or write "auto")'
                )
        bf16 = train_cfg.mixed_precision == "bf16"
        if config.get("bf16", {}).get("enabled", bf16) != bf16:
            raise ConfigError(
                f"parallel.deepspeed_config {where}: bf16.enabled is {not bf16} but train.mixed_precision is "
                f"{train_cfg.mixed_precision!r}: make them agree"
            )
        if config.get("fp16", {}).get("enabled", False):
            raise ConfigError(
                f"parallel.deepspeed_config {where}: fp16 is not supported; use bf16 (train.mixed_precision=bf16)"
            )
        file_stage = config.get("zero_optimization", {}).get("stage", stage)
        if file_stage != stage:
            raise ConfigError(
                f"parallel.deepspeed_config {where}: zero_optimization.stage is {file_stage} but "
                f"parallel.strategy is {parallel_cfg.strategy}"
            )
    else:
        config = {"zero_optimization": {"stage": stage, "overlap_comm": gpu}}
        if train_cfg.mixed_precision == "bf16":
            config["bf16"] = {"enabled": True}
    config = copy.deepcopy(config)
    config.update(owned)
    if train_cfg.mixed_precision == "bf16":
        config.setdefault("bf16", {"enabled": True})
    config.setdefault("zero_optimization", {})["stage"] = stage
    config.setdefault("steps_per_print", 2**31 - 1)  # vipo logs; DeepSpeed stays quiet
    # The recipe's AdamW, run by ZeRO on its partitions (also with an offloaded optimizer).
    config["zero_allow_untested_optimizer"] = True
    config["zero_force_ds_cpu_optimizer"] = False
    return config


def extensions_note() -> str | None:
    """What to say before DeepSpeed's first start on a machine: it JIT-builds its C++/CUDA
    extensions then (minutes without output), and caches them. None once a build is cached."""
    import os

    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    if os.path.isdir(root) and any(os.scandir(root)):
        return None
    return (
        f"DeepSpeed builds its C++/CUDA extensions on its first start on this machine: minutes with no "
        f"output, once (cached in {root}; TORCH_EXTENSIONS_DIR moves the cache)"
    )


def apply_deepspeed(network: nn.Module, optimizer, ds_config: dict):
    """deepspeed.initialize with the recipe's optimizer; returns the engine (forward, backward
    and step go through it)."""
    import deepspeed

    note = extensions_note()
    if note:
        log.info(note)
    engine, *_ = deepspeed.initialize(model=network, optimizer=optimizer, config=ds_config)
    return engine


def apply_deepspeed_reference(network: nn.Module, ds_config: dict):
    """A frozen copy under ZeRO-3: weights partitioned like the policy's, no optimizer (as TRL
    prepares its reference model)."""
    import deepspeed

    config = {key: value for key, value in ds_config.items() if key not in ("gradient_clipping",)}
    engine, *_ = deepspeed.initialize(model=network, config=config)
    engine.eval()
    return engine


def parallelize_reference(
    reference, strategy: str, world: World, parallel_cfg, mixed_precision, ds_config, *, initial=None
):
    """Shard a `copy` reference like the policy; the other modes hold no second network.
    `initial` (policy, its weights from `full_weights` or None off rank 0): the reference was made
    on the meta device on every rank and takes rank 0's initial policy weights (`materialise`)."""
    network = getattr(reference, "network", None)
    if network is None or strategy in REPLICATED_REFERENCE:
        return  # replicated: no grads and no optimizer state, so there is nothing to shard
    if strategy == "fsdp":
        reference.network = apply_fsdp(network, world, parallel_cfg, mixed_precision)
        if initial is not None:
            policy, weights = initial
            materialise(reference.network, weights, world, buffers_from=policy)
    elif strategy == "zero3":
        reference.network = apply_deepspeed_reference(network, ds_config)


def unwrap(policy) -> nn.Module:
    """The network under a DDP wrapper or a DeepSpeed engine."""
    return getattr(policy, "module", policy)


def rank_generator(seed: int, world: World, device: torch.device, per_rank: bool) -> torch.Generator:
    """The noise generator: one stream shared by all ranks (global draw), or one per (seed, data
    rank): the ranks of a context group draw the same noise."""
    if per_rank and world.data_size > 1:
        import numpy as np

        seed = int(np.random.SeedSequence([seed, world.data_rank]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(seed)
