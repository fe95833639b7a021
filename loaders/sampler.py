"""Deterministic, resumable, distributed order of pair indices.

Epoch e visits a permutation of all indices drawn from (seed, e); rank r of w takes every w-th
micro-batch. The position (epoch, batches consumed) is the whole state: a resumed run continues
the same order.
"""

import numpy as np


class BatchLargerThanData(ValueError):
    """The data set cannot fill one global batch: a setting to change (train.batch_pairs, global
    over all ranks), not damaged data."""

    def __init__(self, num_items: int, batch_size: int, world_size: int = 1):
        self.num_items, self.batch_size, self.world_size = num_items, batch_size, world_size
        ranks = f" ({batch_size} per rank x {world_size} ranks)" if world_size > 1 else ""
        most = num_items // world_size * world_size
        fit = f"at most {most} fit" + (f", a multiple of {world_size} ranks" if world_size > 1 else "")
        super().__init__(
            f"train.batch_pairs={batch_size * world_size}{ranks} is more than the {num_items} pairs of the "
            f"data set ({fit if most else f'{world_size} ranks need {world_size} pairs or more'})"
        )


class PairSampler:
    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size * world_size > num_items:
            raise BatchLargerThanData(num_items, batch_size, world_size)
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.batch_in_epoch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        """Global batches per epoch (the incomplete last one is dropped)."""
        return self.num_items // (self.batch_size * self.world_size)

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def next_batch(self) -> list[int]:
        """This rank's indices for the next micro-batch."""
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        order = self._order(self.epoch)
        start = (self.batch_in_epoch * self.world_size + self.rank) * self.batch_size
        self.batch_in_epoch += 1
        return order[start : start + self.batch_size].tolist()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "seed": self.seed,
            "num_items": self.num_items,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_items", "batch_size", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"checkpoint sampler {key}={state[key]} does not match this run's {getattr(self, key)}"
                )
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
