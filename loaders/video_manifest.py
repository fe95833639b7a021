"""Video preference pairs listed in a JSONL manifest, one pair a line:

    {"prompt": "a cat surfing", "winner": "clips/0001_a.mp4", "loser": "clips/0001_b.webm",
     "category": "motion", "id": "0001"}

Paths are relative to the manifest's folder and must stay inside it ('..', absolute paths
elsewhere and symlinks that lead out are refused, naming the line, unless
`allow_outside_root=True`); clips are mp4, webm or mkv in any codec ffmpeg decodes. `category`,
`id` and `frame_weights` (one weight >= 0 per frame of the winner clip as stored; the sampled
frames take theirs, for winner and loser alike; loaders/weight_maps.py) are optional; without an id a pair is named by a hash of its prompt and paths, so it
keeps its id when lines are added or reordered (the latent cache keys on it). A clip path that
is a folder or FIFO is a counted skip (skipped_not_a_file), never opened.

`pairs[i]` probes both clips, plans them together (loaders/video.py: same frames, same
resize/crop, one random draw per pair from (seed, epoch, pair id), as the image sources'
PairTransform) and decodes them with DALI or PyAV (loaders/dali.py); with `batch=True` it
leaves them as EncodedClips for the batch decoder instead (dali.decode_pairs: NVDEC, a
micro-batch a run, frames left on the GPU). A clip that cannot be used
raises BadSample and is counted and logged in `stats()` by kind; wrap the source in
`SkipBadSamples` to step over it. Counters are per process (each DataLoader worker keeps its own).
"""

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np

from . import dali
from .images import BadSample, CountedSource, ManifestRoot, SourceError, jsonl_objects, shown, stable_hash
from .records import PairRecord
from .video import FrameSampling, plan_pair, probe
from .weight_maps import frame_weights, sampled_frames

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv")
SKIP_KINDS = ("skipped_missing", "skipped_corrupt", "skipped_short", "skipped_not_a_file")


class VideoPairManifest(CountedSource):
    """`size` is the output (height, width) of both clips (None: each pair's winner size);
    `buckets` (loaders/buckets.py, (width, height) sizes, instead of `size`): each pair is resized
    and cropped to the bucket of its winner's aspect ratio, as the paper trains Wan on 16:9 and
    1:1 clips at once -- batch it with BucketBatchSampler over `image_sizes()`.
    `backend` "auto" | "dali" | "pyav" and `device` "auto" | "cpu" | "mixed" go to dali.decode_clips.
    `allow_outside_root`: let entries name clips outside the manifest's folder."""

    def __init__(
        self,
        path,
        sampling: FrameSampling,
        size: tuple[int, int] | None = None,
        backend: str = "auto",
        device: str = "auto",
        seed: int = 0,
        buckets=None,
        allow_outside_root: bool = False,
        batch: bool = False,
    ):
        if size is not None and buckets is not None:
            raise ValueError("VideoPairManifest takes size= or buckets=, not both")
        self.buckets = buckets
        dali.check_choice(backend, dali.VIDEO_BACKENDS, "video backend")
        dali.check_choice(device, dali.DEVICES, "DALI device")
        self.path = Path(path)
        self.sampling, self.size, self.backend, self.device, self.seed = sampling, size, backend, device, seed
        self.entries = self._read(self.path, allow_outside_root)
        self._start_counts(f"video manifest {self.path}", SKIP_KINDS)
        self.decoded: Counter[str] = Counter()
        # batch: pairs come back as EncodedClips (probed and planned, not decoded) for the batch
        # decoder (dali.decode_pairs), a micro-batch a DALI run on `batch_device`.
        self.batch_device = dali.video_device(device) if batch else None

    @staticmethod
    def _read(path: Path, allow_outside_root: bool = False) -> list[dict]:
        root, entries = ManifestRoot(path, allow_outside_root), []
        for where, row in jsonl_objects(
            path, known=("prompt", "winner", "loser", "category", "id", "frame_weights")
        ):
            for key in ("prompt", "winner", "loser"):
                if key in row and not isinstance(row[key], str):
                    raise SourceError(
                        f"{where}: {key!r} must be a string, got {type(row[key]).__name__} {shown(row[key])}"
                    )
                if not row.get(key):
                    raise SourceError(f"{where}: missing or empty string field {key!r}")
            for key in ("winner", "loser"):
                if Path(row[key]).suffix.lower() not in VIDEO_SUFFIXES:
                    raise SourceError(
                        f"{where}: {key} {row[key]!r} is not one of {', '.join(VIDEO_SUFFIXES)}"
                    )
            if row["winner"] == row["loser"]:
                raise SourceError(f"{where}: winner and loser are the same clip {row['winner']!r}")
            digest = hashlib.sha1(
                "\0".join((row["prompt"], row["winner"], row["loser"])).encode()
            ).hexdigest()
            pair_id = str(row.get("id") or f"video-{digest[:16]}")
            entries.append(
                {
                    "id": pair_id,
                    "prompt": row["prompt"],
                    "category": str(row.get("category") or ""),
                    "winner": str(root.path(row["winner"], where, "winner")),
                    "loser": str(root.path(row["loser"], where, "loser")),
                    "frame_weights": (
                        frame_weights(row["frame_weights"], where)
                        if row.get("frame_weights") is not None
                        else None
                    ),
                }
            )
        if not entries:
            raise SourceError(f"{path}: no pairs")
        return entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> PairRecord:
        if not 0 <= index < len(self.entries):
            raise IndexError(f"pair {index} out of range [0, {len(self.entries)})")
        entry = self.entries[index]
        try:
            winner, loser = probe(entry["winner"]), probe(entry["loser"])
            rng = np.random.default_rng([self.seed, self.epoch, stable_hash(entry["id"])])
            size = self.size
            if self.buckets is not None:
                width, height = self.buckets[self.buckets.bucket_of(winner.width, winner.height)]
                size = (height, width)
            plans = plan_pair(winner, loser, self.sampling, size, rng)
            weights = entry["frame_weights"]
            if weights is not None:
                weights = sampled_frames(
                    weights, plans[0].frame_indices, f"pair {entry['id']}: {entry['winner']}"
                )
            if self.batch_device is not None:
                clips = [
                    dali.EncodedClip(
                        info, plan, *dali.choose_video_backend(info.codec, self.backend, self.device)
                    )
                    for info, plan in zip((winner, loser), plans, strict=True)
                ]
            else:
                clips = dali.decode_clips([(winner, plans[0]), (loser, plans[1])], self.backend, self.device)
        except BadSample as error:
            self.skips.skip(error.kind, f"pair {entry['id']}", str(error))
            raise
        if self.batch_device is not None:
            self.decoded["pairs"] += 1
            return PairRecord(entry["id"], entry["prompt"], *clips, entry["category"], weight_map=weights)
        for clip in clips:
            self.decoded[f"clips_{clip.backend}"] += 1
            self.decoded["fallbacks"] += bool(clip.reason)
        self.decoded["pairs"] += 1
        return PairRecord(
            entry["id"],
            entry["prompt"],
            clips[0].frames,
            clips[1].frames,
            entry["category"],
            weight_map=weights,
        )

    def image_sizes(self) -> list[tuple[int, int] | None]:
        """(width, height) of every pair's winner clip, None where it cannot be probed (the
        bucket sampler never draws those); reads headers and packets, decodes nothing."""
        sizes = []
        for entry in self.entries:
            try:
                info = probe(entry["winner"])
                sizes.append((info.width, info.height))
            except BadSample as error:
                self.skips.skip(error.kind, f"pair {entry['id']}", str(error))
                sizes.append(None)
        return sizes

    def stats(self) -> dict[str, int]:
        """Counters of this process: skips by kind, pairs decoded, clips per backend, and clips
        PyAV decoded although DALI was asked for (fallbacks)."""
        return {**self.skips.stats(), "pairs": 0, "fallbacks": 0, **self.decoded}
