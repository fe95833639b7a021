"""From `data.*` to batches: the source, its sampler and the pixel tensor of a batch.

    source   = build_source(cfg.data, cfg.model, seed, rank, world_size)
    batches  = BatchStream(source, local_batch_pairs, seed, rank, world_size)
    records  = batches.next_records()          # B PairRecords of one bucket
    pixels   = to_pixels(records, device)      # [2B, 3, H, W] or [2B, 3, F, H, W] in [-1, 1]

Map-style sources (procedural, pickapic, manifest, video) are drawn by index with PairSampler,
or BucketBatchSampler when buckets are set, and a bad sample is replaced by the next good one
(counted); tar shards stream and carry their own position. Either way `state_dict()` is the
whole data position a checkpoint needs for a resume to continue the same order.
"""

import numpy as np
import torch

from vipo.loaders.procedural import ProceduralPairs
from vipo.loaders.records import PairRecord
from vipo.loaders.sampler import PairSampler

from .errors import RunError


def _buckets(data_cfg):
    from vipo.loaders.buckets import Buckets

    if data_cfg.buckets:
        return Buckets(data_cfg.buckets)
    if data_cfg.bucket_area:
        return Buckets.at_area(data_cfg.bucket_area, data_cfg.bucket_step)
    return None


def build_source(data_cfg, model_cfg, seed: int, rank: int = 0, world_size: int = 1):
    """The pair source `data.source` names; data errors become RunErrors naming file and field."""
    if data_cfg.source == "procedural":
        return ProceduralPairs(data_cfg.num_pairs, data_cfg.resolution, data_cfg.regime, data_cfg.flip_prob, seed)
    from vipo.loaders.images import PairTransform, SkipBadSamples, SourceError

    buckets = _buckets(data_cfg)
    try:
        if data_cfg.source == "video":
            from vipo.loaders.video import FrameSampling
            from vipo.loaders.video_manifest import VideoPairManifest

            sampling = FrameSampling(
                data_cfg.num_frames, stride=None if data_cfg.fps else data_cfg.frame_stride,
                fps=data_cfg.fps or None, start=data_cfg.frame_start, require_4k_plus_1=model_cfg.family == "wan",
            )  # fmt: skip
            size = None if buckets else (data_cfg.resolution, data_cfg.resolution)
            return SkipBadSamples(VideoPairManifest(data_cfg.path, sampling, size=size, buckets=buckets,
                                                    backend=data_cfg.video_backend, seed=seed))  # fmt: skip
        transform = PairTransform(None if buckets else data_cfg.resolution, buckets=buckets,
                                  random_crop=data_cfg.random_crop, flip_prob=data_cfg.hflip_prob, seed=seed)  # fmt: skip
        if data_cfg.source == "pickapic":
            from vipo.loaders.pickapic import PickapicPairs

            return SkipBadSamples(PickapicPairs(data_cfg.path, transform, keep_ties=data_cfg.keep_ties))
        if data_cfg.source == "manifest":
            from vipo.loaders.manifest import ManifestPairs

            return SkipBadSamples(ManifestPairs(data_cfg.path, transform, check_files=data_cfg.check_files))
        if data_cfg.source == "shards":
            from vipo.loaders.shards import ShardPairs

            return ShardPairs(data_cfg.path, transform, seed=seed, rank=rank, world_size=world_size)
    except (SourceError, FileNotFoundError, ValueError) as err:
        raise RunError(f"data ({data_cfg.source} {data_cfg.path}): {err}") from None
    raise RunError(f"data.source {data_cfg.source!r} is not known")


class BatchStream:
    """B records a call, in an order that is a pure function of (seed, position)."""

    def __init__(self, source, batch_pairs: int, seed: int, rank: int = 0, world_size: int = 1):
        self.source, self.batch_pairs = source, batch_pairs
        self.streaming = not hasattr(source, "__getitem__")
        self._iterator = None
        if self.streaming:
            self.sampler = None
            return
        buckets = getattr(getattr(source, "transform", None), "buckets", None) or getattr(source, "buckets", None)
        if buckets is not None:
            from vipo.loaders.buckets import BucketBatchSampler

            self.sampler = BucketBatchSampler(buckets.assign(source.image_sizes()), batch_pairs, seed, rank,
                                              world_size)  # fmt: skip
        else:
            self.sampler = PairSampler(len(source), batch_pairs, seed, rank, world_size)

    def next_records(self) -> list[PairRecord]:
        if self.streaming:
            if self._iterator is None:
                self._iterator = iter(self.source)
            try:
                return [next(self._iterator) for _ in range(self.batch_pairs)]
            except StopIteration:
                raise RunError("the shard stream ended (data.path holds fewer pairs than the run needs)") from None
        indices = self.sampler.next_batch()
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(self.sampler.epoch)
        return [self.source[i] for i in indices]

    def stats(self) -> dict[str, int]:
        return self.source.stats() if hasattr(self.source, "stats") else {}

    def state_dict(self) -> dict:
        return {"stream": self.source.state_dict()} if self.streaming else self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.streaming:
            self.source.load_state_dict(state["stream"])
            self._iterator = None
        else:
            self.sampler.load_state_dict(state)


def to_pixels(records: list[PairRecord], device: torch.device) -> torch.Tensor:
    """[2B, 3, H, W] (images) or [2B, 3, F, H, W] (clips) in [-1, 1]: winners, then losers."""
    shapes = {r.winner.shape for r in records} | {r.loser.shape for r in records}
    if len(shapes) != 1:
        raise RunError(f"a batch mixes shapes {sorted(shapes)}: set data.buckets so a batch holds one size")
    frames = np.stack([r.winner for r in records] + [r.loser for r in records])
    pixels = torch.from_numpy(frames).to(device)
    pixels = pixels.permute(0, 4, 1, 2, 3) if pixels.dim() == 5 else pixels.permute(0, 3, 1, 2)
    return pixels.float().div(127.5).sub(1.0)
