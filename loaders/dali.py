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
one); PIL is the CPU path.
"""

import ctypes
import functools
import logging
import os
import threading
from dataclasses import dataclass

import numpy as np

from .images import BadSample, decode_image, regular_file
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


def _pipeline(kind: str, device: str):
    """(pipeline, lock) for `kind` ("video" | "image") on `device` ("cpu" | "mixed")."""
    device_id = _device_id(device)
    key = (os.getpid(), kind, device, device_id)
    with _pipelines_lock:
        if key not in _pipelines:
            build = _video_pipeline if kind == "video" else _image_pipeline
            pipe = build(device, device_id)
            pipe.build()
            _pipelines[key] = (pipe, threading.Lock())
        return _pipelines[key]


def _drop_pipeline(kind: str, device: str) -> None:
    """A pipeline that raised may hold half-done state: the next call builds a fresh one."""
    with _pipelines_lock:
        _pipelines.pop((os.getpid(), kind, device, _device_id(device)), None)


def _video_pipeline(device: str, device_id: int | None):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(
        batch_size=MAX_BATCH,
        num_threads=min(4, os.cpu_count() or 1),
        device_id=device_id,
        prefetch_queue_depth=1,
    )
    def video():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        resized = fn.external_source(name="resized", dtype=types.FLOAT, ndim=1)
        start = fn.external_source(name="start", dtype=types.INT32, ndim=1)
        shape = fn.external_source(name="shape", dtype=types.INT32, ndim=1)
        # pad_mode="none": an index past the end is an error, never a silently padded frame.
        clip = fn.decoders.video(encoded, device=device, frames=frames, pad_mode="none")
        clip = fn.resize(clip, size=resized, antialias=True, interp_type=types.INTERP_LINEAR)
        return fn.slice(clip, start=start, shape=shape, axis_names="HW")

    return video()


def _image_pipeline(device: str, device_id: int | None):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(
        batch_size=MAX_BATCH,
        num_threads=min(4, os.cpu_count() or 1),
        device_id=device_id,
        prefetch_queue_depth=1,
    )
    def image():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        return fn.decoders.image(encoded, device=device, output_type=types.RGB)

    return image()


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


def _log_fallback(path: str, reason: str) -> None:
    # Once per reason at warning level (a data set has thousands of clips), at most 100 reasons.
    if reason not in _logged_fallbacks and len(_logged_fallbacks) < 100:
        _logged_fallbacks.add(reason)
        logger.warning("decoding with PyAV: %s (first: %s)", reason, path)
    else:
        logger.debug("decoding %s with PyAV: %s", path, reason)


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


def _decode_dali(clips: list[tuple[ClipInfo, ClipPlan]], device: str) -> list[np.ndarray]:
    inputs = {"encoded": [], "frames": [], "resized": [], "start": [], "shape": []}
    for info, plan in clips:
        inputs["encoded"].append(_read_bytes(info.path))
        inputs["frames"].append(np.asarray(plan.frame_indices, dtype=np.int32))
        inputs["resized"].append(np.asarray(plan.resized, dtype=np.float32))
        inputs["start"].append(np.asarray((plan.top, plan.left), dtype=np.int32))
        inputs["shape"].append(np.asarray(plan.size, dtype=np.int32))
    outputs = _run("video", device, inputs)
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
            _log_fallback(names[0], f"DALI image decode failed: {_dali_error(error)}")
    return [_decode_pil(blob, name) for blob, name in zip(blobs, names, strict=True)], "pil"


def _decode_pil(blob: bytes, name: str) -> np.ndarray:
    # RGB, upright by EXIF orientation as nvJPEG (adjust_orientation=True). Alpha: PIL composites
    # it on white, DALI drops it; pair images with transparency differ between the two paths.
    return np.asarray(decode_image(blob, ref=name), dtype=np.uint8)
