"""Model families behind one adapter protocol (see base.py)."""

import torch

from .base import DiffusionAdapter, load_architecture

FAMILIES = ("sd15",)


def build_model(model_cfg, device: torch.device, vocabulary: list[str] | None = None) -> DiffusionAdapter:
    """The adapter of `model_cfg.family`, from `model_cfg.path` or random weights of `model_cfg.config`."""
    if model_cfg.family == "sd15":
        from .unet import build_sd15

        return build_sd15(model_cfg, device, vocabulary)
    raise ValueError(f"model.family {model_cfg.family!r} is not built yet (built: {', '.join(FAMILIES)})")


__all__ = ["FAMILIES", "DiffusionAdapter", "build_model", "load_architecture"]
