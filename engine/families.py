"""What vipo knows of each model family without building one (no torch import): its builder,
its diffusers pipeline and denoiser folder, and whether it is a video family whose VAE takes
1 + k * frame_chunk frames. The adapters (engine/models/) hold everything that needs the model.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    module: str  # of engine/models
    builder: str
    pipeline: str  # diffusers pipeline class
    denoiser: str  # the denoiser's subfolder in a pipeline folder
    frame_chunk: int | None = None  # video: the VAE encodes 1 + k * frame_chunk frames
    video: bool = False

    def frame_problem(self, frames: int) -> str | None:
        """Why `frames` frames cannot go through this family's VAE, or None."""
        if self.frame_chunk is None or (frames - 1) % self.frame_chunk == 0:
            return None
        below = frames - (frames - 1) % self.frame_chunk
        return (f"{self.name}'s VAE encodes 1 + {self.frame_chunk}k frames (it would drop the last ones); "
                f"use {below} or {below + self.frame_chunk}")  # fmt: skip


FAMILIES = {
    "sd15": Family("sd15", "unet", "build_sd15", "StableDiffusionPipeline", "unet"),
    "sdxl": Family("sdxl", "unet", "build_sdxl", "StableDiffusionXLPipeline", "unet"),
    "sd3": Family("sd3", "sd3", "build_sd3", "StableDiffusion3Pipeline", "transformer"),
    "flux": Family("flux", "flux", "build_flux", "FluxPipeline", "transformer"),
    "wan": Family("wan", "wan", "build_wan", "WanPipeline", "transformer", frame_chunk=4, video=True),
}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model.family {name!r} (known: {', '.join(FAMILIES)})") from None
