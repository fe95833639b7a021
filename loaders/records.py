"""The one record every pair source yields, and the protocol of a source.

    PairRecord(id, prompt, winner, loser, category, weight, weight_map)

`winner` and `loser` are uint8 arrays, HxWx3 for images and FxHxWx3 for video clips, the two of
a pair always the same shape (same crop and resize decisions). `id` is a stable string: the same
pair has the same id in every run, on every rank and after a resume (the latent cache and the
precomputed reference key on it). `weight` scales the pair's term of a preference loss (the
kernel's pair_weight: z = -0.5 beta k d); 1 for every pair unless a source says otherwise.
`weight_map` (None: none) weighs the pair's elements (loaders/weight_maps.py): float32 [H, W]
on the output images' pixels, or [F] for the output clip's frames, shared by winner and loser.

A map-style source has `__len__`, `__getitem__(i) -> PairRecord` and `vocabulary()` (words
for tokenizer-free tiny models; None when a real tokenizer is used).
"""

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class PairRecord:
    id: str
    prompt: str
    winner: np.ndarray
    loser: np.ndarray
    category: str = ""
    weight: float = 1.0
    weight_map: np.ndarray | None = None


class PairSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> PairRecord: ...

    def vocabulary(self) -> list[str] | None: ...
