"""The one record every pair source yields, and the protocol of a source.

    PairRecord(id, prompt, winner, loser, category, weight, weight_map)

`winner` and `loser` are uint8 arrays, HxWx3 for images and FxHxWx3 for video clips, the two of
a pair always the same shape (same crop and resize decisions). Two other forms travel between a
source and the step when a batch decoder is on (`data.image_backend`, loaders/dali.py): an
image source yields EncodedImages (bytes and the pair's decisions), and the batch decoder turns
them into uint8 torch tensors of those shapes, on the GPU when DALI decoded them there. `id` is a stable string: the same
pair has the same id in every run, on every rank and after a resume (the latent cache and the
precomputed reference key on it). `weight` scales the pair's term of a preference loss (the
kernel's pair_weight: z = -0.5 beta k d); 1 for every pair unless a source says otherwise.
`weight_map` (None: none) weighs the pair's elements (loaders/weight_maps.py): float32 [H, W]
on the output images' pixels, or [F] for the output clip's frames, shared by winner and loser.

A map-style source has `__len__`, `__getitem__(i) -> PairRecord` and `vocabulary()` (words
for tokenizer-free tiny models; None when a real tokenizer is used).
"""

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class PairRecord:
    id: str
    prompt: str
    winner: Any  # np.ndarray; EncodedImage or torch.Tensor under a batch decoder (above)
    loser: Any
    category: str = ""
    weight: float = 1.0
    weight_map: np.ndarray | None = None


class PairSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> PairRecord: ...

    def vocabulary(self) -> list[str] | None: ...


def stack_pixels(frames: list, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 HxWx3 images (or FxHxWx3 clips), numpy arrays or torch tensors, as one float
    [N, 3, H, W] (or [N, 3, F, H, W]) tensor in [-1, 1] on `device`; the arithmetic runs there."""
    if all(isinstance(f, np.ndarray) for f in frames):
        stacked = torch.from_numpy(np.stack(frames)).to(device)
    else:
        stacked = torch.stack([torch.as_tensor(f).to(device) for f in frames])
    if stacked.dim() not in (4, 5):
        raise ValueError(
            f"pixels of shape {tuple(stacked.shape[1:])}: expected HxWx3 images or FxHxWx3 clips"
        )
    stacked = stacked.permute(0, 4, 1, 2, 3) if stacked.dim() == 5 else stacked.permute(0, 3, 1, 2)
    return stacked.float().div(127.5).sub(1.0)
