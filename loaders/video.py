"""Video clips for preference pairs: probe, frame sampling, resize/crop, and the PyAV decoder.

A pair's two clips get the same decisions, so they stack into one [2, F, H, W, 3] batch and the
model sees the same kind of motion and framing in both:

    probe(path) -> ClipInfo           demux only: codec, size, presentation timestamps
    plan_pair(winner, loser, ...)     frame indices and resize/crop geometry for both clips
    decode_pyav(info, plan)           [F, H, W, 3] uint8 (every codec ffmpeg has)

The DALI decoder (loaders/dali.py) takes the same ClipPlan, so both backends return the same
frames. Frame sampling (FrameSampling):

- `num_frames` frames, `stride` source frames apart, or resampled to `fps` by timestamps (each
  output time shows the frame on screen at that time, so clips of different frame rates cover the
  same span of time);
- the window starts at the first frame (`start`), in the middle of the valid starts (`center`),
  or at a random valid start (`random`). The random draw is one number u in [0, 1) per pair, and
  each clip starts at floor(u * its number of valid starts): the two clips are cut at the same
  relative position, each within its own length;
- a clip too short for the window raises BadSample (`short_clip="skip"`, the default: a frozen or
  looped video teaches motion the data does not have) or wraps around to its first frame
  (`short_clip="loop"`).
"""

import dataclasses
from dataclasses import dataclass

import numpy as np

from .images import BadSample, regular_file

START_POLICIES = ("start", "center", "random")
SHORT_CLIP_POLICIES = ("skip", "loop")
_TIME_EPS = 1e-6  # seconds: float slack when an output time falls exactly on a frame's timestamp


@dataclass(frozen=True)
class ClipInfo:
    """What demuxing (no decoding) tells of a clip. `timestamps` are seconds from the first frame,
    in presentation order; `pts` are the same in the stream's time base (used to seek; None when
    frames carry no distinct timestamps)."""

    path: str
    codec: str
    width: int
    height: int
    timestamps: np.ndarray
    pts: tuple[int, ...] | None
    frame_duration: float

    @property
    def num_frames(self) -> int:
        return len(self.timestamps)

    @property
    def duration(self) -> float:
        return float(self.timestamps[-1]) + self.frame_duration


def probe(path) -> ClipInfo:
    """Codec, size and frame timestamps of the first video stream, from its packets.

    Reading packets costs a small fraction of decoding them and gives the exact frame count
    (containers often store none, webm never)."""
    import av

    path = str(path)
    regular_file(path, path, "clip")  # a FIFO named like a clip would block av.open forever
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise BadSample(path, "no video stream")
            stream = container.streams.video[0]
            codec, width, height = (
                stream.codec_context.name,
                stream.codec_context.width,
                stream.codec_context.height,
            )
            rate = stream.average_rate or stream.guessed_rate
            time_base = stream.time_base
            pts, count = [], 0
            for packet in container.demux(stream):
                if packet.size == 0 or packet.is_discard:  # flush packets, edit-list discards
                    continue
                count += 1
                pts.append(packet.pts)
    except av.FFmpegError as error:
        raise BadSample(path, f"cannot read the container: {error}") from error
    if count == 0:
        raise BadSample(path, "the video stream has no frames")
    if width <= 0 or height <= 0:
        raise BadSample(path, f"the video stream has no frame size ({width}x{height})")
    nominal = 1.0 / float(rate) if rate else 0.0
    if any(p is None for p in pts) or time_base is None:
        if not nominal:
            raise BadSample(path, "frames carry no timestamps and the stream no frame rate")
        timestamps, pts = np.arange(count) * nominal, None
    else:
        pts = tuple(sorted(pts))  # packets come in decode order; frames are shown in pts order
        timestamps = (np.asarray(pts, dtype=np.float64) - pts[0]) * float(time_base)
        if len(set(pts)) < len(pts):
            pts = None  # repeated timestamps cannot place a frame after a seek: decode from the start
    duration = float(np.median(np.diff(timestamps))) if count > 1 else nominal
    return ClipInfo(path, codec, width, height, timestamps, pts, duration or nominal)


@dataclass(frozen=True)
class FrameSampling:
    """Which frames of a clip a sample takes (see the module docstring)."""

    num_frames: int
    stride: int | None = None
    fps: float | None = None
    start: str = "start"
    short_clip: str = "skip"
    frame_chunk: int | None = None  # the model's VAE takes 1 + k * frame_chunk frames (Wan: 4)

    def __post_init__(self):
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.frame_chunk and (self.num_frames - 1) % self.frame_chunk:
            below = self.num_frames - (self.num_frames - 1) % self.frame_chunk
            raise ValueError(
                f"num_frames={self.num_frames} is not 1 + {self.frame_chunk}k, which the model's VAE needs "
                f"(it would drop the last frames); use {below} or {below + self.frame_chunk}"
            )
        if self.stride is not None and self.fps is not None:
            raise ValueError(f"set stride ({self.stride}) or fps ({self.fps}), not both")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.start not in START_POLICIES:
            raise ValueError(f"unknown start policy {self.start!r}; known: {', '.join(START_POLICIES)}")
        if self.short_clip not in SHORT_CLIP_POLICIES:
            raise ValueError(
                f"unknown short_clip policy {self.short_clip!r}; known: {', '.join(SHORT_CLIP_POLICIES)}"
            )

    def draw(self, rng: np.random.Generator | None) -> float:
        """The pair's one random number: where in its valid starts each clip begins."""
        if self.start != "random":
            return 0.0
        if rng is None:
            raise ValueError("start='random' needs a seeded numpy Generator")
        return float(rng.random())

    def _valid_starts(self, info: ClipInfo) -> int:
        """How many start frames leave room for the whole window (0: the clip is too short)."""
        if self.fps is None:
            span = (self.num_frames - 1) * (self.stride or 1) + 1
            return max(0, info.num_frames - span + 1)
        last_offset = (self.num_frames - 1) / self.fps
        return int(np.searchsorted(info.timestamps + last_offset, info.duration - _TIME_EPS, side="left"))

    def indices(self, info: ClipInfo, u: float = 0.0) -> np.ndarray:
        """Frame indices (presentation order) of one clip, for the pair's draw `u`."""
        starts = self._valid_starts(info)
        if starts == 0:
            if self.short_clip == "skip":
                raise BadSample(
                    info.path, f"too short: {self._need(info)} (short_clip='skip')", "skipped_short"
                )
            return self._looped(info)
        if self.start == "start":
            first = 0
        elif self.start == "center":
            first = (starts - 1) // 2
        else:
            first = min(int(u * starts), starts - 1)
        if self.fps is None:
            return first + np.arange(self.num_frames) * (self.stride or 1)
        times = info.timestamps[first] + np.arange(self.num_frames) / self.fps
        return np.searchsorted(info.timestamps, times + _TIME_EPS, side="right") - 1

    def _looped(self, info: ClipInfo) -> np.ndarray:
        if self.fps is None:
            return (np.arange(self.num_frames) * (self.stride or 1)) % info.num_frames
        times = np.mod(np.arange(self.num_frames) / self.fps, info.duration)
        return np.searchsorted(info.timestamps, times + _TIME_EPS, side="right") - 1

    def _need(self, info: ClipInfo) -> str:
        if self.fps is None:
            span = (self.num_frames - 1) * (self.stride or 1) + 1
            return f"{info.num_frames} frames, {self.num_frames} at stride {self.stride or 1} need {span}"
        need = (self.num_frames - 1) / self.fps
        return (
            f"{info.duration:.3f} s, {self.num_frames} frames at {self.fps} fps span more than {need:.3f} s"
        )


@dataclass(frozen=True)
class ClipPlan:
    """Everything a decoder needs to produce one clip: which frames, resized to `resized` (h, w),
    then cropped to `size` (h, w) at (`top`, `left`)."""

    frame_indices: tuple[int, ...]
    resized: tuple[int, int]
    top: int
    left: int
    size: tuple[int, int]


def cover_and_center(source: tuple[int, int], size: tuple[int, int]) -> tuple[tuple[int, int], int, int]:
    """Resize (h, w) `source` to the smallest size that covers `size` keeping its aspect, then
    center-crop: returns the resized (h, w) and the crop's top and left."""
    (src_h, src_w), (out_h, out_w) = source, size
    scale = max(out_h / src_h, out_w / src_w)
    resized = (max(out_h, round(src_h * scale)), max(out_w, round(src_w * scale)))
    return resized, (resized[0] - out_h) // 2, (resized[1] - out_w) // 2


def plan_clip(info: ClipInfo, sampling: FrameSampling, size: tuple[int, int], u: float = 0.0) -> ClipPlan:
    resized, top, left = cover_and_center((info.height, info.width), size)
    indices = tuple(int(i) for i in sampling.indices(info, u))
    return ClipPlan(indices, resized, top, left, tuple(size))


def plan_pair(
    winner: ClipInfo,
    loser: ClipInfo,
    sampling: FrameSampling,
    size: tuple[int, int] | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[ClipPlan, ClipPlan]:
    """The same decisions for both clips: frame count, stride or fps, start policy (one random
    draw for the pair), output (h, w) -- `size`, or the winner's own size when None."""
    size = tuple(size) if size is not None else (winner.height, winner.width)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (height, width) with both >= 1, got {size}")
    u = sampling.draw(rng)
    return plan_clip(winner, sampling, size, u), plan_clip(loser, sampling, size, u)


def decode_pyav(info: ClipInfo, plan: ClipPlan) -> np.ndarray:
    """[F, H, W, 3] uint8 frames of `plan`, decoded with PyAV (libavcodec: every codec ffmpeg has).

    Seeks to the keyframe before the first wanted frame when frames carry timestamps, then
    decodes only up to the last wanted one."""
    import av

    wanted = set(plan.frame_indices)
    first, last = min(wanted), max(wanted)
    by_pts = {p: i for i, p in enumerate(info.pts)} if info.pts is not None else None
    kept: dict[int, np.ndarray] = {}
    regular_file(info.path, info.path, "clip")  # probed as a file, but it may have been swapped since
    try:
        with av.open(info.path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            seeked = by_pts is not None and first > 0
            if seeked:
                container.seek(info.pts[first], stream=stream, backward=True)
            position = -1
            for frame in container.decode(stream):
                if seeked:
                    if frame.pts not in by_pts:
                        break  # cannot place this frame: decode again from the start
                    position = by_pts[frame.pts]
                else:
                    position += 1
                if position in kept or position not in wanted:
                    if position >= last:
                        break
                    continue
                kept[position] = _resize_crop(frame, plan)
                if position >= last:
                    break
    except av.FFmpegError as error:
        raise BadSample(info.path, f"cannot decode: {error}") from error
    if seeked and len(kept) < len(wanted):
        return decode_pyav(dataclasses.replace(info, pts=None), plan)
    missing = sorted(wanted - kept.keys())
    if missing:
        raise BadSample(info.path, f"decoding stopped before frame {missing[0]} of {info.num_frames}")
    return np.stack([kept[i] for i in plan.frame_indices])


def _resize_crop(frame, plan: ClipPlan) -> np.ndarray:
    from av.video.reformatter import Interpolation

    # swscale's plain BILINEAR rounds YUV->RGB a grey level or two low whenever it also scales;
    # exact rounding and full-resolution chroma keep it within a level of DALI's decoder.
    flags = Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT
    height, width = plan.resized
    rgb = frame.to_ndarray(width=width, height=height, format="rgb24", interpolation=flags)
    out_h, out_w = plan.size
    return np.ascontiguousarray(rgb[plan.top : plan.top + out_h, plan.left : plan.left + out_w])
