"""What vipo knows of each model family without building one (no torch import): its builder,
its diffusers pipeline and denoiser folder, and whether it is a video family whose VAE takes
1 + k * frame_chunk frames. The adapters (engine/models/) hold everything that needs the model.
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from vipo.configs import ROOT as CONFIGS_ROOT

from .schema import ConfigError, shown


@dataclass(frozen=True)
class Family:
    name: str
    module: str  # of engine/models
    builder: str
    pipeline: str  # diffusers pipeline class
    denoiser: str  # the denoiser's subfolder in a pipeline folder
    full_config: str  # configs/models/ of the released architecture (plans and benchmarks build it)
    frame_chunk: int | None = None  # video: the VAE encodes 1 + k * frame_chunk frames
    video: bool = False

    def frame_problem(self, frames: int) -> str | None:
        """Why `frames` frames cannot go through this family's VAE, or None."""
        if self.frame_chunk is None or (frames - 1) % self.frame_chunk == 0:
            return None
        below = frames - (frames - 1) % self.frame_chunk
        return (
            f"{self.name}'s VAE encodes 1 + {self.frame_chunk}k frames (it would drop the last ones); "
            f"use {below} or {below + self.frame_chunk}"
        )


FAMILIES = {
    "sd15": Family("sd15", "unet", "build_sd15", "StableDiffusionPipeline", "unet", "sd15"),
    "sdxl": Family("sdxl", "unet", "build_sdxl", "StableDiffusionXLPipeline", "unet", "sdxl"),
    "sd3": Family("sd3", "sd3", "build_sd3", "StableDiffusion3Pipeline", "transformer", "sd3.5-medium"),
    "flux": Family("flux", "flux", "build_flux", "FluxPipeline", "transformer", "flux1-dev"),
    "wan": Family(
        "wan", "wan", "build_wan", "WanPipeline", "transformer", "wan2.1-t2v-1.3b", frame_chunk=4, video=True
    ),
}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model.family {name!r} (known: {', '.join(FAMILIES)})") from None


def sized_architecture(model) -> str:
    """The architecture (configs/models/) that `vipo plan`, `--dry-run` and `vipo bench step` build
    for a recipe's `model` section, with random weights and no file of model.path read: model.config
    when the recipe names one (the 14B Wan recipes do), else, when model.path names a weights
    folder, the family's released architecture (Family.full_config)."""
    default = next(f.default for f in dataclasses.fields(model) if f.name == "config")
    if model.path and model.config == default:
        return family(model.family).full_config
    return model.config


# ---------------------------------------------------------------------------------------------
# Architecture configs (configs/models/*.json)


def architecture_path(name_or_path: str) -> Path:
    """configs/models/NAME.json for a name (`sd15-tiny`), the path itself for a .json path."""
    path = Path(name_or_path)
    return path if path.suffix == ".json" else CONFIGS_ROOT / "models" / f"{name_or_path}.json"


def check_architecture(config: str, family_name: str) -> None:
    """model.config exists, is a JSON object, and is an architecture of model.family."""
    path = architecture_path(config)
    known = sorted(p.stem for p in (CONFIGS_ROOT / "models").glob("*.json"))
    if not path.is_file():
        raise ConfigError(f"model.config: no architecture config {config!r} (known: {', '.join(known)})")
    try:
        arch = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"model.config {path}: not UTF-8 text, not an architecture JSON") from None
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"model.config {path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from None
    if not isinstance(arch, dict):
        raise ConfigError(
            f"model.config {path}: an architecture config is a JSON object, got {shown(arch, 60)}"
        )
    family = arch.get("family")
    if not isinstance(family, str):
        raise ConfigError(
            f'model.config {path} names no "family" (got {family!r}): add "family": "{family_name}" '
            f"if it is a {family_name} architecture"
        )
    if family != family_name:
        same = [name for name in known if _family_of(name) == family_name]
        raise ConfigError(
            f"model.config {config!r} is an architecture of family {family!r}, but model.family is "
            f"{family_name!r}: use a config of family {family_name!r} ({', '.join(same) or 'none shipped'}), "
            f"or model.family={family}"
        )


def _family_of(name: str) -> str | None:
    try:
        return json.loads(architecture_path(name).read_text(encoding="utf-8")).get("family")
    except (OSError, ValueError, AttributeError):
        return None
