"""Model families behind one adapter protocol (see base.py)."""

import importlib

import torch

from .base import DiffusionAdapter, configure_attention, load_architecture

# family -> (module of this package, builder function)
BUILDERS = {
    "sd15": ("unet", "build_sd15"),
    "sdxl": ("unet", "build_sdxl"),
    "sd3": ("sd3", "build_sd3"),
    "flux": ("flux", "build_flux"),
    "wan": ("wan", "build_wan"),
}
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


def add_lora(network, rank: int) -> None:
    """Freeze `network` and add a peft LoRA of `rank` on its attention projections."""
    from peft import LoraConfig

    network.requires_grad_(False)
    network.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                   target_modules=LORA_TARGETS))  # fmt: skip


__all__ = ["BUILDERS", "FAMILIES", "LORA_TARGETS", "DiffusionAdapter", "add_lora", "build_model", "load_architecture"]
