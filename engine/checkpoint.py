"""Checkpoints: written under a temporary name and renamed, so a crash mid-write leaves the
previous checkpoint whole; `latest` names the newest complete one.

    <output_dir>/checkpoints/step-000100/
        model.safetensors      trainable weights (the LoRA weights alone for a LoRA policy)
        optimizer.pt           optimizer and LR-schedule state (loaded with weights_only=True)
        rng.safetensors        the noise generator's state
        state.json             step, data position, non-finite counters
        config.yaml            the resolved run config
    <output_dir>/checkpoints/latest
"""

import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from .config import to_dict
from .errors import RunError


def _trainable_state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {name for name, p in network.named_parameters() if p.requires_grad}
    return {k: v.detach().contiguous().cpu() for k, v in network.state_dict().items() if k in names}


def save_checkpoint(
    out_dir: Path, step: int, network, optimizer, scheduler, generator, state: dict, cfg
) -> Path:
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_trainable_state(network), tmp / "model.safetensors")
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt"
    )
    save_file({"noise_generator": generator.get_state()}, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2), encoding="utf-8")
    (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    for path in tmp.iterdir():  # contents on disk before the rename makes them visible
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / f".latest.tmp-{os.getpid()}"
    latest_tmp.write_text(final.name, encoding="utf-8")
    os.replace(latest_tmp, root / "latest")
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = Path(out_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text(encoding="utf-8").strip()
    return path if path.is_dir() else None


def load_weights(path: Path, network) -> None:
    """Start `network` from a checkpoint's weights (every tensor it has must match)."""
    file = Path(path) / "model.safetensors"
    if not file.is_file():
        raise RunError(f"model.init_from: no model.safetensors in {path}")
    weights = load_file(file)
    own = network.state_dict()
    unknown = [k for k in weights if k not in own]
    if unknown:
        raise RunError(f"{file}: {len(unknown)} tensors this model does not have, e.g. {unknown[0]}")
    network.load_state_dict(weights, strict=False)


def load_checkpoint(path: Path, network, optimizer, scheduler, generator) -> dict:
    """Restore weights, optimizer, schedule and noise generator; returns state.json."""
    path = Path(path)
    weights = load_file(path / "model.safetensors")
    missing = set(_trainable_state(network)) - set(weights)
    if missing:
        raise ValueError(
            f"{path}: checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}"
        )
    network.load_state_dict(weights, strict=False)
    opt_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(opt_state["optimizer"])
    scheduler.load_state_dict(opt_state["scheduler"])
    generator.set_state(load_file(path / "rng.safetensors")["noise_generator"])
    return json.loads((path / "state.json").read_text(encoding="utf-8"))
