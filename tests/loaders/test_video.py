"""Video pairs: frame sampling (stride, fps, start, count), shared decisions for winner and loser,
resize/crop, bad clips, and the JSONL manifest. Clips are written with PyAV in tmp_path; frame i
is a solid grey of level `level(i)`, so a decoded frame's mean says which frame it was."""

import dataclasses
import json
import math

import numpy as np
import pytest

from vipo.loaders.images import SkipBadSamples, SourceError
from vipo.loaders.video import (
    BadSample,
    FrameSampling,
    cover_and_center,
    decode_pyav,
    plan_pair,
    probe,
)
from vipo.loaders.video_manifest import VideoPairManifest

av = pytest.importorskip("av", reason="PyAV (vipo[video]) is not installed")

TOLERANCE = 6  # grey levels: codec error on a solid frame
H264 = "libx264" if "libx264" in av.codecs_available else "mpeg4"


def level(i: int) -> int:
    return 10 + 11 * i  # frames 0..21 stay below 255 and 11 levels apart


def write_clip(path, num_frames, codec="libvpx-vp9", fps=10, width=32, height=24, frames=None, options=None):
    """A clip of solid grey frames (or the given HxWx3 uint8 frames); returns its path."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            image = frames[i] if frames is not None else np.full((height, width, 3), level(i), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_levels(frames: np.ndarray) -> np.ndarray:
    return frames.reshape(frames.shape[0], -1).mean(axis=1)


def assert_frames_are(frames: np.ndarray, indices) -> None:
    got, want = frame_levels(frames), np.array([level(i) for i in indices], dtype=float)
    bad = np.flatnonzero(np.abs(got - want) > TOLERANCE)
    assert bad.size == 0, (
        f"{bad.size} frames off; first at output {bad[0]}: level {got[bad[0]]:.1f}, want {want[bad[0]]}"
    )


def decode(path, sampling, size=(24, 32), rng=None):
    info = probe(path)
    plan, _ = plan_pair(info, info, sampling, size, rng)
    return plan, decode_pyav(info, plan)


def test_probe_counts_frames_and_timestamps_of_webm_and_mp4(tmp_path):
    for name, codec in (("a.webm", "libvpx-vp9"), ("a.mp4", H264)):
        info = probe(write_clip(tmp_path / name, 12, codec, fps=8))
        assert info.num_frames == 12 and (info.height, info.width) == (24, 32)
        np.testing.assert_allclose(info.timestamps, np.arange(12) / 8, atol=1e-3)
        assert info.duration == pytest.approx(1.5, abs=1e-3)


def test_stride_takes_every_kth_frame_from_the_first(tmp_path):
    plan, frames = decode(write_clip(tmp_path / "a.webm", 16), FrameSampling(5, stride=3))
    assert plan.frame_indices == (0, 3, 6, 9, 12)
    assert frames.shape == (5, 24, 32, 3) and frames.dtype == np.uint8
    assert_frames_are(frames, [0, 3, 6, 9, 12])


def test_center_start_takes_the_middle_window_and_seeking_matches_decoding_from_the_start(tmp_path):
    # 20 frames, 5 at stride 2 span 9: 12 valid starts, the middle one is 5. With keyframes every
    # few frames the decoder seeks to the one before frame 5 and places frames by their timestamps.
    path = write_clip(tmp_path / "a.mp4", 20, H264, options={"g": "4"})
    plan, frames = decode(path, FrameSampling(5, stride=2, start="center"))
    assert plan.frame_indices == (5, 7, 9, 11, 13)
    assert_frames_are(frames, plan.frame_indices)
    sequential = dataclasses.replace(probe(path), pts=None)  # no timestamps: decode from frame 0
    np.testing.assert_array_equal(decode_pyav(sequential, plan), frames)


def test_fps_resamples_by_timestamps_so_both_clips_cover_the_same_time(tmp_path):
    fast = probe(write_clip(tmp_path / "fast.webm", 20, fps=20))
    slow = probe(write_clip(tmp_path / "slow.webm", 20, fps=10))
    plans = plan_pair(fast, slow, FrameSampling(4, fps=5), (24, 32))
    assert plans[0].frame_indices == (0, 4, 8, 12)  # 0, 0.2, 0.4, 0.6 s at 20 fps
    assert plans[1].frame_indices == (0, 2, 4, 6)  # the same times at 10 fps
    assert_frames_are(decode_pyav(slow, plans[1]), [0, 2, 4, 6])
    # A rate that is no multiple of the clip's: each output time shows the frame on screen then.
    plan = plan_pair(slow, slow, FrameSampling(5, fps=3), (24, 32))[0]
    assert plan.frame_indices == tuple(math.floor(k / 3 * 10 + 1e-9) for k in range(5))  # 0, 3, 6, 10, 13


def test_fps_window_longer_than_the_clip_is_too_short(tmp_path):
    info = probe(write_clip(tmp_path / "a.webm", 16, fps=10))  # 1.6 s
    FrameSampling(8, fps=5).indices(info)  # last sample at 1.4 s: fits
    with pytest.raises(BadSample, match="too short"):
        FrameSampling(9, fps=5).indices(info)  # last sample at 1.6 s: past the clip


def test_random_start_is_one_seeded_draw_per_pair_placed_within_each_clip(tmp_path):
    long = probe(write_clip(tmp_path / "long.webm", 21))
    short = probe(write_clip(tmp_path / "short.webm", 12))
    sampling = FrameSampling(3, start="random")
    firsts = []
    for seed in range(12):
        w, s = plan_pair(long, short, sampling, (24, 32), np.random.default_rng(seed))
        assert (w, s) == plan_pair(long, short, sampling, (24, 32), np.random.default_rng(seed))
        # One u in [0, 1) for the pair: floor(u * 19) and floor(u * 10) valid starts.
        fw, fl = w.frame_indices[0], s.frame_indices[0]
        assert max(fw / 19, fl / 10) < min((fw + 1) / 19, (fl + 1) / 10), (seed, fw, fl)
        assert w.frame_indices == (fw, fw + 1, fw + 2) and s.frame_indices == (fl, fl + 1, fl + 2)
        twin = plan_pair(long, long, sampling, (24, 32), np.random.default_rng(seed))
        assert twin[0] == twin[1]  # equal clips: identical frames
        firsts.append(fw)
    assert len(set(firsts)) > 3
    with pytest.raises(ValueError, match="seeded numpy Generator"):
        plan_pair(long, short, sampling, (24, 32), None)


def test_winner_and_loser_get_the_same_frame_count_and_output_size(tmp_path):
    winner = probe(write_clip(tmp_path / "w.webm", 10, width=32, height=24))
    loser = probe(write_clip(tmp_path / "l.mp4", 14, H264, width=48, height=48))
    for size, shape in (((16, 20), (16, 20)), (None, (24, 32))):
        plans = plan_pair(winner, loser, FrameSampling(5, stride=2), size)
        frames = [decode_pyav(info, plan) for info, plan in zip((winner, loser), plans, strict=True)]
        assert frames[0].shape == frames[1].shape == (5, *shape, 3)
        assert plans[0].frame_indices == plans[1].frame_indices == (0, 2, 4, 6, 8)
        assert_frames_are(frames[1], (0, 2, 4, 6, 8))


def test_cover_and_center_keeps_the_aspect_and_crops_the_middle():
    assert cover_and_center((1080, 1920), (720, 1280)) == ((720, 1280), 0, 0)
    assert cover_and_center((720, 1280), (960, 960)) == ((960, 1707), 0, 373)
    assert cover_and_center((1920, 1080), (720, 1280)) == ((2276, 1280), 778, 0)
    assert cover_and_center((24, 32), (24, 24)) == ((24, 32), 0, 4)


def test_center_crop_takes_the_middle_columns(tmp_path):
    # Column x is grey 7 * x: a crop from 32 to 24 columns starting at column 4 shows 28 .. 189.
    columns = np.repeat((7 * np.arange(32)).astype(np.uint8)[None, :, None], 3, axis=2)
    frames = [np.repeat(columns, 24, axis=0)] * 3
    _, decoded = decode(write_clip(tmp_path / "a.webm", 3, frames=frames), FrameSampling(1), size=(24, 24))
    profile = decoded[0].astype(float).mean(axis=(0, 2))
    np.testing.assert_allclose(profile[2:-2], 7 * np.arange(6, 26), atol=TOLERANCE)


def test_num_frames_must_be_1_plus_4k_when_wan_needs_it():
    with pytest.raises(ValueError, match=r"num_frames=16 is not 1 \+ 4k.*use 13 or 17"):
        FrameSampling(16, frame_chunk=4)
    assert FrameSampling(17, frame_chunk=4).num_frames == 17
    assert FrameSampling(16).num_frames == 16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stride": 2, "fps": 5.0}, "not both"),
        ({"stride": 0}, "stride must be"),
        ({"fps": 0.0}, "fps must be"),
        ({"start": "end"}, "unknown start policy 'end'"),
        ({"short_clip": "pad"}, "unknown short_clip policy 'pad'"),
        ({"num_frames": 0}, "num_frames must be"),
    ],
)
def test_sampling_rejects_bad_values_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FrameSampling(**{"num_frames": 4, **kwargs})


def test_too_short_clip_is_a_bad_sample_unless_looping_is_asked(tmp_path):
    path = write_clip(tmp_path / "a.webm", 6)
    with pytest.raises(BadSample, match=r"a\.webm: too short: 6 frames, 5 at stride 2 need 9"):
        decode(path, FrameSampling(5, stride=2))
    plan, frames = decode(path, FrameSampling(5, stride=2, short_clip="loop"))
    assert plan.frame_indices == (0, 2, 4, 0, 2)
    assert_frames_are(frames, [0, 2, 4, 0, 2])


def test_corrupt_and_missing_files_are_bad_samples_naming_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(BadSample, match="corrupt.mp4: cannot read the container"):
        probe(corrupt)
    with pytest.raises(BadSample, match="missing.webm: clip file not found"):
        probe(tmp_path / "missing.webm")


# --- the manifest ---


def write_manifest(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_manifest_yields_pair_records_decoded_with_the_same_decisions(tmp_path):
    (tmp_path / "clips").mkdir()
    write_clip(tmp_path / "clips/w.webm", 12, width=32, height=24)
    write_clip(tmp_path / "clips/l.mp4", 12, H264, width=24, height=24)
    path = write_manifest(
        tmp_path,
        [
            {
                "prompt": "a cat",
                "winner": "clips/w.webm",
                "loser": "clips/l.mp4",
                "category": "motion",
                "id": "p0",
            },
            "",
            {"prompt": "a dog", "winner": "clips/l.mp4", "loser": "clips/w.webm"},
        ],
    )
    pairs = VideoPairManifest(
        path, FrameSampling(5, stride=2, start="random"), size=(16, 16), backend="pyav", seed=3
    )
    assert len(pairs) == 2 and pairs.vocabulary() is None
    first, second = pairs[0], pairs[1]
    assert (first.id, first.prompt, first.category) == ("p0", "a cat", "motion")
    assert (second.prompt, second.category) == ("a dog", "")
    assert second.id == VideoPairManifest(path, FrameSampling(1)).entries[1]["id"]  # stable without an id
    for record in (first, second):
        assert record.winner.shape == record.loser.shape == (5, 16, 16, 3)
        assert record.winner.dtype == np.uint8
        # Same length clips and one draw per pair: the same frames in both.
        np.testing.assert_allclose(frame_levels(record.winner), frame_levels(record.loser), atol=TOLERANCE)
    np.testing.assert_array_equal(pairs[0].winner, first.winner)  # a pure function of (seed, epoch, id)
    starts = set()
    for epoch in range(6):
        pairs.set_epoch(epoch)
        starts.add(round(frame_levels(pairs[0].winner)[0]))
    assert len(starts) > 1  # another epoch, another window
    assert pairs.stats() == {
        "skipped_missing": 0,
        "skipped_corrupt": 0,
        "skipped_short": 0,
        "skipped_not_a_file": 0,
        "pairs": 9,
        "fallbacks": 0,
        "clips_pyav": 18,
    }


def test_manifest_counts_and_raises_a_corrupt_clip(tmp_path):
    write_clip(tmp_path / "good.webm", 8)
    (tmp_path / "bad.mp4").write_bytes(np.random.default_rng(1).bytes(2048))
    path = write_manifest(
        tmp_path,
        [
            {"prompt": "p", "winner": "good.webm", "loser": "bad.mp4"},
            {"prompt": "q", "winner": "good.webm", "loser": "x/missing.mkv"},
        ],
    )
    pairs = VideoPairManifest(path, FrameSampling(4), size=(8, 8), backend="pyav")
    with pytest.raises(BadSample, match="bad.mp4"):
        pairs[0]
    with pytest.raises(BadSample, match="missing.mkv: clip file not found"):
        pairs[1]
    stats = pairs.stats()
    assert (stats["skipped_corrupt"], stats["skipped_missing"], stats["pairs"]) == (1, 1, 0)
    # SkipBadSamples (loaders/images.py) steps over them: index 0 -> 1 -> 2, the good pair.
    write_clip(tmp_path / "other.webm", 8)
    path = write_manifest(
        tmp_path,
        [
            {"prompt": "p", "winner": "good.webm", "loser": "bad.mp4"},
            {"prompt": "q", "winner": "good.webm", "loser": "other.webm"},
        ],
        "b.jsonl",
    )
    skipping = SkipBadSamples(VideoPairManifest(path, FrameSampling(6), size=(8, 8), backend="pyav"))
    assert skipping[0].prompt == "q" and skipping.stats()["skipped_corrupt"] == 1


def test_too_short_clip_in_the_manifest_is_counted_as_short(tmp_path):
    write_clip(tmp_path / "a.webm", 8)
    write_clip(tmp_path / "b.webm", 3)
    path = write_manifest(tmp_path, [{"prompt": "p", "winner": "a.webm", "loser": "b.webm"}])
    pairs = VideoPairManifest(path, FrameSampling(5), backend="pyav")
    with pytest.raises(BadSample, match="b.webm: too short: 3 frames"):
        pairs[0]
    assert pairs.stats()["skipped_short"] == 1


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "p", "winner": "a.mp4", "loser": "b.mp4"', r"pairs\.jsonl:2: not valid JSON"),
        ('["a.mp4", "b.mp4"]', r"pairs\.jsonl:2: expected a JSON object"),
        ('{"prompt": "p", "winner": "a.mp4"}', r"pairs\.jsonl:2: missing or empty string field 'loser'"),
        (
            '{"prompt": "p", "winner": "a.gif", "loser": "b.mp4"}',
            r"pairs\.jsonl:2: winner 'a.gif' is not one of",
        ),
        (
            '{"prompt": "p", "winner": "a.mp4", "loser": "a.mp4"}',
            r"pairs\.jsonl:2: winner and loser are the same",
        ),
    ],
)
def test_manifest_bad_line_names_the_file_and_line(tmp_path, line, message):
    path = write_manifest(tmp_path, [{"prompt": "p", "winner": "a.webm", "loser": "b.mkv"}, line])
    with pytest.raises(SourceError, match=message):
        VideoPairManifest(path, FrameSampling(1))


def test_manifest_rejects_an_unknown_backend(tmp_path):
    path = write_manifest(tmp_path, [{"prompt": "p", "winner": "a.webm", "loser": "b.mkv"}])
    with pytest.raises(ValueError, match="unknown video backend 'ffmpeg'"):
        VideoPairManifest(path, FrameSampling(1), backend="ffmpeg")


def test_video_buckets_give_each_pair_its_aspect_and_batches_one_bucket(tmp_path):
    from vipo.loaders.buckets import BucketBatchSampler, Buckets

    lines = []
    for i, (width, height) in enumerate([(64, 36), (48, 48), (64, 36), (48, 48)]):
        write_clip(tmp_path / f"w{i}.webm", 6, width=width, height=height)
        write_clip(tmp_path / f"l{i}.webm", 6, width=width, height=height)
        lines.append(json.dumps({"prompt": f"p{i}", "winner": f"w{i}.webm", "loser": f"l{i}.webm"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    buckets = Buckets([(32, 18), (24, 24)])  # 16:9 and 1:1, (width, height)
    pairs = VideoPairManifest(tmp_path / "pairs.jsonl", FrameSampling(5), buckets=buckets, backend="pyav")
    assert pairs.image_sizes() == [(64, 36), (48, 48), (64, 36), (48, 48)]
    assert pairs[0].winner.shape == pairs[0].loser.shape == (5, 18, 32, 3)
    assert pairs[1].winner.shape == (5, 24, 24, 3)
    sampler = BucketBatchSampler(buckets.assign(pairs.image_sizes()), 2, seed=0)
    for _ in range(4):
        shapes = {pairs[i].winner.shape for i in sampler.next_batch()}
        assert len(shapes) == 1
    with pytest.raises(ValueError, match="size= or buckets="):
        VideoPairManifest(tmp_path / "pairs.jsonl", FrameSampling(5), size=(8, 8), buckets=buckets)
