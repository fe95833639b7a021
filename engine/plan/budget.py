"""The cheap part of a plan, checked before a run's first step on a GPU: the gradients and optimizer
state still to come, against the memory the device has free once the weights are on it. A run that
cannot fit them stops in one line at start-up instead of running out of memory at its first
optimizer step. Activations are not in it (`vipo plan` traces those).

none / ddp: every rank holds every gradient and AdamW state (under ddp the gradients are views of
DDP's buckets, parallel.apply_ddp); checked before the strategy wraps the model. fsdp: each rank
holds its shard of them, checked once fully_shard has run, from the local shard of each parameter
(DTensor.to_local: ceil(d0 / N) rows on rank 0). zero2 / zero3 are not checked: DeepSpeed
allocates its partitions when it builds the engine."""

from ..errors import RunError

GIB = 2**30
UNSHARDED = ("none", "ddp")  # every rank holds every gradient and optimizer state
# bitsandbytes' AdamW8bit: two uint8 states per element, with one fp32 scale per block of 256 for
# each; tensors under 4096 elements keep two fp32 states (its min_8bit_size).
BNB_MIN_8BIT, BNB_BLOCK = 4096, 256


def _adamw8bit_state(params) -> int:
    total = 0
    for p in params:
        n = p.numel()
        total += 2 * (n + 4 * -(-n // BNB_BLOCK)) if n >= BNB_MIN_8BIT else 2 * 4 * n
    return total


def local_shard(tensor):
    """What this rank holds of a tensor: an FSDP parameter's (DTensor's) local shard, or the tensor."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def check_point(strategy: str, cpu_offload: bool = False) -> str | None:
    """When a GPU run's start-up check runs: "before_wrap" (none, ddp: whole gradients and state,
    before DDP allocates its buckets, which hold the gradients), "after_wrap" (fsdp: this rank's
    shards, once fully_shard has run), None (zero2 / zero3, and fsdp offloading gradients and state
    to the host)."""
    if strategy in UNSHARDED:
        return "before_wrap"
    if strategy == "fsdp" and not cpu_offload:
        return "after_wrap"
    return None


def bytes_to_come(params, strategy: str, optimizer: str = "adamw") -> dict[str, int] | None:
    """What the first step adds per GPU for the trainable `params` (optim.optimizer `optimizer`):
    whole tensors for none / ddp, this rank's shards for fsdp once they are sharded; None where
    this is not known here (zero2 / zero3, fsdp before fully_shard)."""
    params = [p for p in params if p.requires_grad]
    if strategy == "fsdp":
        params = [local_shard(p) for p in params if local_shard(p) is not p]
        if not params:  # not sharded yet
            return None
    elif strategy not in UNSHARDED:
        return None
    trainable = sum(p.numel() * p.element_size() for p in params)
    if optimizer == "adamw8bit":
        parts = {"gradients": trainable, "AdamW8bit state": _adamw8bit_state(params)}
    else:
        parts = {"gradients": trainable, "AdamW state": 2 * trainable}  # exp_avg, exp_avg_sq like the params
    return parts


def check_fits(params, strategy: str, free_bytes: int, device: str, *, optimizer: str = "adamw") -> None:
    parts = bytes_to_come(params, strategy, optimizer)
    if parts is None:
        return
    need = sum(parts.values())
    if need <= free_bytes:
        return
    shown = ", ".join(f"{name} {value / GIB:.1f}" for name, value in parts.items())
    if strategy == "fsdp":
        fix = "shard over more GPUs, offload (parallel.cpu_offload=true)"
    else:
        fix = "shard it (parallel.strategy=fsdp or zero2)"
    raise RunError(
        f"{device}: the first step needs {need / GIB:.1f} GiB more ({shown}) than the "
        f"{free_bytes / GIB:.1f} GiB free after the weights, before any activation: {fix}, "
        "train a LoRA (model.lora_rank), or size it with `vipo plan RECIPE --batch-search`"
    )
