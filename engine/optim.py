"""The optimizer and the learning-rate schedule of `optim.*`, built for what a strategy trains.

    check_optimizer(cfg.optim, cfg.parallel.strategy, device)   at start-up, before any model
    optimizer = build_optimizer(params, cfg.optim, lr, device)  torch AdamW | bitsandbytes AdamW8bit
    schedule = build_schedule(optimizer, cfg.optim, cfg.train.max_steps)

The schedule is a LambdaLR stepped once per optimizer step (after the update, skipped updates
included), so step k's update (k = 1, 2, ...) runs at lr * f(k - 1). `warmup_constant` is vipo's
own: f(s) = min(1, (s + 1) / warmup), the first update already at lr / warmup. The others are
diffusers' `get_scheduler`, value for value: their warm-up is f(s) = s / warmup, so the first
update runs at LR 0. A checkpoint holds the LambdaLR's state_dict (its step count and last LR,
never the lambdas), and a resume rebuilds the lambdas from the config.
"""

import importlib.metadata
import importlib.util
import logging

import torch
from torch.optim.lr_scheduler import LambdaLR

from .config import ConfigError

BNB_HINT = "needs `pip install 'vipo[bnb]'` (bitsandbytes >= 0.50)"
# bitsandbytes runs its 8-bit optimizers on CUDA and, from 0.50 (the version tested), on the CPU.
BNB_CPU_SINCE = "0.50"
# bitsandbytes keeps its 8-bit state per tensor; FSDP2's DTensor shards and DeepSpeed's flat
# partitions are not what it was written for (bitsandbytes issues #89 and #1633).
BNB_STRATEGIES = ("none", "ddp")


def check_optimizer(optim_cfg, strategy: str, device: torch.device) -> None:
    """Refuse an optimizer this run cannot build, in one line, before anything is loaded."""
    if optim_cfg.optimizer != "adamw8bit":
        return
    if strategy not in BNB_STRATEGIES:  # config.validate refuses it too; kept for direct callers
        raise ConfigError(
            f"optim.optimizer=adamw8bit does not run under parallel.strategy={strategy}: use it with "
            "none or ddp, or optim.optimizer=adamw"
        )
    _check_bitsandbytes(device)


def _check_bitsandbytes(device: torch.device) -> None:
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(
            f"optim.optimizer=adamw8bit runs on a CUDA GPU or the CPU, not {device}: use optim.optimizer=adamw"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"optim.optimizer=adamw8bit {BNB_HINT}; bitsandbytes is not installed")
    if device.type == "cpu":
        from packaging.version import Version  # a dependency of bitsandbytes

        version = importlib.metadata.version("bitsandbytes")
        if Version(version) < Version(BNB_CPU_SINCE):
            raise ConfigError(
                f"optim.optimizer=adamw8bit on the CPU {BNB_HINT}; bitsandbytes {version} is installed"
            )


def import_bitsandbytes():
    """bitsandbytes, imported only when its optimizer is built. Its import logs a warning on CPUs
    with AVX512-BF16 about a 4-bit matmul kernel from the Hub, which AdamW8bit never uses."""
    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    finally:
        quiet.setLevel(level)
    return bnb


def build_optimizer(params, optim_cfg, lr: float, device: torch.device) -> torch.optim.Optimizer:
    if optim_cfg.optimizer == "adamw8bit":
        _check_bitsandbytes(device)
        bnb = import_bitsandbytes()

        # Tensors under min_8bit_size (4096 elements: biases, norms) keep fp32 state.
        return bnb.optim.AdamW8bit(
            params, lr=lr, betas=optim_cfg.betas, eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay
        )
    return torch.optim.AdamW(
        params,
        lr=lr,
        betas=optim_cfg.betas,
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        fused=device.type == "cuda",
    )


def build_schedule(optimizer, optim_cfg, max_steps: int) -> LambdaLR:
    """`optim.schedule` over `max_steps` optimizer steps (train.max_steps: micro-batches of
    gradient accumulation are not counted)."""
    name, warmup = optim_cfg.schedule, optim_cfg.warmup_steps
    if name == "warmup_constant":
        return LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=max_steps,
        num_cycles=optim_cfg.num_cycles,
        power=optim_cfg.power,
    )
