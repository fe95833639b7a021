"""An exponential moving average of the trained weights (train.ema_decay), held like the
strategy holds the weights it updates:

    none, ddp   a whole float32 tensor per trainable parameter (every rank holds every weight)
    fsdp        a DTensor per parameter, updated on each rank's shard
    zero2       this rank's fragment of each parameter's fp32 master weights (DeepSpeed's
                `_hp_mapping`: the slice of the parameter inside this rank's flat partition)
    zero3       this rank's partition of each parameter's fp32 master (`get_local_fp32_param`)

Under ZeRO the shadow follows DeepSpeed's fp32 master copy, not the bf16 module weights, so a
bf16 run averages the weights its optimizer keeps. Whole tensors are gathered to save it (every
rank calls `state_dict`), and each rank takes its own piece of them at resume, so a checkpoint
resumes on any world size and any of these strategies.

    ema = PolicyEMA(network, decay)     float32 shadow of each trainable parameter
    ema.update()                        after each applied optimizer step (a skipped one is not)
    ema.state_dict() -> ema.safetensors in the checkpoint; ema.load(checkpoint) on resume

    shadow <- shadow + (1 - decay) * (param - shadow)      (torch._foreach_lerp_, one pass)

`vipo export RUN --ema` writes the averaged weights instead of the trained ones.
"""

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from .errors import RunError

log = logging.getLogger(__name__)
EMA_FILE = "ema.safetensors"
EMA_STRATEGIES = ("none", "ddp", "fsdp", "zero2", "zero3")


def _master(param: torch.Tensor) -> torch.Tensor:
    """This rank's fp32 piece of `param` that the optimizer updates (see the module docstring)."""
    if hasattr(param, "ds_id"):  # ZeRO-3: a view of the flat fp32 partition
        return param._z3_optimizer.get_local_fp32_param(param)
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2: the fragment in this rank's partition, or none
        mapping = param._hp_mapping
        return mapping.get_hp_fragment() if mapping is not None else torch.empty(0, device=param.device)
    return param.detach().float()


class PolicyEMA:
    def __init__(self, network: torch.nn.Module, decay: float):
        named = [(name, p) for name, p in network.named_parameters() if p.requires_grad]
        self.decay, self.names = decay, [name for name, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [_master(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        pieces = [(s, _master(p).float()) for s, p in zip(self.shadow, self.params, strict=True) if s.numel()]
        if pieces:
            torch._foreach_lerp_([s for s, _ in pieces], [m for _, m in pieces], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Whole float32 tensors by parameter name; under fsdp and ZeRO every rank calls it (a gather)."""
        return {
            name: _whole(s, p).detach().cpu().contiguous()
            for name, s, p in zip(self.names, self.shadow, self.params, strict=True)
        }

    def load(self, checkpoint: Path) -> None:
        """The shadow of `checkpoint`; a checkpoint written without EMA starts it from its weights."""
        from .checkpoint import reading

        file = Path(checkpoint) / EMA_FILE
        if not file.is_file():
            log.warning("%s has no %s: the EMA starts from the resumed weights", checkpoint, EMA_FILE)
            self.shadow = [_master(p).detach().float().clone() for p in self.params]
            return
        with reading(file):
            saved = load_file(file)
        missing = [name for name in self.names if name not in saved]
        if missing:
            raise RunError(f"{file}: lacks the EMA of {len(missing)} trained tensors, e.g. {missing[0]}")
        self.shadow = [_like(saved[name], p) for name, p in zip(self.names, self.params, strict=True)]


def _whole(shadow: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole float32 tensor of `param`'s shadow (a collective under fsdp and ZeRO)."""
    if hasattr(param, "ds_id"):  # equal partitions in rank order, the last one padded
        group = param.ds_process_group
        parts = [torch.empty_like(shadow) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shadow.contiguous(), group=group)
        return torch.cat(parts)[: param.ds_numel].view(param.ds_shape)
    if hasattr(param, "_hp_mapping"):  # each rank's fragment in place, the rest zeros, summed
        whole = torch.zeros(param.numel(), dtype=torch.float32, device=shadow.device)
        if param._hp_mapping is not None:
            address = param._hp_mapping.lp_fragment_address
            whole.narrow(0, address.start, address.numel).copy_(shadow)
        dist.all_reduce(whole, group=param._dp_group)
        return whole.view(param.shape)
    return shadow.full_tensor() if hasattr(shadow, "full_tensor") else shadow


def _like(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A saved whole float32 tensor laid out as `param`'s shadow: this rank's shard, fragment or
    partition of it (every rank read the file, so each slices its own: no communication)."""
    whole = whole.to(param.device, torch.float32)
    if hasattr(param, "ds_id"):
        size = _master(param).numel()
        start = size * dist.get_rank(param.ds_process_group)
        flat = torch.zeros(size * dist.get_world_size(param.ds_process_group), device=whole.device)
        flat[: whole.numel()] = whole.flatten()
        return flat[start : start + size].clone()
    if hasattr(param, "_hp_mapping"):
        if param._hp_mapping is None:
            return torch.empty(0, device=whole.device)
        address = param._hp_mapping.lp_fragment_address
        return whole.flatten().narrow(0, address.start, address.numel).clone()
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)
    return whole


def load_ema_weights(checkpoint: Path, network: torch.nn.Module) -> None:
    """Replace `network`'s trained tensors by the EMA saved in `checkpoint` (for export)."""
    from .checkpoint import reading

    file = Path(checkpoint) / EMA_FILE
    if not file.is_file():
        raise RunError(f"{checkpoint} has no {EMA_FILE}: the run trained without train.ema_decay")
    with reading(file):
        saved = load_file(file)
    params = dict(network.named_parameters())
    unknown = [name for name in saved if name not in params]
    if unknown:
        raise RunError(f"{file}: {len(unknown)} tensors match no weight of the model, e.g. {unknown[0]}")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value.to(params[name].dtype))
