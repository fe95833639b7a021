"""A procedural preference data set that needs no files: prompts about a shape, its colour and
its position; the winner follows the prompt, the loser breaks one attribute (the way the paper
builds its alignment pairs). Two regimes of the paper's Section 5.2 can be switched on:

- `noisy`: each pair's label is flipped with probability `flip_prob` (conflicting preferences);
- `shuffled`: the loser is an image made for another prompt (over-simple pairs).

Every pair is a pure function of (seed, index): any worker, rank or resumed run draws the same
pair for the same index.
"""

import numpy as np
from PIL import Image, ImageDraw

from .records import PairRecord

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
POSITIONS = ("left", "right", "top", "bottom")
REGIMES = ("clean", "noisy", "shuffled")


def draw(shape: str, colour: str, position: str, size: int) -> np.ndarray:
    """An RGB image of one coloured shape on a grey background."""
    image = Image.new("RGB", (size, size), (128, 128, 128))
    pen = ImageDraw.Draw(image)
    r = size // 5
    cx, cy = {
        "left": (size // 4, size // 2),
        "right": (3 * size // 4, size // 2),
        "top": (size // 2, size // 4),
        "bottom": (size // 2, 3 * size // 4),
    }[position]
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return np.asarray(image, dtype=np.uint8)


def prompt_of(shape: str, colour: str, position: str) -> str:
    return f"a {colour} {shape} on the {position}"


class ProceduralPairs:
    """`len(pairs)` pairs at `resolution` px; `pairs[i]` -> PairRecord."""

    def __init__(
        self,
        num_pairs: int,
        resolution: int = 32,
        regime: str = "clean",
        flip_prob: float = 0.3,
        seed: int = 0,
    ):
        if regime not in REGIMES:
            raise ValueError(f"unknown regime {regime!r}; known: {', '.join(REGIMES)}")
        if num_pairs < 1:
            raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
        self.num_pairs, self.resolution, self.regime = num_pairs, resolution, regime
        self.flip_prob, self.seed = flip_prob, seed

    def __len__(self) -> int:
        return self.num_pairs

    def _attributes(self, rng: np.random.Generator) -> tuple[str, str, str]:
        return (
            SHAPES[rng.integers(len(SHAPES))],
            list(COLOURS)[rng.integers(len(COLOURS))],
            POSITIONS[rng.integers(len(POSITIONS))],
        )

    def __getitem__(self, index: int) -> PairRecord:
        if not 0 <= index < self.num_pairs:
            raise IndexError(f"pair {index} out of range [0, {self.num_pairs})")
        rng = np.random.default_rng([self.seed, index])
        shape, colour, position = self._attributes(rng)
        winner = draw(shape, colour, position, self.resolution)
        if self.regime == "shuffled":
            other = self._attributes(rng)
            while other == (shape, colour, position):
                other = self._attributes(rng)
            loser = draw(*other, self.resolution)
            category = "shuffled"
        else:
            broken = ["shape", "colour", "position"][rng.integers(3)]
            wrong = list({"shape": SHAPES, "colour": list(COLOURS), "position": POSITIONS}[broken])
            wrong.remove({"shape": shape, "colour": colour, "position": position}[broken])
            attrs = {"shape": shape, "colour": colour, "position": position}
            attrs[broken] = wrong[rng.integers(len(wrong))]
            loser = draw(attrs["shape"], attrs["colour"], attrs["position"], self.resolution)
            category = broken
        if self.regime == "noisy" and rng.random() < self.flip_prob:
            winner, loser = loser, winner
        return PairRecord(
            f"procedural-{self.seed}-{index}", prompt_of(shape, colour, position), winner, loser, category
        )

    def vocabulary(self) -> list[str]:
        """Every word a prompt of this data set can use."""
        return sorted({"a", "on", "the", *SHAPES, *COLOURS, *POSITIONS})
