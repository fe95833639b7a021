"""An exponential moving average of the trained weights (train.ema_decay): strategies none and
ddp (every rank holds every weight) and fsdp (the shadow is sharded like the weights: a DTensor
per parameter, updated on each rank's shard; whole tensors are gathered to save it).

    ema = PolicyEMA(network, decay)     float32 shadow of each trainable parameter
    ema.update()                        after each applied optimizer step (a skipped one is not)
    ema.state_dict() -> ema.safetensors in the checkpoint; ema.load(checkpoint) on resume

    shadow <- shadow + (1 - decay) * (param - shadow)      (torch._foreach_lerp_, one pass)

`vipo export RUN --ema` writes the averaged weights instead of the trained ones.
"""

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import RunError

log = logging.getLogger(__name__)
EMA_FILE = "ema.safetensors"
EMA_STRATEGIES = ("none", "ddp", "fsdp")


class PolicyEMA:
    def __init__(self, network: torch.nn.Module, decay: float):
        named = [(name, p) for name, p in network.named_parameters() if p.requires_grad]
        self.decay, self.names = decay, [name for name, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Whole float32 tensors by parameter name; under fsdp every rank calls it (a gather)."""
        return {
            name: _whole(s).detach().cpu().contiguous()
            for name, s in zip(self.names, self.shadow, strict=True)
        }

    def load(self, checkpoint: Path) -> None:
        """The shadow of `checkpoint`; a checkpoint written without EMA starts it from its weights."""
        from .checkpoint import reading

        file = Path(checkpoint) / EMA_FILE
        if not file.is_file():
            log.warning("%s has no %s: the EMA starts from the resumed weights", checkpoint, EMA_FILE)
            self.shadow = [p.detach().float().clone() for p in self.params]
            return
        with reading(file):
            saved = load_file(file)
        missing = [name for name in self.names if name not in saved]
        if missing:
            raise RunError(f"{file}: lacks the EMA of {len(missing)} trained tensors, e.g. {missing[0]}")
        self.shadow = [_like(saved[name], p) for name, p in zip(self.names, self.params, strict=True)]


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _like(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A saved whole float32 tensor laid out as `param`: this rank's shard of it for a DTensor
    (every rank read the file, so each slices its own: no communication)."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(
            whole.to(param.device, torch.float32), param.device_mesh, param.placements, src_data_rank=None
        )
    return whole.to(param.device, torch.float32)


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
