"""Aspect-ratio buckets and a sampler that draws each batch from one bucket.

    buckets = Buckets.at_area(1024 * 1024)              # SDXL-style: sides multiples of 64, <= 1 Mpx
    buckets = Buckets([(1280, 720), (960, 960)])         # video: 720p 16:9 and 1:1, given explicitly
    ids = buckets.assign(source.image_sizes())            # bucket per pair, -1 = unreadable
    sampler = BucketBatchSampler(ids, batch_size=4, seed=0, rank=rank, world_size=world)

Sizes are (width, height) throughout; arrays are HxW. An image goes to the bucket of the
closest aspect ratio (distance in log(w/h), so 2:1 and 1:2 are equally far from 1:1) and is then
resized to cover the bucket and cropped to it (`PairTransform(buckets=...)`): no padding, no
distortion, and every batch stacks without padding because it holds one bucket.
"""

import logging
import math
import zlib
from collections.abc import Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)


class Buckets:
    """An ordered list of (width, height) target sizes."""

    def __init__(self, sizes: Sequence[Sequence[int]]):
        checked = []
        for size in sizes:
            if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
                raise ValueError(f"a bucket is (width, height) in positive whole pixels, got {size!r}")
            checked.append((int(size[0]), int(size[1])))
        if not checked:
            raise ValueError("Buckets needs at least one (width, height)")
        if len(set(checked)) != len(checked):
            raise ValueError(f"duplicate buckets in {checked}")
        self.sizes: list[tuple[int, int]] = checked
        self._log_aspects = np.array([math.log(w / h) for w, h in checked])

    @classmethod
    def at_area(cls, area: int = 1024 * 1024, step: int = 64, max_aspect: float = 4.0) -> "Buckets":
        """Every (w, h) with sides multiples of `step`, w * h <= `area`, aspect at most
        `max_aspect`, and neither side able to grow by a step: h is the largest height for w and
        w the largest width for h. The rule is symmetric, so each bucket's transpose is one too;
        at 1 Mpx it gives 17 buckets from 512x2048 to 2048x512 (1024x1024, 1152x896, 1344x768, ...)."""
        if step < 1 or area < step * step or max_aspect < 1.0:
            raise ValueError(
                f"need step >= 1, area >= step^2 and max_aspect >= 1; got {step}, {area}, {max_aspect}"
            )

        def longest(side: int) -> int:
            return (area // side) // step * step

        sizes = []
        for width in range(step, area // step + 1, step):
            height = longest(width)
            if (
                height >= step
                and longest(height) == width
                and max(width / height, height / width) <= max_aspect
            ):
                sizes.append((width, height))
        return cls(sorted(sizes, key=lambda s: s[0] / s[1]))

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int) -> tuple[int, int]:
        return self.sizes[index]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.sizes)

    def __repr__(self) -> str:
        return f"Buckets({self.sizes})"

    def bucket_of(self, width: int, height: int) -> int:
        """Index of the bucket closest in aspect ratio (the first one on a tie)."""
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        return int(np.argmin(np.abs(self._log_aspects - math.log(width / height))))

    def assign(self, sizes: Sequence[tuple[int, int] | None]) -> np.ndarray:
        """Bucket index per item; -1 where the size is None (an unreadable image)."""
        return np.array([-1 if s is None else self.bucket_of(*s) for s in sizes], dtype=np.int64)


class BucketBatchSampler:
    """Deterministic, resumable, distributed batches of indices, each from one bucket.

    Epoch e shuffles each bucket's items with (seed, e), cuts them into global batches of
    batch_size x world_size (a bucket's remainder waits for another epoch's shuffle), and shuffles
    the list of global batches; rank r takes the r-th slice of each. All ranks therefore train
    on the same bucket at the same step (same shapes: compiled graphs and memory stay in step).
    Items with bucket -1 are never drawn. The state is (epoch, batches consumed), as in
    PairSampler, and `next_batch()` is a drop-in for PairSampler's.
    """

    def __init__(
        self, bucket_ids: Sequence[int], batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        ids = np.asarray(bucket_ids, dtype=np.int64)
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size; got {batch_size}, {rank}, {world_size}"
            )
        self.num_items, self.batch_size, self.seed = len(ids), batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.members = {int(b): np.flatnonzero(ids == b) for b in np.unique(ids) if b >= 0}
        global_batch = batch_size * world_size
        self.batches_per_epoch = sum(len(m) // global_batch for m in self.members.values())
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"no bucket holds one global batch of {batch_size} x {world_size} ranks "
                f"(items per bucket: { {b: len(m) for b, m in self.members.items()} })"
            )
        starved = {b: len(m) for b, m in self.members.items() if len(m) < global_batch}
        if starved:
            log.warning(
                "buckets %s hold fewer items than one global batch (%d) and are never drawn",
                starved,
                global_batch,
            )
        self.assignment_crc = zlib.crc32(ids.tobytes())
        self.epoch, self.batch_in_epoch = 0, 0
        self.last_bucket = -1
        self._plan: tuple[int, list[tuple[int, np.ndarray]]] | None = None

    def plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """(bucket, global batch of indices) for every batch of `epoch`, in order."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        rng = np.random.default_rng([self.seed, epoch])
        global_batch = self.batch_size * self.world_size
        batches = []
        for bucket in sorted(self.members):
            order = rng.permutation(self.members[bucket])
            for k in range(len(order) // global_batch):
                batches.append((bucket, order[k * global_batch : (k + 1) * global_batch]))
        plan = [batches[i] for i in rng.permutation(len(batches))]
        self._plan = (epoch, plan)
        return plan

    def next_batch(self) -> list[int]:
        """This rank's indices for the next micro-batch; `last_bucket` is their bucket."""
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        bucket, indices = self.plan(self.epoch)[self.batch_in_epoch]
        self.batch_in_epoch += 1
        self.last_bucket = bucket
        return indices[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "seed": self.seed,
            "num_items": self.num_items,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "assignment_crc": self.assignment_crc,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_items", "batch_size", "world_size", "assignment_crc"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"checkpoint bucket sampler {key}={state[key]} does not match this run's {getattr(self, key)}"
                    + (" (the items' buckets changed)" if key == "assignment_crc" else "")
                )
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
