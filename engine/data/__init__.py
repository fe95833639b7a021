"""From `data.*` to batches: the source, its sampler and the pixel tensor of a batch.

    source   = build_source(cfg.data, cfg.model, seed, rank, world_size)
    batches  = BatchStream(source, local_batch_pairs, seed, rank, world_size,
                           max_bad_fraction=0.01, prefetch_batches=2)
    records  = batches.next_records()          # B PairRecords of one bucket
    pixels   = to_pixels(records, device)      # [2B, 3, H, W] or [2B, 3, F, H, W] in [-1, 1]

Map-style sources (procedural, pickapic, manifest, video) are drawn by index with PairSampler,
or BucketBatchSampler when buckets are set, and a bad sample is replaced by the next good one
(counted); tar shards stream and carry their own position. Either way `state_dict()` is the
whole data position a checkpoint needs for a resume to continue the same order, also while
batches are prefetched in the background (a thread, or `data.num_workers` DataLoader workers).
"""

import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from vipo.loaders.images import SourceError
from vipo.loaders.procedural import ProceduralPairs
from vipo.loaders.records import PairRecord, stack_pixels
from vipo.loaders.sampler import PairSampler

from ..errors import RunError
from ..families import family

log = logging.getLogger(__name__)


DECODER_NAMES = {
    "pil": "with PIL in the loader",
    "mixed": "with DALI nvJPEG on the GPU, a micro-batch a run",
    "cpu": "with DALI's CPU decoder, a micro-batch a run",
}


def _buckets(data_cfg):
    from vipo.loaders.buckets import Buckets

    if data_cfg.buckets:
        return Buckets(data_cfg.buckets)
    if data_cfg.bucket_area:
        return Buckets.at_area(data_cfg.bucket_area, data_cfg.bucket_step)
    return None


def image_decoder(data_cfg) -> str:
    """Who decodes image pairs for training: "pil" (the source, in the loader) or the DALI device
    ("mixed": nvJPEG; "cpu") that decodes whole micro-batches (`data.image_backend`)."""
    from vipo.loaders.dali import image_device

    try:
        return image_device(data_cfg.image_backend)
    except RuntimeError as err:  # dali asked for and not installed
        raise RunError(f"data.image_backend={data_cfg.image_backend}: {err}") from None


def clip_batches(video_backend: str) -> bool:
    """Whether clips are decoded a micro-batch a DALI run (NVDEC on a GPU; DALI's CPU decoder
    when `dali` is asked for without one) rather than pair by pair in the loader: `auto` batches
    where NVDEC is, as it picks DALI over PyAV only there (loaders/dali.py)."""
    from vipo.loaders import dali

    if video_backend == "pyav" or not dali.dali_available():
        return False
    return video_backend == "dali" or dali.video_device("auto") == "mixed"


def build_source(
    data_cfg, model_cfg, seed: int, rank: int = 0, world_size: int = 1, *, batch_decode: bool = False
):
    """The pair source `data.source` names; data errors become RunErrors naming file and field.
    `batch_decode` (training, `vipo cache`): image sources leave decoding to the batch decoder
    `data.image_backend` chooses (loaders/dali.py); otherwise they decode with PIL."""
    if data_cfg.source == "procedural":
        return ProceduralPairs(
            data_cfg.num_pairs, data_cfg.resolution, data_cfg.regime, data_cfg.flip_prob, seed
        )
    from vipo.loaders.images import PairTransform, SkipBadSamples

    buckets = _buckets(data_cfg)
    try:
        if data_cfg.source == "video":
            from vipo.loaders.video import FrameSampling
            from vipo.loaders.video_manifest import VideoPairManifest

            sampling = FrameSampling(
                data_cfg.num_frames,
                stride=None if data_cfg.fps else data_cfg.frame_stride,
                fps=data_cfg.fps or None,
                start=data_cfg.frame_start,
                frame_chunk=family(model_cfg.family).frame_chunk,
            )
            size = None if buckets else (data_cfg.resolution, data_cfg.resolution)
            batch = batch_decode and clip_batches(data_cfg.video_backend)
            if batch_decode:
                log.info(
                    "video pairs decode %s (data.video_backend=%s)",
                    "with DALI, a micro-batch a run" if batch else "pair by pair in the loader",
                    data_cfg.video_backend,
                )
            return SkipBadSamples(
                VideoPairManifest(
                    data_cfg.path,
                    sampling,
                    size=size,
                    buckets=buckets,
                    backend=data_cfg.video_backend,
                    seed=seed,
                    allow_outside_root=data_cfg.allow_outside_root,
                    batch=batch,
                )
            )
        decoder = image_decoder(data_cfg) if batch_decode else "pil"
        if batch_decode and data_cfg.source in ("pickapic", "manifest", "shards"):
            log.info(
                "image pairs decode %s (data.image_backend=%s)",
                DECODER_NAMES[decoder],
                data_cfg.image_backend,
            )
        transform = PairTransform(
            None if buckets else data_cfg.resolution,
            buckets=buckets,
            random_crop=data_cfg.random_crop,
            flip_prob=data_cfg.hflip_prob,
            seed=seed,
            decoder=decoder,
        )
        if data_cfg.source == "pickapic":
            from vipo.loaders.pickapic import PickapicPairs

            return SkipBadSamples(PickapicPairs(data_cfg.path, transform, keep_ties=data_cfg.keep_ties))
        if data_cfg.source == "manifest":
            from vipo.loaders.manifest import ManifestPairs

            return SkipBadSamples(
                ManifestPairs(
                    data_cfg.path,
                    transform,
                    check_files=data_cfg.check_files,
                    allow_outside_root=data_cfg.allow_outside_root,
                )
            )
        if data_cfg.source == "shards":
            from vipo.loaders.shards import ShardPairs

            return ShardPairs(data_cfg.path, transform, seed=seed, rank=rank, world_size=world_size)
    except (SourceError, OSError, ValueError) as err:
        raise RunError(f"data ({data_cfg.source} {data_cfg.path}): {err}") from None
    raise RunError(f"data.source {data_cfg.source!r} is not known")


BAD_KINDS = (
    "skipped_corrupt",
    "skipped_missing",
    "skipped_not_a_file",
    "skipped_short",
    "skipped_incomplete",
    "skipped_corrupt_shards",
)
MIN_ATTEMPTS_FOR_BAD_FRACTION = 50


def bad_count(stats: dict[str, int]) -> int:
    """Skips that mean an unusable file. Ties, unlabeled and identical pairs are data policy, not damage."""
    return sum(int(stats.get(kind, 0)) for kind in BAD_KINDS)


def _use_cuda_device(device: int | None) -> None:
    if device is not None:
        torch.cuda.set_device(device)


class _BatchRecords(torch.utils.data.Dataset):
    """What a DataLoader worker reads: one whole batch a task, given as (epoch, indices), returned
    with the worker's counters after it (each worker holds its own copy of the source)."""

    def __init__(self, source):
        self.source = source

    def __getitem__(self, spec: tuple[int, list[int]]):
        epoch, indices = spec
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)
        records = [self.source[i] for i in indices]
        info = torch.utils.data.get_worker_info()
        stats = dict(self.source.stats()) if hasattr(self.source, "stats") else {}
        return records, spec, (info.id if info is not None else 0), stats


class _BatchSpecs(torch.utils.data.Sampler):
    """The stream's sampler as the DataLoader's: iterated in the training process, it records
    the position after each batch it hands to the workers, in order."""

    def __init__(self, stream: "BatchStream"):
        self.stream = stream

    def __iter__(self):
        sampler = self.stream.sampler
        while True:
            indices = sampler.next_batch()
            self.stream._ahead.append(sampler.state_dict())
            yield sampler.epoch, [int(i) for i in indices]


def _as_is(batch):
    return batch


def worker_start(cuda_initialized: bool) -> str | None:
    """How DataLoader workers start: forked (torch's default on Linux), or spawned once this
    process holds a CUDA context, which forked children cannot use (DALI's NVDEC in a worker)."""
    return "spawn" if cuda_initialized else None


class BatchStream:
    """B records a call, in an order that is a pure function of (seed, position).

    `prefetch_batches` > 0 prepares that many batches ahead in one background thread while the
    step runs (PIL, PyAV and DALI release the GIL while they decode). One thread, not several:
    sources keep caches, skip counters and the epoch of their random draws as plain attributes,
    and a single producer keeps them consistent and the order exact. Each prepared batch carries
    the position after it, so `state_dict()` is the position after the last batch handed out,
    never after a prefetched one, and a resume continues the same order.

    `num_workers` > 0 (map-style sources): torch DataLoader worker processes decode whole batches
    instead, `prefetch_batches` per worker (at least 1) ahead. Every per-pair decision is keyed by
    (seed, epoch, pair id), so the batches are those of 0 workers; the position handed to
    `state_dict()` is the one after the last batch the caller received (the sampler runs in this
    process and records it per batch). Skip counters are each worker's own and are summed (a bad
    file two workers meet counts twice). Streaming sources (tar shards) keep the thread.

    `max_bad_fraction`: once at least MIN_ATTEMPTS_FOR_BAD_FRACTION pairs were tried, a share of
    bad files (BAD_KINDS) above it stops the run with a RunError naming the counts: one corrupt
    file in a million is a counted skip, a tenth of the data set unreadable is a broken mount.
    A data set in which every pair tried is bad stops however small it is, naming the first bad file.
    """

    def __init__(
        self,
        source,
        batch_pairs: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        max_bad_fraction: float = 0.01,
        prefetch_batches: int = 0,
        num_workers: int = 0,
    ):
        if num_workers < 0:
            raise RunError(f"data.num_workers must be >= 0, got {num_workers}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise RunError(f"data.max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if prefetch_batches < 0:
            raise RunError(f"data.prefetch_batches must be >= 0, got {prefetch_batches}")
        self.source, self.batch_pairs = source, batch_pairs
        self.max_bad_fraction, self.prefetch_batches = max_bad_fraction, prefetch_batches
        self.streaming = not hasattr(source, "__getitem__")
        from vipo.loaders.dali import batch_decoder

        self.decoder = batch_decoder(source)  # a DALI device when the source leaves decoding to the stream
        self.num_workers = 0 if self.streaming else num_workers
        self._loader = None  # the DataLoader's iterator while workers run
        self._ahead: deque[dict] = deque()  # positions after the batches given to the workers
        self._worker_stats: dict[int, dict[str, int]] = {}
        self._start_stats: dict[str, int] = {}
        self._iterator = None
        self._pending: deque[Future] = deque()
        self._executor: ThreadPoolExecutor | None = None
        buckets = None
        if not self.streaming:
            transform = getattr(source, "transform", None)
            buckets = getattr(transform, "buckets", None) or getattr(source, "buckets", None)
        sizes = source.image_sizes() if buckets is not None else None  # a header scan: counts bad files
        self._stats = self._source_stats()
        # Bad files found before the first batch (a header scan for buckets, check_files) were
        # found among all pairs: judge them against the whole set, and later ones against pairs served.
        self._bad_at_start = bad_count(self._stats)
        self._served = 0
        if self._bad_at_start:
            scanned = self._bad_at_start if self.streaming else max(len(source), self._bad_at_start)
            self._check_bad(self._bad_at_start, scanned)
        try:
            if self.streaming:
                self.sampler = None
            elif buckets is not None:
                from vipo.loaders.buckets import BucketBatchSampler

                self.sampler = BucketBatchSampler(buckets.assign(sizes), batch_pairs, seed, rank, world_size)
            else:
                self.sampler = PairSampler(len(source), batch_pairs, seed, rank, world_size)
        except ValueError as err:
            raise RunError(f"data: {err}; lower train.batch_pairs or add pairs") from None
        self._position = self._current_position()

    # -- producing batches (the caller's thread, or the one prefetch thread) ----------------------

    def _current_position(self) -> dict:
        return {"stream": self.source.state_dict()} if self.streaming else self.sampler.state_dict()

    def _source_stats(self) -> dict[str, int]:
        return dict(self.source.stats()) if hasattr(self.source, "stats") else {}

    def _stream_records(self, count: int) -> list[PairRecord]:
        if self._iterator is None:
            self._iterator = iter(self.source)
        try:
            return [next(self._iterator) for _ in range(count)]
        except StopIteration:
            raise RunError(
                "the shard stream ended (data.path holds fewer pairs than the run needs)"
            ) from None
        except SourceError as err:  # the stream found no usable pair in a whole pass
            raise RunError(f"data: {err}") from None

    def _produce(self) -> tuple[list[PairRecord], tuple | None, dict, dict[str, int]]:
        """The next batch, its (epoch, indices) (None for a stream), the position after it and
        the source's counters after it."""
        spec = None
        if self.streaming:
            records = self._stream_records(self.batch_pairs)
        else:
            indices = self.sampler.next_batch()
            if hasattr(self.source, "set_epoch"):
                self.source.set_epoch(self.sampler.epoch)
            try:
                records = [self.source[i] for i in indices]
            except SourceError as err:  # SkipBadSamples found no good pair to stand in
                raise RunError(f"data: {err}; check the data with `vipo data stats`") from None
            spec = (self.sampler.epoch, [int(i) for i in indices])
        return records, spec, self._current_position(), self._source_stats()

    def _submit(self) -> None:
        if self._executor is None:
            # CUDA's current device is per thread: without this, DALI's "mixed" decoders of every
            # rank would run on GPU 0.
            device = torch.cuda.current_device() if torch.cuda.is_initialized() else None
            self._executor = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="vipo-prefetch",
                initializer=_use_cuda_device,
                initargs=(device,),
            )
        self._pending.append(self._executor.submit(self._produce))

    def _drain(self) -> None:
        """Cancel or wait out every prepared batch, so nothing else touches the source."""
        while self._pending:
            future = self._pending.popleft()
            if not future.cancel():
                wait([future])

    # -- the caller's side ------------------------------------------------------------------------

    def _from_workers(self) -> tuple[list[PairRecord], tuple, dict, dict[str, int]]:
        if self._loader is None:
            start = self._source_stats()  # what this process found before the workers (a header scan)
            self._worker_stats = {}
            self._start_stats = start
            self._loader = iter(
                torch.utils.data.DataLoader(
                    _BatchRecords(self.source),
                    batch_size=None,
                    sampler=_BatchSpecs(self),
                    num_workers=self.num_workers,
                    collate_fn=_as_is,
                    prefetch_factor=max(1, self.prefetch_batches),
                    multiprocessing_context=worker_start(torch.cuda.is_initialized()),
                )
            )
        try:
            records, indices, worker, stats = next(self._loader)
        except SourceError as err:
            raise RunError(f"data: {err}; check the data with `vipo data stats`") from None
        self._worker_stats[worker] = stats
        return records, indices, self._ahead.popleft(), self._merged_stats()

    def _merged_stats(self) -> dict[str, int]:
        """This process's counters (a header scan before the workers, pairs the batch decoder
        found bad) plus each worker's."""
        merged = dict(self._start_stats)
        for counters in self._worker_stats.values():
            for key, value in counters.items():
                merged[key] = merged.get(key, 0) + value
        return merged

    def _stop_workers(self) -> None:
        self._loader = None  # the iterator's workers shut down as it goes
        self._ahead.clear()

    def next_records(self) -> list[PairRecord]:
        if self.num_workers:
            try:
                records, indices, position, stats = self._from_workers()
            except BaseException:
                self._stop_workers()  # batches in flight came from positions the caller never saw
                self._restore(self._position)
                raise
        elif self.prefetch_batches == 0:
            records, indices, position, stats = self._produce()
        else:
            if not self._pending:
                self._submit()
            future = self._pending.popleft()
            while len(self._pending) < self.prefetch_batches:
                self._submit()
            try:
                records, indices, position, stats = future.result()
            except BaseException:
                # Batches after a failed one were drawn from a position the caller never saw:
                # drop them and rewind, so a retry starts where the last handed-out batch ended.
                self._drain()
                self._restore(self._position)
                raise
        if self.decoder is not None:
            records, position, stats = self._decode(records, indices, position, stats)
        self._position, self._stats = position, stats
        self._served += len(records)
        bad = bad_count(stats) - self._bad_at_start
        self._check_bad(bad, self._served + bad)
        return records

    def _decode(self, records, indices, position, stats):
        """A batch of EncodedImages decoded by DALI on `self.decoder`, in the caller's thread (on
        the GPU for "mixed"); a pair found bad is counted and stood in for (see decode_pairs):
        for a map-style source by the pair the PIL path would have had there, for a stream by
        the stream's next pair, read after the rewind to this batch's end (so prefetched batches
        are dropped and the position moves past the stand-in)."""
        from vipo.loaders.dali import decode_pairs, is_encoded

        if not any(is_encoded(r) for r in records):
            return records, position, stats
        end, replaced = [position], []

        def rewind() -> None:  # nothing else may touch the source while a stand-in is read
            self._drain()
            self._restore(end[0])

        def stand_in(at: int, record: PairRecord, bad) -> PairRecord:
            replaced.append(bad.ref)
            if self.streaming:
                self.source.skips.skip(bad.kind, bad.ref, bad.reason)
                rewind()
                (record,) = self._stream_records(1)
                end[0] = self._current_position()
                return record
            epoch, batch = indices
            if not hasattr(self.source, "mark_bad"):
                raise bad
            if not self.num_workers:  # workers read their own copies of the source
                rewind()
            if hasattr(self.source, "set_epoch"):
                self.source.set_epoch(epoch)
            self.source.mark_bad(batch[at], bad)
            try:
                return self.source[batch[at]]
            except SourceError as err:  # no good pair left to stand in
                raise RunError(f"data: {err}; check the data with `vipo data stats`") from None

        decoded = decode_pairs(records, self.decoder, stand_in, in_place=not self.streaming)
        if not replaced:
            return decoded, position, stats
        if self.num_workers:
            self._start_stats = self._source_stats()
            return decoded, end[0], self._merged_stats()
        return decoded, end[0], self._source_stats()

    def decoded(self, records: list[PairRecord], indices: list[int]) -> list[PairRecord]:
        """`records` of a map-style source (at `indices`) as the step gets them: decoded by the
        batch decoder when the source leaves decoding to it (the trainer's shape probe)."""
        if self.decoder is None:
            return records
        return self._decode(records, (self.sampler.epoch, indices), self._position, self._stats)[0]

    def next_indices(self) -> tuple[list[int], int]:
        """The next batch's indices and their epoch, for a map-style source read by the caller
        (the latent cache); the position advances as with next_records, without prefetch."""
        if self.streaming or self.prefetch_batches or self.num_workers:
            raise RunError("next_indices needs a map-style source without prefetch or workers")
        indices = self.sampler.next_batch()
        self._position = self._current_position()
        self._served += len(indices)
        return indices, self.sampler.epoch

    def _check_bad(self, bad: int, tried: int) -> None:
        kinds = ", ".join(f"{kind}={self._stats[kind]}" for kind in BAD_KINDS if self._stats.get(kind))
        if tried and bad >= tried:
            examples = self.source.skip_examples() if hasattr(self.source, "skip_examples") else {}
            first = next((examples[kind] for kind in BAD_KINDS if kind in examples), "?")
            raise RunError(f"data: all {tried} pairs tried are bad files ({kinds}); first: {first}")
        if tried < MIN_ATTEMPTS_FOR_BAD_FRACTION or bad / tried <= self.max_bad_fraction:
            return
        raise RunError(
            f"data: {bad} of {tried} pairs tried were bad files ({bad / tried:.1%}: {kinds}), more than "
            f"data.max_bad_fraction={self.max_bad_fraction}; check the data with `vipo data stats` "
            "or raise the limit"
        )

    def stats(self) -> dict[str, int]:
        """The source's counters as of the last batch handed out (prefetched batches not counted)."""
        return dict(self._stats)

    def state_dict(self) -> dict:
        return dict(self._position)

    def load_state_dict(self, state: dict) -> None:
        self._drain()
        self._stop_workers()
        self._restore(state)

    def _restore(self, state: dict) -> None:
        if self.streaming:
            self.source.load_state_dict(state["stream"])
            self._iterator = None
        else:
            self.sampler.load_state_dict(state)
        self._position = self._current_position()

    def close(self) -> None:
        """Stop the prefetch thread or the workers (batches prepared but not handed out are dropped)."""
        self._stop_workers()
        self._drain()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def to_pixels(records: list[PairRecord], device: torch.device) -> torch.Tensor:
    """[2B, 3, H, W] (images) or [2B, 3, F, H, W] (clips) in [-1, 1]: winners, then losers."""
    shapes = {r.winner.shape for r in records} | {r.loser.shape for r in records}
    if len(shapes) != 1:
        raise RunError(f"a batch mixes shapes {sorted(shapes)}: set data.buckets so a batch holds one size")
    return stack_pixels([r.winner for r in records] + [r.loser for r in records], device)
