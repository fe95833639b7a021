"""The DALI module: CPU video decode of VP9 matches PyAV, codecs DALI's device cannot do fall back
to PyAV with the reason, DALI failures recover, the image path (nvJPEG on GPU, DALI-CPU / PIL here)
and the device probes. GPU tests (NVDEC, nvJPEG) run only where CUDA is."""

import importlib.util
import io
import logging

import numpy as np
import pytest
from PIL import Image

from vipo.loaders import dali
from vipo.loaders.video import BadSample, FrameSampling, decode_pyav, plan_pair, probe

av = pytest.importorskip("av", reason="PyAV (vipo[video]) is not installed")

H264 = "libx264" if "libx264" in av.codecs_available else "mpeg4"


def needs_dali():
    pytest.importorskip("nvidia.dali", reason="nvidia.dali does not import on this machine")


def moving_square(i: int, height=24, width=32) -> np.ndarray:
    """Frame i: grey 10 + 11 i with a white 8x8 square at column 2 i (content for resize/crop)."""
    image = np.full((height, width, 3), 10 + 11 * i, np.uint8)
    image[8:16, 2 * i : 2 * i + 8] = 255
    return image


def write_clip(path, num_frames, codec="libvpx-vp9", fps=10, height=24, width=32):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(moving_square(i, height, width), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def dali_log():
    handler, logger = Records(), logging.getLogger("vipo.loaders.dali")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)  # setLevel, not the attribute: it clears isEnabledFor's cache
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(level)


def assert_close_frames(got: np.ndarray, want: np.ndarray, mean_tol: float, max_mean_abs: float) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype == np.uint8
    per_frame = np.abs(got.astype(float) - want).reshape(got.shape[0], -1)
    worst = int(per_frame.mean(axis=1).argmax())
    assert per_frame.mean() <= max_mean_abs, (
        f"mean |diff| {per_frame.mean():.2f} > {max_mean_abs}; worst frame {worst}: "
        f"{per_frame[worst].mean():.2f}, max {per_frame.max():.0f}"
    )
    level_gap = np.abs(got.reshape(got.shape[0], -1).mean(1) - want.reshape(want.shape[0], -1).mean(1))
    assert level_gap.max() <= mean_tol, f"frame mean differs by {level_gap.max():.2f} at {level_gap.argmax()}"


@pytest.mark.parametrize("size", [(24, 32), (16, 16), (12, 20), (36, 48)])
def test_dali_cpu_decodes_vp9_like_pyav_with_the_same_frames_and_crop(tmp_path, size):
    needs_dali()
    info = probe(write_clip(tmp_path / "a.webm", 16))
    plan, _ = plan_pair(info, info, FrameSampling(5, stride=3, start="center"), size)
    (clip,) = dali.decode_clips([(info, plan)], backend="dali", device="cpu")
    assert clip.backend == "dali-cpu" and clip.reason == ""
    assert clip.frames.shape == (5, *size, 3)
    # Measured: bit-exact without resizing; resized, mean |diff| 0.16 and frame means within 0.5.
    assert_close_frames(clip.frames, decode_pyav(info, plan), mean_tol=1, max_mean_abs=0.5)
    if size == (24, 32):
        np.testing.assert_array_equal(clip.frames, decode_pyav(info, plan))


def test_dali_decodes_a_pair_in_one_batch_and_keeps_the_order(tmp_path):
    needs_dali()
    first = probe(write_clip(tmp_path / "a.webm", 12))
    second = probe(write_clip(tmp_path / "b.webm", 16, codec="libvpx", height=32, width=32))  # VP8
    plans = plan_pair(first, second, FrameSampling(3, stride=4, start="center"), (16, 16))
    clips = dali.decode_clips(list(zip((first, second), plans, strict=True)), backend="auto", device="cpu")
    assert [c.backend for c in clips] == ["dali-cpu", "dali-cpu"]
    assert plans[0].frame_indices == (1, 5, 9) and plans[1].frame_indices == (3, 7, 11)
    for (info, plan), clip in zip(zip((first, second), plans, strict=True), clips, strict=True):
        assert_close_frames(clip.frames, decode_pyav(info, plan), mean_tol=2, max_mean_abs=4)


def test_h264_on_the_dali_cpu_device_falls_back_to_pyav_and_logs_why(tmp_path, dali_log):
    needs_dali()
    webm = probe(write_clip(tmp_path / "w.webm", 10))
    mp4 = probe(write_clip(tmp_path / "l.mp4", 10, codec=H264))
    plans = plan_pair(webm, mp4, FrameSampling(4, stride=2), (16, 16))
    clips = dali.decode_clips([(webm, plans[0]), (mp4, plans[1])], backend="auto", device="cpu")
    assert [c.backend for c in clips] == ["dali-cpu", "pyav"]
    assert clips[1].reason.startswith(f"DALI's cpu video decoder cannot decode {mp4.codec}")
    assert any(mp4.codec in m and "l.mp4" in m for m in dali_log), dali_log
    np.testing.assert_array_equal(clips[1].frames, decode_pyav(mp4, plans[1]))
    assert_close_frames(clips[0].frames, clips[1].frames, mean_tol=6, max_mean_abs=8)


def test_backend_pyav_never_calls_dali(tmp_path, monkeypatch):
    info = probe(write_clip(tmp_path / "a.webm", 6))
    plan, _ = plan_pair(info, info, FrameSampling(2), (8, 8))

    def refuse(*args):
        raise AssertionError("DALI was called")

    monkeypatch.setattr(dali, "_decode_dali", refuse)
    (clip,) = dali.decode_clips([(info, plan)], backend="pyav")
    assert clip.backend == "pyav" and clip.reason == ""


def test_a_clip_dali_cannot_decode_goes_to_pyav_which_names_it_and_dali_keeps_working(tmp_path, dali_log):
    needs_dali()
    path = write_clip(tmp_path / "a.webm", 8)
    info = probe(path)
    plan, _ = plan_pair(info, info, FrameSampling(2), (8, 8))
    good = dali.decode_clips([(info, plan)], device="cpu")[0].frames
    path.write_bytes(np.random.default_rng(0).bytes(3000))  # corrupted after probing
    with pytest.raises(BadSample, match="a.webm: cannot decode"):
        dali.decode_clips([(info, plan)], device="cpu")
    assert any("DALI failed: Assert" in m and "a.webm" in m for m in dali_log), dali_log
    write_clip(path, 8)
    (again,) = dali.decode_clips([(info, plan)], device="cpu")
    assert again.backend == "dali-cpu"
    np.testing.assert_array_equal(again.frames, good)


def test_backend_choice_follows_the_codec_tables():
    needs_dali()
    assert dali.choose_video_backend("vp9", "auto", "cpu") == ("dali-cpu", "")
    assert dali.choose_video_backend("mjpeg", "dali", "cpu") == ("dali-cpu", "")
    for codec in ("h264", "hevc", "av1", "mpeg4"):
        assert dali.choose_video_backend(codec, "dali", "cpu")[0] == "pyav"
        assert dali.choose_video_backend(codec, "auto", "mixed") == ("dali-mixed", "")
    assert dali.choose_video_backend("prores", "auto", "mixed")[0] == "pyav"
    with pytest.raises(ValueError, match="unknown video backend 'nvdec'"):
        dali.choose_video_backend("vp9", "nvdec")
    with pytest.raises(ValueError, match="unknown DALI device 'gpu'"):
        dali.choose_video_backend("vp9", "auto", "gpu")


def test_probes_answer_without_a_gpu():
    assert dali.dali_available() == (importlib.util.find_spec("nvidia.dali") is not None)
    if not dali.cuda_available():
        assert dali.nvdec_available() is False
        assert dali.video_device("auto") == "cpu"
        assert dali.image_device("auto") == "pil"
        # Left to itself without NVDEC, auto decodes with PyAV (faster than DALI's CPU decoder here).
        assert dali.choose_video_backend("vp9", "auto", "auto") == ("pyav", "")


def jpeg_bytes(image: np.ndarray, quality=95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_dali_image_pipeline_matches_pil(tmp_path):
    needs_dali()
    rng = np.random.default_rng(0)
    images = [
        moving_square(3, 40, 56),
        np.repeat(rng.integers(0, 255, (30, 20, 1), np.uint8), 3, axis=2),
        moving_square(9),
    ]
    blobs = [jpeg_bytes(image) for image in images]
    decoded, backend = dali.decode_images(blobs, backend="dali", device="cpu")
    reference, pil = dali.decode_images(blobs, backend="pil")
    assert (backend, pil) == ("dali-cpu", "pil")
    for got, want in zip(decoded, reference, strict=True):
        assert got.shape == want.shape and got.dtype == np.uint8
        assert np.abs(got.astype(int) - want).mean() < 2


def test_a_corrupt_image_is_a_bad_sample_naming_it():
    blobs = [jpeg_bytes(moving_square(0)), b"not a jpeg at all"]
    with pytest.raises(BadSample, match="b.jpg: cannot decode image"):
        dali.decode_images(blobs, ["a.jpg", "b.jpg"], backend="pil")
    if dali.dali_available():  # DALI fails the batch; PIL then names the bad image
        with pytest.raises(BadSample, match="b.jpg: cannot decode image"):
            dali.decode_images(blobs, ["a.jpg", "b.jpg"], backend="dali", device="cpu")


@pytest.mark.gpu
def test_nvdec_decodes_h264_like_pyav(tmp_path):
    needs_dali()
    if not dali.nvdec_available():
        pytest.skip("libnvcuvid.so.1 (NVDEC) is not loadable on this machine")
    info = probe(write_clip(tmp_path / "a.mp4", 16, codec=H264))
    plan, _ = plan_pair(info, info, FrameSampling(5, stride=3, start="center"), (16, 16))
    (clip,) = dali.decode_clips([(info, plan)], backend="dali", device="mixed")
    assert clip.backend == "dali-mixed"
    assert_close_frames(clip.frames, decode_pyav(info, plan), mean_tol=3, max_mean_abs=6)


@pytest.mark.gpu
def test_nvjpeg_decodes_like_pil():
    needs_dali()
    blobs = [jpeg_bytes(moving_square(4)), jpeg_bytes(moving_square(7, 40, 56))]
    decoded, backend = dali.decode_images(blobs, backend="auto")
    assert backend == "dali-mixed"
    for got, want in zip(decoded, dali.decode_images(blobs, backend="pil")[0], strict=True):
        assert got.shape == want.shape and np.abs(got.astype(int) - want).mean() < 2


def test_manifest_with_backend_auto_decodes_vp9_with_dali_and_h264_with_pyav(tmp_path):
    needs_dali()
    from vipo.loaders.video_manifest import VideoPairManifest

    write_clip(tmp_path / "w.webm", 10)
    write_clip(tmp_path / "l.mp4", 10, codec=H264)
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "p", "winner": "w.webm", "loser": "l.mp4"}\n')
    pairs = VideoPairManifest(
        tmp_path / "pairs.jsonl", FrameSampling(5, stride=2), size=(16, 16), device="cpu"
    )
    record = pairs[0]
    assert record.winner.shape == record.loser.shape == (5, 16, 16, 3)
    assert_close_frames(record.winner, record.loser, mean_tol=6, max_mean_abs=8)
    stats = pairs.stats()
    assert (stats["clips_dali-cpu"], stats["clips_pyav"], stats["fallbacks"]) == (1, 1, 1)
