"""`vipo export`: a trained run as a diffusers folder.

    vipo export RUN [--step N] --out DIR            denoiser with LoRA merged (or fully trained)
    vipo export RUN --lora-only --out DIR           the LoRA alone, in diffusers' LoRA format

The model is rebuilt as the run built it (its saved config: same model.path or architecture
config, same seed for random weights, same model.init_from), the checkpoint's trained tensors are
loaded, and a LoRA is merged into the base weights. When the run trained a model loaded from a
diffusers folder (`model.path`), every other component (text encoders, tokenizers, VAE,
scheduler, model_index.json) is copied beside the new denoiser, so the folder loads with the
family's pipeline as the original did.
"""

import argparse
import shutil
from pathlib import Path

import torch

from .checkpoint import load_weights, trusted_checkpoint
from .config import load_config
from .errors import RunError
from .models import build_adapter

DENOISERS = ("unet", "transformer")
LORA_FILE = "pytorch_lora_weights.safetensors"


def find_checkpoint(run: Path, step: int | None = None) -> Path:
    """A run folder's checkpoint at `step` (its newest good one when None), or a checkpoint
    folder itself, after the integrity check."""
    run = Path(run)
    if step is not None:
        path = run / "checkpoints" / f"step-{step:06d}"
        if not path.is_dir():
            known = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
            raise RunError(f"{run}: no checkpoint at step {step} (found: {', '.join(known) or 'none'})")
        return trusted_checkpoint(path, "export")
    if not (run / "state.json").is_file() and not (run / "checkpoints").is_dir():
        raise RunError(
            f"{run}: not a vipo run folder (no checkpoints/) nor a checkpoint folder (no state.json)"
        )
    return trusted_checkpoint(run, "export")


def load_trained(checkpoint: Path, device: torch.device | None = None):
    """(adapter, config) of a checkpoint: the run's model with its trained weights loaded."""
    config_file = Path(checkpoint) / "config.yaml"
    if not config_file.is_file():
        raise RunError(f"{checkpoint}: no config.yaml (not a vipo checkpoint)")
    cfg = load_config(config_file)
    # As the run built it (random-weight builds: the run's initial weights), then its trained tensors.
    adapter = build_adapter(cfg.model, device or torch.device("cpu"), seed=cfg.train.seed, trainable=True)
    load_weights(checkpoint, adapter.network, what="export")
    return adapter, cfg


def export_run(
    run: Path, out: Path, *, step: int | None = None, lora_only: bool = False, ema: bool = False
) -> Path:
    checkpoint = find_checkpoint(run, step)
    adapter, cfg = load_trained(checkpoint)
    if ema:  # the averaged weights (train.ema_decay) in place of the trained ones
        from .ema import load_ema_weights

        load_ema_weights(checkpoint, adapter.network)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RunError(f"{out} exists and is not empty: export writes a fresh folder")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    network = adapter.network
    if lora_only:
        if not cfg.model.lora_rank:
            raise RunError(f"{checkpoint}: the run trained all weights (model.lora_rank 0); there is no LoRA")
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        # The file a pipeline's load_lora_weights reads: keys under the denoiser's name.
        state = get_peft_model_state_dict(network, adapter_name="default")
        weights = {f"{adapter.denoiser}.{key}": value.contiguous() for key, value in state.items()}
        save_file(weights, tmp / LORA_FILE, metadata={"format": "pt"})
    else:
        if cfg.model.lora_rank:
            network.fuse_lora()
            network.unload_lora()
        adapter.export(tmp)
        if cfg.model.path:
            _copy_components(Path(cfg.model.path), tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def _copy_components(source: Path, out: Path) -> None:
    """Everything of the original folder but its denoiser, which was just written."""
    for item in source.iterdir():
        if item.name in DENOISERS or (out / item.name).exists():
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name)
        else:
            shutil.copy2(item, out / item.name)


def cmd_export(args: argparse.Namespace) -> int:
    out = export_run(Path(args.run), Path(args.out), step=args.step, lora_only=args.lora_only, ema=args.ema)
    print(f"exported {args.run} to {out}")
    return 0
