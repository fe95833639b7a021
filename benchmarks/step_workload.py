"""What both steps of `vipo bench step` see: the device, the batch, the shapes and the step counts
(Workload), and one step's batch in host memory as a loader hands it over (HostBatch)."""

from dataclasses import dataclass

import torch

PROMPT = "a photo of a red cube on a wooden table next to a small green plant, soft light"


@dataclass
class Workload:
    """The model, device, batch, one sample's pixel shape and the step counts; the latent and
    conditioning shapes come from the first build's probe encode."""

    name: str  # the target asked for
    family: str
    config: str  # the architecture config built (configs/models/)
    device: torch.device
    batch_pairs: int
    pixel_shape: tuple[int, ...]  # [3, H, W] or [3, F, H, W]
    steps: int
    warmup: int
    split_steps: int
    latent_shape: tuple[int, ...] | None = None  # filled by the first build
    cond_shapes: dict[str, tuple[int, ...]] | None = None

    @property
    def rows(self) -> int:
        return 2 * self.batch_pairs


def pinned(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor as a loader hands it to a CUDA step: in pinned memory (plain on CPU)."""
    return tensor.pin_memory() if device.type == "cuda" else tensor


class HostBatch:
    """One step's batch in host memory, made once and copied to the device every step.

    `pixels`: [2B, *pixel_shape] in [-1, 1] and B prompts; the step runs the encoders.
    `latents`: latents [2B, *latent_shape] and the text embeddings of B prompts, float16 as a
    latent cache stores them. The shapes come from one probe encode with `adapter` (which fills
    `work.latent_shape` and `work.cond_shapes` the first time)."""

    def __init__(self, work: Workload, adapter, inputs: str, autocast):
        self.device, self.inputs = work.device, inputs
        self.ids = [f"bench-{i}" for i in range(work.batch_pairs)]
        self.prompts = [f"{PROMPT} {i}" for i in range(work.batch_pairs)]
        rows = work.rows if inputs == "pixels" else 1  # a 720p clip pair is 1.8 GB of pixels
        pixels = torch.rand((rows, *work.pixel_shape), generator=torch.Generator().manual_seed(0)) * 2 - 1
        with torch.no_grad(), autocast:
            cond = adapter.encode_prompts(self.prompts)
            probe = adapter.encode_pixels(pixels[:1].to(work.device))
        if work.latent_shape is None:
            work.latent_shape = tuple(probe.shape[1:])
            work.cond_shapes = {key: (1, *value.shape[1:]) for key, value in cond.items()}
        self.pixels = self.latents = self.cond = None
        if inputs == "pixels":
            self.pixels = pinned(pixels, work.device)
            return
        latents = torch.randn((work.rows, *work.latent_shape), generator=torch.Generator().manual_seed(1))
        self.latents = pinned(latents.half(), work.device)
        self.cond = {
            key: pinned(value.detach().to("cpu", torch.float16), work.device) for key, value in cond.items()
        }

    def pixels_on_device(self) -> torch.Tensor:
        return self.pixels.to(self.device, non_blocking=True)

    def latents_on_device(self, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Latents and conditioning on the device in `dtype` (the copy is of the float16 host tensors)."""
        move = {"device": self.device, "non_blocking": True}
        cond = {key: value.to(**move).to(dtype) for key, value in self.cond.items()}
        return self.latents.to(**move).to(dtype), cond
