"""Model families behind one adapter protocol (see base.py)."""

import importlib

import torch

from ..families import FAMILIES as _FAMILIES
from .base import DiffusionAdapter, configure_attention, denoiser_on_meta, frozen_mode, load_architecture

# family -> (module of this package, builder function)
BUILDERS = {name: (f.module, f.builder) for name, f in _FAMILIES.items()}
FAMILIES = tuple(BUILDERS)
# The denoiser's attention projections: the LoRA targets of every family (UNet and DiT blocks
# alike name them so in diffusers).
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def build_model(model_cfg, device: torch.device, vocabulary: list[str] | None = None) -> DiffusionAdapter:
    """The adapter of `model_cfg.family`, from `model_cfg.path` or random weights of `model_cfg.config`.
    Each family's module (and its diffusers/transformers imports) loads only when used."""
    if model_cfg.family not in BUILDERS:
        raise ValueError(f"unknown model.family {model_cfg.family!r} (known: {', '.join(FAMILIES)})")
    module_name, builder = BUILDERS[model_cfg.family]
    module = importlib.import_module(f".{module_name}", __name__)
    adapter = getattr(module, builder)(model_cfg, device, vocabulary)
    configure_attention(adapter, getattr(model_cfg, "attention", "sdpa"))
    return adapter


def build_adapter(
    model_cfg,
    device: torch.device,
    *,
    seed: int,
    trainable: bool,
    vocabulary: list[str] | None = None,
    meta: bool = False,
) -> DiffusionAdapter:
    """The model as every part of vipo builds it, so that the trainer, the latent cache, the
    reference table, export, sampling and the benchmark agree exactly on its weights:

        seed -> the family's build (random weights of model.config, or model.path)
             -> model.init_from's weights -> for a policy (`trainable`): LoRA, activation
                checkpointing, train mode; frozen otherwise (no gradients, eval mode)
             -> model.param_dtype

    Random-weight builds on a GPU initialise on the GPU itself (seconds, not minutes, at 12B).
    `meta` (with model.path): the denoiser is made on the meta device from its config alone, for a
    rank that receives rank 0's weights after sharding (parallel.materialise); model.init_from is
    then rank 0's to read."""
    from pathlib import Path

    torch.manual_seed(seed)
    on_device = model_cfg.path is None and torch.device(device).type == "cuda"
    meta = meta and model_cfg.path is not None
    with torch.device(device) if on_device else _no_context(), denoiser_on_meta(meta):
        adapter = build_model(model_cfg, device, vocabulary=vocabulary)
    network = adapter.network
    if model_cfg.init_from and not meta:
        from ..checkpoint import load_weights

        load_weights(Path(model_cfg.init_from), network)
    if trainable:
        if model_cfg.lora_rank:
            add_lora(network, model_cfg.lora_rank)
        if model_cfg.gradient_checkpointing:
            network.enable_gradient_checkpointing()
        network.train()
    else:  # a frozen model is a reference: it runs as the policy does (base.frozen_mode)
        network.requires_grad_(False).train(frozen_mode(network))
    if getattr(model_cfg, "param_dtype", "float32") == "bfloat16":  # the denoiser and what it is fed
        network.to(torch.bfloat16)
        adapter.dtype = torch.bfloat16
    return adapter


def _no_context():
    from contextlib import nullcontext

    return nullcontext()


# torch.compile's backend for train.compile (tests swap in aot_eager: the same graphs, no codegen).
COMPILE_BACKEND = "inductor"


def compile_network(network, mode: str, device: torch.device) -> None:
    """train.compile: `blocks` compiles each repeated block in place (diffusers'
    compile_repeated_blocks, or the blocks a model declares for sharding), `full` the network."""
    from ..errors import RunError

    if mode == "off":
        return
    backend = {"backend": COMPILE_BACKEND}
    if mode == "full":
        if torch.device(device).type == "cpu" and COMPILE_BACKEND == "inductor":
            # Measured with torch 2.13's CPU build: a full-graph inductor compile of the SD1.5 UNet
            # gave gradients 31% off eager (aot_eager and per-block compiles matched exactly).
            raise RunError(
                "train.compile=full gives wrong gradients with inductor on CPU (torch 2.13, measured); "
                "use train.compile=blocks there"
            )
        network.compile(**backend)
    elif getattr(network, "_repeated_blocks", None):
        network.compile_repeated_blocks(**backend)
    else:  # SD3 declares its blocks for sharding only
        blocks = set(getattr(network, "_no_split_modules", None) or ())
        if not blocks:
            raise RunError(f"train.compile=blocks: {type(network).__name__} declares no blocks; use full")
        for module in network.modules():
            if type(module).__name__ in blocks:
                module.compile(**backend)


def add_lora(network, rank: int) -> None:
    """Freeze `network` and add a peft LoRA of `rank` on its attention projections."""
    from peft import LoraConfig

    network.requires_grad_(False)
    network.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    )


__all__ = [
    "BUILDERS",
    "FAMILIES",
    "LORA_TARGETS",
    "DiffusionAdapter",
    "add_lora",
    "build_adapter",
    "build_model",
    "load_architecture",
]
