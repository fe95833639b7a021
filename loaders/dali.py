"""Every nvidia.dali call of vipo lives here: DALI's operator names move between releases
(`fn.experimental.decoders.video` became `fn.decoders.video`), and vipo pins
nvidia-dali-cuda130==2.4.0. nvidia.dali is imported inside functions only, so the module imports
(and its PyAV / PIL twins run) where DALI is not installed.

Video: `fn.decoders.video` decodes in-memory files, on the CPU (libavcodec inside DALI: VP8, VP9,
MJPEG only) or with NVDEC (device "mixed": also H.264, HEVC, AV1, MPEG-4); `fn.readers.video`
is GPU-only and reads files itself, so it is not used. The decoder takes the frame indices of a
ClipPlan (`frames=`), then `fn.resize` and `fn.slice` apply its resize and crop, so the DALI
path returns the frames the PyAV path (loaders/video.py) returns. A codec the chosen DALI device
cannot decode goes to PyAV, with the reason logged and returned.

Images: `fn.decoders.image` on device "mixed" is nvJPEG (hardware JPEG decoder where the GPU has
one); PIL is the CPU path. Two uses:
- `decode_images`: whole images, a pair at a time (tools that want the decoded image itself);
- `decode_pairs`: the training path. A source whose PairTransform has decoder "cpu" | "mixed"
  yields pairs of EncodedImages (bytes plus the pair's crop box, target size and flip), and one
  DALI run per micro-batch decodes, crops, resizes (Lanczos 3) and flips all 2B images, output as
  one uint8 [2B, H, W, 3] torch tensor on the GPU for "mixed" (copied from DALI's buffer to
  torch's on the device, never through the host). An image DALI would decode differently from
  PIL goes through PIL; a batch DALI fails on is decoded again with PIL, which names the bad
  image: the caller's `replace_pair` stands in another pair and counts the skip.
Clips take the same road: VideoPairManifest(batch=True) yields EncodedClips (probed clip and
ClipPlan), and `decode_pairs` decodes the 2B clips of a micro-batch in one run of the video
pipeline (NVDEC on "mixed"), clips of a codec DALI cannot decode through PyAV into the same
tensor, and a failed run clip by clip with PyAV.
"""

import ctypes
import functools
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from .images import BadSample, EncodedImage, PairTransform, decode_image, regular_file
from .records import PairRecord
from .video import ClipInfo, ClipPlan, decode_pyav

logger = logging.getLogger(__name__)

DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
DALI_NVDEC_CODECS = DALI_CPU_CODECS | {"h264", "hevc", "av1", "mpeg4"}
VIDEO_BACKENDS = ("auto", "dali", "pyav")
IMAGE_BACKENDS = ("auto", "dali", "pil")
DEVICES = ("auto", "cpu", "mixed")
MAX_BATCH = 2  # one pair per pipeline run; larger requests run in chunks


@functools.cache
def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@functools.cache
def nvdec_available() -> bool:
    """NVDEC needs the driver's libnvcuvid (not part of the CUDA toolkit; containers often lack
    it) and a CUDA device."""
    try:
        ctypes.CDLL("libnvcuvid.so.1")
    except OSError:
        return False
    return cuda_available()


def check_choice(value: str, known: tuple[str, ...], what: str) -> None:
    if value not in known:
        raise ValueError(f"unknown {what} {value!r}; known: {', '.join(known)}")


# --- pipelines: built once per process, device and kind (DataLoader workers build their own) ---

_pipelines: dict[tuple, tuple] = {}
_pipelines_lock = threading.Lock()


def _device_id(device: str) -> int | None:
    if device == "cpu":
        return None  # a CPU-only pipeline: no CUDA context
    import torch

    return torch.cuda.current_device()


def _pipeline(kind: str, device: str, batch: int = MAX_BATCH, resample: str = ""):
    """(pipeline, lock) for `kind` ("video" | "image" | "pairs") on `device` ("cpu" | "mixed"),
    taking up to `batch` samples a run ("pairs": a micro-batch's 2B images, resampled so)."""
    device_id = _device_id(device)
    key = (os.getpid(), kind, device, device_id, batch, resample)
    with _pipelines_lock:
        if key not in _pipelines:
            if kind == "pairs":
                pipe = _pair_pipeline(device, device_id, batch, resample)
            elif kind == "video":
                pipe = _video_pipeline(device, device_id, batch)
            else:
                pipe = _image_pipeline(device, device_id)
            pipe.build()
            _pipelines[key] = (pipe, threading.Lock())
        return _pipelines[key]


def _drop_pipeline(kind: str, device: str, batch: int = MAX_BATCH, resample: str = "") -> None:
    """A pipeline that raised may hold half-done state: the next call builds a fresh one."""
    with _pipelines_lock:
        _pipelines.pop((os.getpid(), kind, device, _device_id(device), batch, resample), None)


def _pipeline_def(batch: int, device_id: int | None):
    """DALI's pipeline decorator as every vipo pipeline uses it: up to `batch` samples a run,
    fed by external sources and run synchronously (no prefetch: the caller has the inputs)."""
    from nvidia.dali import pipeline_def

    return pipeline_def(
        batch_size=batch, num_threads=min(4, os.cpu_count() or 1), device_id=device_id, prefetch_queue_depth=1
    )


def _feeds(ndim: int = 1, **dtypes: str) -> list:
    """One external source per keyword, named so, of that DALI dtype (inside a pipeline)."""
    from nvidia.dali import fn, types

    return [fn.external_source(name=name, dtype=getattr(types, d), ndim=ndim) for name, d in dtypes.items()]


def _video_pipeline(device: str, device_id: int | None, batch: int = MAX_BATCH):
    from nvidia.dali import fn, types

    @_pipeline_def(batch, device_id)
    def video():
        encoded, frames, resized, start, shape = _feeds(
            encoded="UINT8", frames="INT32", resized="FLOAT", start="INT32", shape="INT32"
        )
        # pad_mode="none": an index past the end is an error, never a silently padded frame.
        clip = fn.decoders.video(encoded, device=device, frames=frames, pad_mode="none")
        clip = fn.resize(clip, size=resized, antialias=True, interp_type=types.INTERP_LINEAR)
        return fn.slice(clip, start=start, shape=shape, axis_names="HW")

    return video()


def _image_pipeline(device: str, device_id: int | None):
    from nvidia.dali import fn, types

    @_pipeline_def(MAX_BATCH, device_id)
    def image():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        return fn.decoders.image(encoded, device=device, output_type=types.RGB)

    return image()


# PairTransform's resampling filters as DALI's (names of nvidia.dali.types.DALIInterpType).
DALI_RESAMPLE = {"lanczos": "INTERP_LANCZOS3", "bicubic": "INTERP_CUBIC", "bilinear": "INTERP_LINEAR"}


def _pair_pipeline(device: str, device_id: int | None, batch: int, resample: str):
    from nvidia.dali import fn, types

    interp = getattr(types, DALI_RESAMPLE[resample])

    @_pipeline_def(batch, device_id)
    def pairs():
        encoded, roi_start, roi_end, size = _feeds(
            encoded="UINT8", roi_start="FLOAT", roi_end="FLOAT", size="FLOAT"
        )
        (mirror,) = _feeds(0, mirror="INT32")  # one number a sample
        image = fn.decoders.image(encoded, device=device, output_type=types.RGB)
        # The crop box as the resize's region of interest, in (y, x) order like the tensor: one
        # resampling from the decoded image to the target, as PIL's resize(box=...) does.
        image = fn.resize(
            image, roi_start=roi_start, roi_end=roi_end, size=size, interp_type=interp, antialias=True
        )
        return fn.flip(image, horizontal=mirror)

    return pairs()


def pair_inputs(images: list[EncodedImage]) -> dict[str, list[np.ndarray]]:
    """The pair pipeline's external-source feeds of `images` (one list entry per image)."""
    inputs = {"encoded": [], "roi_start": [], "roi_end": [], "size": [], "mirror": []}
    for image in images:
        left, top, right, bottom = image.box
        inputs["encoded"].append(np.frombuffer(image.data, dtype=np.uint8))
        inputs["roi_start"].append(np.asarray((top, left), dtype=np.float32))
        inputs["roi_end"].append(np.asarray((bottom, right), dtype=np.float32))
        inputs["size"].append(np.asarray(image.target[::-1], dtype=np.float32))
        inputs["mirror"].append(np.asarray(int(image.flip), dtype=np.int32))
    return inputs


def torch_device(device: str):
    """Where DALI's output lands as a torch tensor: the current CUDA device for "mixed"."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if device == "mixed" else torch.device("cpu")


def _copy_out(batch, out, device: str):
    """Copy a dense DALI batch into the torch tensor `out`: on the GPU (device to device, ordered
    on torch's current stream) for "mixed", so the pixels never pass through the host."""
    import torch
    from nvidia.dali.plugin.pytorch import feed_ndarray

    stream = torch.cuda.current_stream(out.device) if device == "mixed" else None
    return feed_ndarray(batch, out, cuda_stream=stream)


def _run_into(pipeline, inputs: dict, out, positions: list[int], device: str, refs: list[str]) -> None:
    """One run of `pipeline` (pipeline, lock) on `inputs`, its samples copied into `out` at
    `positions` (all of `out`: straight in). BadSample when a sample is not `out`'s shape."""
    import torch

    pipe, lock = pipeline
    with lock:  # the next run reuses DALI's output buffers: copy them out before releasing
        for name, batch in inputs.items():
            pipe.feed_input(name, batch)
        (decoded,) = pipe.run()
        shapes = [tuple(decoded[k].shape()) for k in range(len(positions))]
        for i, shape in zip(positions, shapes, strict=True):
            if shape != tuple(out.shape[1:]):
                raise BadSample(refs[i], f"DALI returned {shape}, expected {tuple(out.shape[1:])}")
        if len(positions) == len(out):
            _copy_out(decoded.as_tensor(), out, device)
        else:
            part = torch.empty((len(positions), *out.shape[1:]), dtype=torch.uint8, device=out.device)
            out[positions] = _copy_out(decoded.as_tensor(), part, device)


def decode_encoded(images: list[EncodedImage], device: str):
    """uint8 [N, H, W, 3] of `images` (one target size) decoded, cropped, resized and flipped in
    one DALI run on `device` ("cpu" | "mixed"), as a torch tensor on `torch_device(device)`.
    Images DALI does not decode as PIL does (`EncodedImage.dali` false) are decoded by PIL and
    placed in the same tensor. RuntimeError when DALI fails (a corrupt image, usually)."""
    import torch

    targets = {image.target for image in images}
    resamples = {image.resample for image in images}
    if len(targets) != 1 or len(resamples) != 1:
        raise ValueError(f"a batch mixes target sizes {sorted(targets)}: one batch decodes to one size")
    (width, height), (resample,) = targets.pop(), resamples
    out = torch.empty((len(images), height, width, 3), dtype=torch.uint8, device=torch_device(device))
    by_dali = [i for i, image in enumerate(images) if image.dali]
    if by_dali:
        pipe = _pipeline("pairs", device, len(images), resample)
        _run_into(
            pipe, pair_inputs([images[i] for i in by_dali]), out, by_dali, device, [i.ref for i in images]
        )
    for i, image in enumerate(images):
        if not image.dali:
            out[i] = torch.from_numpy(PairTransform.apply_encoded(image))
    return out


def is_encoded(record: PairRecord) -> bool:
    return isinstance(record.winner, (EncodedImage, EncodedClip))


def _output_key(item) -> tuple:
    if isinstance(item, EncodedClip):
        return ("clip", len(item.plan.frame_indices), item.plan.size)
    return ("image", item.target, item.resample)


def _decode_on_cpu(item) -> np.ndarray:
    """The CPU path's pixels of one EncodedImage (PIL) or EncodedClip (PyAV)."""
    if isinstance(item, EncodedClip):
        return decode_pyav(item.info, item.plan)
    return PairTransform.apply_encoded(item)


def decode_pairs(
    records: list[PairRecord],
    device: str,
    replace_pair: Callable[[int, PairRecord, BadSample], PairRecord | None],
    in_place: bool = True,
) -> list[PairRecord]:
    """The records of a micro-batch with EncodedImages, decoded: winner and loser become uint8
    [H, W, 3] torch tensors (views of one [2B, H, W, 3] tensor on the GPU for "mixed").

    When DALI fails on the batch, it is decoded again with PIL, pair by pair, and a pair with a
    bad image is stood in for by `replace_pair(position, record, bad)` (the caller counts the
    skip and returns the next pair its source gives, itself encoded, or None to drop the pair):
    in its place (`in_place`, a map-style source: the PIL path's SkipBadSamples puts the next
    good pair there too) or, for a stream, appended after the others, the order a stream that
    skipped it would have given."""
    groups: dict[tuple, list[int]] = {}  # one DALI run per output shape (a cache's shard mixes buckets)
    for j, record in enumerate(records):
        groups.setdefault(_output_key(record.winner), []).append(j)
    decoded = list(records)
    try:
        for group in groups.values():
            items = [records[j].winner for j in group] + [records[j].loser for j in group]
            try:
                if isinstance(items[0], EncodedClip):
                    out = decode_encoded_clips(items, device)
                else:
                    out = decode_encoded(items, device)
            except (RuntimeError, BadSample):
                if isinstance(items[0], EncodedClip):
                    _drop_pipeline("video", device, len(items))
                else:
                    _drop_pipeline("pairs", device, len(items), items[0].resample)
                raise
            for k, j in enumerate(group):
                decoded[j] = replace(records[j], winner=out[k], loser=out[len(group) + k])
        return decoded
    except (RuntimeError, BadSample) as error:
        clips = isinstance(records[0].winner, EncodedClip)
        what, fallback = ("clips", "PyAV") if clips else ("images", "PIL")
        _log_fallback(records[0].id, f"DALI failed on a batch of {what}: {_dali_error(error)}", fallback)
    import torch

    pending, done = list(records), []
    while len(done) < len(pending):
        j = len(done)
        record = pending[j]
        try:
            pixels = [_decode_on_cpu(item) for item in (record.winner, record.loser)]
        except BadSample as bad:
            stand_in = replace_pair(j, record, bad)
            if stand_in is not None and in_place:
                pending[j] = stand_in
                continue
            del pending[j]
            if stand_in is not None:
                pending.append(stand_in)
            continue
        done.append(replace(record, winner=torch.from_numpy(pixels[0]), loser=torch.from_numpy(pixels[1])))
    return done


def _run(kind: str, device: str, inputs: dict[str, list[np.ndarray]]) -> list[np.ndarray]:
    pipe, lock = _pipeline(kind, device)
    with lock:  # the next run reuses the output buffers: copy them out before releasing
        for name, batch in inputs.items():
            pipe.feed_input(name, batch)
        (out,) = pipe.run()
        if device == "mixed":
            out = out.as_cpu()
        return [np.array(out[i]) for i in range(len(out))]


def _dali_error(error: Exception) -> str:
    """The operator's own message: a DALI error repeats the pipeline traceback around it, and
    its last line only says that the pipeline object is no longer valid (it is then rebuilt)."""
    lines = [line.strip() for line in str(error).splitlines()]
    if "encountered:" in lines:
        lines = lines[lines.index("encountered:") + 1 :]
    return next((line for line in lines if line), repr(error))[:200]


# --- video ---


@dataclass(frozen=True)
class DecodedClip:
    frames: np.ndarray  # [F, H, W, 3] uint8
    backend: str  # "dali-cpu" | "dali-mixed" | "pyav"
    reason: str = ""  # why PyAV decoded it when DALI was asked for


def video_device(device: str = "auto") -> str:
    """The DALI device for video: "mixed" (NVDEC) where it can run, else "cpu"."""
    check_choice(device, DEVICES, "DALI device")
    if device == "auto":
        return "mixed" if nvdec_available() else "cpu"
    return device


def choose_video_backend(codec: str, backend: str = "auto", device: str = "auto") -> tuple[str, str]:
    """("dali-cpu" | "dali-mixed" | "pyav", reason PyAV was chosen over a requested DALI)."""
    check_choice(backend, VIDEO_BACKENDS, "video backend")
    if backend == "pyav":
        return "pyav", ""
    if not dali_available():
        if backend == "dali":
            raise RuntimeError("video backend 'dali' needs nvidia-dali-cuda130 (pip install vipo[video])")
        return "pyav", "DALI is not installed"
    if backend == "auto" and device == "auto" and video_device("auto") == "cpu":
        # Without NVDEC, PyAV decoded 720p VP9 faster than DALI's CPU decoder on 2 cores
        # (81-164 vs 56-92 frames/s): left to itself, auto picks DALI only for the GPU decoder.
        # Asking for device="cpu" still gets DALI's CPU decoder (the GPU path's code, on CPU).
        return "pyav", ""
    device = video_device(device)
    codecs = DALI_NVDEC_CODECS if device == "mixed" else DALI_CPU_CODECS
    if codec not in codecs:
        return (
            "pyav",
            f"DALI's {device} video decoder cannot decode {codec} (it does {', '.join(sorted(codecs))})",
        )
    return f"dali-{device}", ""


_logged_fallbacks: set[str] = set()


def _log_fallback(path: str, reason: str, decoder: str = "PyAV") -> None:
    # Once per reason at warning level (a data set has thousands of clips), at most 100 reasons.
    if reason not in _logged_fallbacks and len(_logged_fallbacks) < 100:
        _logged_fallbacks.add(reason)
        logger.warning("decoding with %s: %s (first: %s)", decoder, reason, path)
    else:
        logger.debug("decoding %s with %s: %s", path, decoder, reason)


def decode_clips(
    clips: list[tuple[ClipInfo, ClipPlan]], backend: str = "auto", device: str = "auto"
) -> list[DecodedClip]:
    """Decode each (info, plan) with DALI where the codec allows, else PyAV (reason logged)."""
    choices = [choose_video_backend(info.codec, backend, device) for info, _ in clips]
    decoded: list[DecodedClip | None] = [None] * len(clips)
    for name in ("dali-cpu", "dali-mixed"):
        group = [i for i, (chosen, _) in enumerate(choices) if chosen == name]
        for chunk in (group[k : k + MAX_BATCH] for k in range(0, len(group), MAX_BATCH)):
            try:
                frames = _decode_dali([clips[i] for i in chunk], name.removeprefix("dali-"))
            except RuntimeError as error:
                _drop_pipeline("video", name.removeprefix("dali-"))
                reason = f"DALI failed: {_dali_error(error)}"
                for i in chunk:
                    choices[i] = ("pyav", reason)
                continue
            for i, clip in zip(chunk, frames, strict=True):
                decoded[i] = DecodedClip(clip, name)
    for i, (chosen, reason) in enumerate(choices):
        if chosen == "pyav":
            if reason:
                _log_fallback(clips[i][0].path, reason)
            decoded[i] = DecodedClip(decode_pyav(*clips[i]), "pyav", reason)
    return decoded


def clip_inputs(clips: list[tuple[ClipInfo, ClipPlan]]) -> dict[str, list[np.ndarray]]:
    """The video pipeline's external-source feeds (the files are read here)."""
    inputs = {"encoded": [], "frames": [], "resized": [], "start": [], "shape": []}
    for info, plan in clips:
        inputs["encoded"].append(_read_bytes(info.path))
        inputs["frames"].append(np.asarray(plan.frame_indices, dtype=np.int32))
        inputs["resized"].append(np.asarray(plan.resized, dtype=np.float32))
        inputs["start"].append(np.asarray((plan.top, plan.left), dtype=np.int32))
        inputs["shape"].append(np.asarray(plan.size, dtype=np.int32))
    return inputs


def _decode_dali(clips: list[tuple[ClipInfo, ClipPlan]], device: str) -> list[np.ndarray]:
    outputs = _run("video", device, clip_inputs(clips))
    for (info, plan), frames in zip(clips, outputs, strict=True):
        expected = (len(plan.frame_indices), *plan.size, 3)
        if frames.shape != expected:
            raise BadSample(info.path, f"DALI returned frames of shape {frames.shape}, expected {expected}")
    return outputs


def _read_bytes(path: str) -> np.ndarray:
    regular_file(path, path, "clip")  # np.fromfile on a FIFO would block forever
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise BadSample(path, f"cannot read: {error}") from error


@dataclass(frozen=True)
class EncodedClip:
    """One clip of a pair left for the batch decoder: the probed clip, its ClipPlan (the pair's
    frames, resize and crop), and the decoder its codec gets ("dali-cpu" | "dali-mixed" |
    "pyav", with the reason PyAV was chosen over a requested DALI)."""

    info: ClipInfo
    plan: ClipPlan
    backend: str
    reason: str = ""

    @property
    def ref(self) -> str:
        return self.info.path


def decode_encoded_clips(clips: list[EncodedClip], device: str):
    """uint8 [N, F, H, W, 3] of `clips` (one frame count and size), the DALI ones in one run of
    the video pipeline on `device` ("cpu" | "mixed"), as a torch tensor on `torch_device(device)`
    (NVDEC's frames stay on the GPU); clips of a codec DALI cannot decode come from PyAV.
    RuntimeError (DALI) or BadSample (DALI's frames are not the plan's) when the run fails."""
    import torch

    shapes = {(len(c.plan.frame_indices), *c.plan.size) for c in clips}
    if len(shapes) != 1:
        raise ValueError(f"a batch mixes clip shapes {sorted(shapes)}: one batch decodes to one shape")
    shape = (len(clips), *shapes.pop(), 3)
    out = torch.empty(shape, dtype=torch.uint8, device=torch_device(device))
    by_dali = [i for i, clip in enumerate(clips) if clip.backend.startswith("dali-")]
    if by_dali:
        pipe = _pipeline("video", device, len(clips))
        inputs = clip_inputs([(clips[i].info, clips[i].plan) for i in by_dali])
        _run_into(pipe, inputs, out, by_dali, device, [c.ref for c in clips])
    for i, clip in enumerate(clips):
        if not clip.backend.startswith("dali-"):
            if clip.reason:
                _log_fallback(clip.ref, clip.reason)
            out[i] = torch.from_numpy(decode_pyav(clip.info, clip.plan))
    return out


# --- images ---


def image_device(backend: str = "auto", device: str = "auto") -> str:
    """The decoder, "pil" or a DALI device. `auto`: nvJPEG ("mixed") where a GPU is, else PIL;
    `dali` without a GPU runs DALI's CPU decoder (the same pipeline: how CPU tests reach it)."""
    check_choice(backend, IMAGE_BACKENDS, "image backend")
    check_choice(device, DEVICES, "DALI device")
    if backend == "pil" or (backend == "auto" and not (dali_available() and cuda_available())):
        return "pil"
    if not dali_available():
        raise RuntimeError("image backend 'dali' needs nvidia-dali-cuda130 (pip install vipo[video])")
    if device == "auto":
        return "mixed" if cuda_available() else "cpu"
    return device


def decode_images(
    blobs: list[bytes], names: list[str] | None = None, backend: str = "auto", device: str = "auto"
) -> tuple[list[np.ndarray], str]:
    """HxWx3 uint8 RGB arrays of encoded images and the backend that decoded them ("pil" |
    "dali-cpu" | "dali-mixed"). `names` label errors (BadSample); a DALI failure retries with PIL,
    which names the bad image."""
    names = names or [f"image {i}" for i in range(len(blobs))]
    chosen = image_device(backend, device)
    if chosen != "pil":
        try:
            images = []
            for k in range(0, len(blobs), MAX_BATCH):
                chunk = [np.frombuffer(blob, dtype=np.uint8) for blob in blobs[k : k + MAX_BATCH]]
                images += _run("image", chosen, {"encoded": chunk})
            return images, f"dali-{chosen}"
        except RuntimeError as error:
            _drop_pipeline("image", chosen)
            _log_fallback(names[0], f"DALI image decode failed: {_dali_error(error)}", "PIL")
    return [_decode_pil(blob, name) for blob, name in zip(blobs, names, strict=True)], "pil"


def _decode_pil(blob: bytes, name: str) -> np.ndarray:
    # RGB, upright by EXIF orientation as nvJPEG (adjust_orientation=True). Alpha: PIL composites
    # it on white, DALI drops it; pair images with transparency differ between the two paths.
    return np.asarray(decode_image(blob, ref=name), dtype=np.uint8)


def batch_decoder(source) -> str | None:
    """The DALI device ("cpu" | "mixed") that decodes `source`'s batches, or None when the source
    decodes its pairs itself (PIL, PyAV, or a source without a PairTransform)."""
    clips = getattr(source, "batch_device", None)  # VideoPairManifest(batch=True)
    if clips is not None:
        return clips
    decoder = getattr(getattr(source, "transform", None), "decoder", "pil")
    return None if decoder == "pil" else decoder
