"""Validation during training (`train.validate_every_steps`): every N steps, a sample grid of a
fixed prompt list with fixed seeds, and the held-out implicit accuracy (evaluate.py).

    grid      train.validate_prompts (a prompt file; default: the first prompts of the held-out
              pairs), one image a prompt (SAMPLING_STEPS steps), seed = train.seed + its index: the same noise at every
              validation, so the grids of a run differ by the weights alone. Written to
              <output_dir>/validation/step-NNNNNN.png and to TensorBoard / wandb.
    accuracy  the share of held-out pairs whose winner the policy's implicit reward ranks above
              the loser, at fixed (noise, t) draws: `val_accuracy`, with `val_winner_change` and
              `val_loser_change` (mean e_pol - e_ref), in the step's metrics row.

Held-out pairs: data.validation_path (read as data.source reads data.path), or for procedural
data clean pairs of another seed. Rank 0 validates, on the unwrapped policy (strategies none and
ddp); nothing here draws from the training generators, so a run validates without changing
its training curve. A run on model.path samples through its family's diffusers pipeline built
around the live modules (nothing is cast or moved); a run from the latent cache has no encoders
and logs the accuracy alone. The trainer loads this module by name (the engine imports nothing
of eval).
"""

import dataclasses
import logging
from pathlib import Path

import numpy as np
from torch.utils.data import Subset

from ..errors import RunError
from .evaluate import held_out_accuracy
from .report import image_grid
from .sample import pipeline_sampler, read_prompts, run_pipeline, tiny_sampler

log = logging.getLogger(__name__)

GRID_PROMPTS = 4  # prompts of the default grid, taken from the held-out pairs
SAMPLING_STEPS = 20


@dataclasses.dataclass
class _Job:  # what eval.sample's samplers read of a job
    prompt: str
    seed: int


class Validator:
    def __init__(self, trainer):
        cfg = trainer.cfg
        self.trainer = trainer
        self.out = Path(cfg.train.output_dir) / "validation"
        self.pairs = self._held_out(cfg)
        if cfg.train.validate_prompts:
            self.prompts = read_prompts(cfg.train.validate_prompts)
        elif self.pairs is not None:
            count = min(GRID_PROMPTS, len(self.pairs))
            self.prompts = [self.pairs[i].prompt for i in range(count)]
        else:
            raise RunError(
                "train.validate_every_steps: set train.validate_prompts (a prompt file) or "
                "data.validation_path (held-out pairs whose prompts the grid then uses)"
            )
        if cfg.model.path is None:  # random weights: the tiny models' own samplers
            self.sampler = tiny_sampler(cfg, trainer.adapter, SAMPLING_STEPS)
        elif cfg.data.cache:
            log.warning(
                "train.validate_every_steps: a run from the latent cache has freed its text encoders and "
                "VAE, so it logs the held-out accuracy without a sample grid"
            )
            self.sampler = None
        else:  # the family's pipeline around the live policy, encoders and VAE (nothing cast)
            self.sampler = _LivePipeline(cfg, trainer.adapter)

    @staticmethod
    def _held_out(cfg):
        if cfg.data.validation_path:
            from ..data import build_source

            data = dataclasses.replace(cfg.data, path=cfg.data.validation_path, buckets=[], bucket_area=0)
            return build_source(data, cfg.model, cfg.train.seed)
        if cfg.data.source == "procedural":
            from vipo.loaders.procedural import ProceduralPairs

            return ProceduralPairs(
                cfg.train.validate_pairs, cfg.data.resolution, "clean", seed=cfg.train.seed + 1
            )
        return None

    def __call__(self, step: int, sinks) -> dict[str, float]:
        trainer = self.trainer
        adapter = trainer.adapter
        row: dict[str, float] = {}
        if self.sampler is not None:
            seed = trainer.cfg.train.seed
            jobs = [_Job(p, seed + i) for i, p in enumerate(self.prompts)]
            was_training = adapter.network.training
            adapter.network.eval()
            try:
                images = self.sampler(jobs)
            finally:
                adapter.network.train(was_training)
            frames = images[:, 0] if images.ndim == 5 else images  # a video's first frame
            path = image_grid([frames], [f"step {step}"], self.out / f"step-{step:06d}.png")
            sinks.image("validation/samples", np.asarray(_read(path)), step)
        if self.pairs is not None and trainer.reference is not None:
            count = min(trainer.cfg.train.validate_pairs, len(self.pairs))
            held = Subset(self.pairs, range(count))
            result = held_out_accuracy(adapter, trainer.reference, held, draws=2, seed=trainer.cfg.train.seed)
            row.update(
                val_accuracy=result["accuracy"],
                val_winner_change=result["winner_change"],
                val_loser_change=result["loser_change"],
            )
        return row


class _LivePipeline:
    """eval.sample's pipeline sampler on the running model, built at the first validation: the
    data's resolution, one frame for video families (the grid shows first frames)."""

    def __init__(self, cfg, adapter):
        self.cfg, self.adapter, self.run = cfg, adapter, None

    def __call__(self, jobs):
        if self.run is None:
            from ..families import FAMILIES

            pipe = run_pipeline(self.cfg, self.adapter, None, None)
            pipe.set_progress_bar_config(disable=True)
            side = self.cfg.data.resolution
            options = {"height": side, "width": side}
            if FAMILIES[self.cfg.model.family].video:
                options["num_frames"] = 1
            self.run = pipeline_sampler(pipe, self.cfg.model.family, SAMPLING_STEPS, options)
        return self.run(jobs)


def _read(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def build_validator(trainer):
    """What Trainer calls every train.validate_every_steps steps (see the module docstring)."""
    return Validator(trainer)


__all__ = ["Validator", "build_validator"]
