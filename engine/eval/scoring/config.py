"""Where each reward model's weights live: a small YAML file, passed with --scorers-config.

    pickscore:   {path: /models/PickScore_v1, processor: /models/CLIP-ViT-H-14-laion2B-s32B-b79K}
    hpsv2:       {path: /models/hpsv2.1-clip}          # made by `vipo scorers convert hpsv2`
    imagereward: {path: /models/imagereward-blip}      # made by `vipo scorers convert imagereward`
    aesthetic:   {clip: /models/clip-vit-large-patch14, head: /models/sac+logos+ava1-l14-linearMSE.pth}
    clip:        {path: /models/clip-vit-large-patch14}
    device: auto
    batch_size: 16

Nothing is downloaded: every scorer reads local files only, and a scorer asked for without its
files is an error naming the scorer and the path it expected. Relative paths are relative to the
config file's folder. Read with `yaml.safe_load`; an unknown key is a ConfigError naming it.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ...schema import ConfigError, load, option, read_yaml


@dataclass
class ClipFolder:
    path: str | None = option(None, "folder of a transformers CLIPModel (config.json + weights)")
    processor: str | None = option(
        None,
        "folder with the CLIP tokenizer and image processor; default: `path` (PickScore: the "
        "processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K)",
    )


@dataclass
class AestheticPaths:
    clip: str | None = option(
        None, "folder of the CLIP ViT-L/14 the predictor was trained on (CLIPModel layout)"
    )
    head: str | None = option(
        None, "the predictor's MLP weights: sac+logos+ava1-l14-linearMSE.pth or .safetensors"
    )


@dataclass
class FolderPath:
    path: str | None = option(None, "folder written by `vipo scorers convert`")


@dataclass
class ScorersConfig:
    pickscore: ClipFolder = field(default_factory=ClipFolder)
    hpsv2: ClipFolder = field(default_factory=ClipFolder)
    clip: ClipFolder = field(default_factory=ClipFolder)
    aesthetic: AestheticPaths = field(default_factory=AestheticPaths)
    imagereward: FolderPath = field(default_factory=FolderPath)
    device: str = option("auto", "cuda, cpu, or auto (cuda when available)")
    dtype: Literal["float32", "float16", "bfloat16"] = option(
        "float32", "weights and activations of the scorers"
    )
    batch_size: int = option(16, "images per scorer forward")
    video_frames: int = option(8, "frames of a video scored (evenly spaced); its score is their mean")


def _resolve(value: str | None, base: Path) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def load_scorers_config(path: str | Path | None) -> ScorersConfig:
    """The scorers config of `path`, or the defaults (no weights anywhere) for None."""
    if path is None:
        return ScorersConfig()
    path = Path(path)
    cfg = load(ScorersConfig, read_yaml(path, what="scorers config"), where=str(path))
    if cfg.batch_size < 1 or cfg.video_frames < 1:
        raise ConfigError(f"{path}: batch_size and video_frames must be >= 1")
    base = path.parent
    for section in (cfg.pickscore, cfg.hpsv2, cfg.clip, cfg.aesthetic, cfg.imagereward):
        for name in vars(section):
            setattr(section, name, _resolve(getattr(section, name), base))
    return cfg
