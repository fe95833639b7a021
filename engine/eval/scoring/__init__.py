"""Reward-model scorers for evaluation and data diagnostics (the paper's evaluation protocol).

    cfg = load_scorers_config("scorers.yaml")
    scorers = build_scorers("pickscore,clip", cfg)
    scores = scorers["pickscore"].score(images, prompts)     # float32 [N]

Each scorer reads its weights from the local paths of the scorers config (config.py) and
nothing else; see clip.py and imagereward.py for what each computes.
"""

import importlib

from ...config import ConfigError
from .base import DTYPES, Scorer, ScorerError, pick_device
from .config import ScorersConfig, load_scorers_config

# name -> (module of this package, class); each module's transformers imports load only when used
SCORERS = {
    "pickscore": ("clip", "PickScore"),
    "hpsv2": ("clip", "HPSv2"),
    "imagereward": ("imagereward", "ImageReward"),
    "aesthetic": ("clip", "AestheticScore"),
    "clip": ("clip", "ClipScore"),
}


def parse_names(names: str | list[str]) -> list[str]:
    items = names.split(",") if isinstance(names, str) else list(names)
    items = [n.strip() for n in items if n.strip()]
    unknown = [n for n in items if n not in SCORERS]
    if unknown or not items:
        raise ConfigError(
            f"unknown scorer {', '.join(unknown) or '(none given)'} (known: {', '.join(SCORERS)})"
        )
    return list(dict.fromkeys(items))


def build_scorer(name: str, cfg: ScorersConfig) -> Scorer:
    module_name, cls_name = SCORERS[parse_names([name])[0]]
    module = importlib.import_module(f".{module_name}", __name__)
    options = {"batch_size": cfg.batch_size, "video_frames": cfg.video_frames}
    return getattr(module, cls_name)(
        getattr(cfg, name), pick_device(cfg.device), DTYPES[cfg.dtype], **options
    )


def build_scorers(names: str | list[str], cfg: ScorersConfig) -> dict[str, Scorer]:
    return {name: build_scorer(name, cfg) for name in parse_names(names)}


__all__ = [
    "SCORERS",
    "Scorer",
    "ScorerError",
    "ScorersConfig",
    "build_scorer",
    "build_scorers",
    "load_scorers_config",
    "parse_names",
]
