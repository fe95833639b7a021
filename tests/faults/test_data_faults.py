"""Bad data ends in one clear line or a counted, logged skip: never a traceback, a hang or a
silently wrong batch. One case per fault the fault-injection campaign found, and the ones a sweep
of our own found next to them."""

import io
import json
import logging
import os
import struct
import subprocess
import sys
import tarfile
import threading
import zlib
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vipo.engine.config import load_config
from vipo.engine.data import BatchStream, build_source
from vipo.engine.errors import RunError
from vipo.engine.eval.data_stats import collect
from vipo.loaders import dali
from vipo.loaders.images import BadSample, PairTransform, SourceError, decode_image
from vipo.loaders.manifest import ManifestPairs, read_manifest
from vipo.loaders.pickapic import PickapicPairs
from vipo.loaders.shards import ShardPairs
from vipo.loaders.video import ClipInfo, ClipPlan, FrameSampling, decode_pyav, probe
from vipo.loaders.video_manifest import VideoPairManifest

VIPO = Path(sys.executable).with_name("vipo")
CLI_ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRITON_INTERPRET": "1",
    "DS_ACCELERATOR": "cpu",
}
DEADLINE_S = 20  # a blocked open() of a FIFO never returns: fail after this instead of hanging


# ---------------------------------------------------------------------------------------------
# Helpers


def png(path, value=128, size=16):
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path.name


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def pair(winner, loser, prompt="a fox", **extra):
    return {"prompt": prompt, "winner": winner, "loser": loser, **extra}


def good_pairs(folder, count):
    """`count` pairs of real 16x16 images in `folder`."""
    return [
        pair(png(folder / f"w{i}.png", 200), png(folder / f"l{i}.png", 50), f"p{i}") for i in range(count)
    ]


def finishes(call, seconds=DEADLINE_S):
    """call() in a daemon thread: its result, or its exception re-raised; a test failure if it
    is still running after `seconds` (a daemon thread stuck in open() does not block exit)."""
    outcome = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as err:  # noqa: B036 -- handed to the test's thread
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: blocked on a FIFO or looping forever"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def vipo(*args, timeout=120):
    """`vipo ARGS` in a subprocess: (exit status, stdout, stderr)."""
    done = subprocess.run(
        [str(VIPO), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=CLI_ENV
    )
    return done.returncode, done.stdout, done.stderr


def assert_one_line_error(code, stderr, *named):
    assert code == 1, stderr
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("vipo: error: "), last
    for text in named:
        assert str(text) in last, f"{text!r} not in {last!r}"


def recipe(folder, path, source="manifest", *lines):
    text = f"data:\n  source: {source}\n  path: {path}\n  resolution: 16\n" + "".join(
        f"  {line}\n" for line in lines
    )
    text += f"train:\n  batch_pairs: 2\n  max_steps: 1\n  output_dir: {folder / 'run'}\n"
    return write_lines(folder / "run.yaml", [text.rstrip("\n")])


def config(*overrides):
    return load_config(None, list(overrides))


def write_clip(path, frames=8):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        container.start_encoding()
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((24, 32, 3), 20 * k, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path.name


# ---------------------------------------------------------------------------------------------
# 1. 16-bit images are scaled to 8 bits, not clipped to white


def png_16(array):
    """A 16-bit PNG of a uint16 array: HxW grey, HxWx3 RGB or HxWx4 RGBA (PIL cannot write 16-bit
    colour PNGs, so the chunks are written here)."""
    data = np.asarray(array, dtype=">u2")
    height, width = data.shape[:2]
    color_type = {2: 0, 3: 2, 4: 6}[data.ndim if data.ndim == 2 else data.shape[2]]

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    raw = b"".join(b"\0" + data[y].tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def grey_16(mode):
    """(encoded 16-bit grey gradient in PIL `mode`, the gradient scaled to 8 bits)."""
    gradient = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)
    buffer = io.BytesIO()
    if mode == "PNG I;16":
        Image.fromarray(gradient).save(buffer, format="PNG")
    elif mode == "TIFF I;16B":
        Image.frombytes("I;16B", (16, 16), gradient.astype(">u2").tobytes()).save(buffer, format="TIFF")
    else:  # "TIFF I": 32-bit integer pixels holding 16-bit values
        Image.fromarray(gradient.astype(np.int32), mode="I").save(buffer, format="TIFF")
    return buffer.getvalue(), np.round(gradient.astype(np.float64) * 255 / 65535).astype(np.uint8)


@pytest.mark.parametrize("mode", ["PNG I;16", "TIFF I;16B", "TIFF I"])
def test_a_16_bit_grey_image_decodes_like_its_8_bit_version_from_bytes_and_file(tmp_path, mode):
    data, expected = grey_16(mode)
    assert Image.open(io.BytesIO(data)).mode == mode.split()[1]  # the mode PIL clips instead of scaling
    eight_bit = io.BytesIO()
    Image.fromarray(expected, "L").save(eight_bit, format="PNG")
    (tmp_path / "x16").write_bytes(data)
    for source in (data, tmp_path / "x16"):
        decoded = np.asarray(decode_image(source)).astype(int)
        assert decoded.shape == (16, 16, 3)
        reference = np.asarray(decode_image(eight_bit.getvalue())).astype(int)
        assert np.abs(decoded - reference).max() <= 1, (
            f"{mode}: max error {np.abs(decoded - reference).max()}"
        )


@pytest.mark.parametrize("channels", [3, 4])
def test_a_16_bit_colour_png_decodes_within_one_level_of_its_8_bit_values(channels):
    gradient = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)
    array = np.stack(
        [gradient, gradient[::-1], gradient.T, np.full_like(gradient, 65535)][:channels], axis=-1
    )
    decoded = np.asarray(decode_image(png_16(array))).astype(int)
    expected = np.round(array[..., :3].astype(np.float64) * 255 / 65535)
    assert np.abs(decoded - expected).max() <= 1


# ---------------------------------------------------------------------------------------------
# 2. Manifest entries stay inside the manifest's folder unless data.allow_outside_root


@pytest.fixture
def outside(tmp_path):
    """A manifest folder `set/` holding one image and symlinks, and images outside it."""
    folder = tmp_path / "set"
    (folder / "img").mkdir(parents=True)
    png(folder / "img" / "in.png")
    png(tmp_path / "secret.png")
    write_clip(tmp_path / "secret.webm")
    os.symlink(tmp_path / "secret.png", folder / "link.png")
    os.symlink(tmp_path / "secret.webm", folder / "link.webm")
    os.symlink(tmp_path, folder / "up")  # a folder link: up/secret.png leads out
    os.symlink(folder / "img" / "in.png", folder / "inside.png")
    return tmp_path


ESCAPES = {
    "dot-dot": ("../secret.png", "its '..' leads out"),
    "absolute": ("{root}/secret.png", "an absolute path elsewhere"),
    "symlink": ("link.png", "through a symlink it is {root}/secret.png"),
    "folder symlink": ("up/secret.png", "through a symlink it is {root}/secret.png"),
}


@pytest.mark.parametrize("vector", ESCAPES)
def test_an_image_path_that_leaves_the_manifest_folder_is_refused_naming_line_path_and_switch(
    outside, vector
):
    raw, why = (text.format(root=outside.resolve()) for text in ESCAPES[vector])
    path = write_lines(
        outside / "set" / "pairs.jsonl", [pair("img/in.png", "img/in.png"), pair(raw, "img/in.png")]
    )
    with pytest.raises(SourceError) as caught:
        ManifestPairs(path, PairTransform(16))
    message = str(caught.value)
    assert message.startswith(f"{path}:2: winner path {raw!r} is outside")
    assert why in message and "data.allow_outside_root=true" in message
    # With the switch, today's behaviour: the file outside is read.
    allowed = ManifestPairs(path, PairTransform(16), allow_outside_root=True)
    assert allowed[1].winner.shape == (16, 16, 3)


@pytest.mark.parametrize("vector", ESCAPES)
def test_a_clip_path_that_leaves_the_manifest_folder_is_refused_and_allowed_with_the_switch(outside, vector):
    raw, why = (text.format(root=outside.resolve()).replace(".png", ".webm") for text in ESCAPES[vector])
    write_clip(outside / "set" / "in.webm")
    path = write_lines(outside / "set" / "clips.jsonl", [pair("in.webm", raw)])
    with pytest.raises(SourceError, match=r"clips\.jsonl:1: loser path .* is outside") as caught:
        VideoPairManifest(path, FrameSampling(4), backend="pyav")
    message = str(caught.value)
    assert repr(raw) in message and why in message and "data.allow_outside_root=true" in message
    allowed = VideoPairManifest(path, FrameSampling(4), size=(8, 8), backend="pyav", allow_outside_root=True)
    assert allowed[0].loser.shape == (4, 8, 8, 3)


def test_paths_that_stay_inside_are_accepted_symlinked_or_absolute(outside):
    folder = outside / "set"
    path = write_lines(
        folder / "pairs.jsonl",
        [pair("inside.png", "img/../img/in.png"), pair(str(folder / "img" / "in.png"), "img/in.png")],
    )
    data = ManifestPairs(path, PairTransform(16))
    assert len(data) == 2 and data[0].winner.shape == (16, 16, 3)


def test_the_switch_goes_from_the_config_to_training_and_data_stats(outside):
    path = write_lines(outside / "set" / "pairs.jsonl", [pair("link.png", "img/in.png")] * 2)
    cfg = config("data.source=manifest", f"data.path={path}", "data.resolution=16")
    with pytest.raises(RunError, match=r"pairs\.jsonl:1: winner path 'link\.png' is outside"):
        build_source(cfg.data, cfg.model, seed=0)
    with pytest.raises(RunError, match="data.allow_outside_root=true"):
        collect(cfg.data, cfg.model, progress=False)
    cfg = config(
        "data.source=manifest", f"data.path={path}", "data.resolution=16", "data.allow_outside_root=true"
    )
    assert len(build_source(cfg.data, cfg.model, seed=0)) == 2
    assert collect(cfg.data, cfg.model, progress=False)["pairs"] == 2


def test_the_cli_refuses_an_escaping_entry_in_one_line(outside):
    path = write_lines(outside / "set" / "pairs.jsonl", [pair("../secret.png", "img/in.png")])
    code, _, stderr = vipo("data", "stats", recipe(outside, path), "-q")
    assert_one_line_error(code, stderr, f"{path}:1", "'../secret.png'", "data.allow_outside_root=true")


# ---------------------------------------------------------------------------------------------
# 3. A FIFO (or folder) named like an image or clip is a counted skip, never opened


def test_a_fifo_image_is_skipped_counted_and_logged_when_read_scanned_or_checked(tmp_path, caplog):
    lines = good_pairs(tmp_path, 3)
    os.mkfifo(tmp_path / "x.png")
    (tmp_path / "folder.png").mkdir()
    path = write_lines(
        tmp_path / "pairs.jsonl", [*lines, pair("x.png", "l0.png"), pair("w0.png", "folder.png")]
    )
    data = ManifestPairs(path, PairTransform(16))
    with caplog.at_level(logging.WARNING, logger="vipo.loaders.images"):
        for index, what in ((3, r"x\.png is a named pipe \(FIFO\)"), (4, r"folder\.png is a folder")):
            with pytest.raises(BadSample, match=what) as caught:
                finishes(lambda index=index: data[index])
            assert caught.value.kind == "skipped_not_a_file"
    assert data.stats()["skipped_not_a_file"] == 2
    assert "skipped_not_a_file" in caplog.text and str(tmp_path / "x.png") in caplog.text
    # Bucket header scans and check_files go through the same check.
    sizes = finishes(ManifestPairs(path, PairTransform(16)).image_sizes)
    assert sizes[:3] == [(16, 16)] * 3 and sizes[3] is None
    checked = finishes(lambda: ManifestPairs(path, PairTransform(16), check_files=True))
    assert len(checked) == 3 and checked.stats()["skipped_not_a_file"] == 2


def test_training_batches_step_over_a_fifo_and_count_it(tmp_path):
    os.mkfifo(tmp_path / "x.png")
    path = write_lines(tmp_path / "pairs.jsonl", [*good_pairs(tmp_path, 3), pair("x.png", "l0.png")])
    cfg = config("data.source=manifest", f"data.path={path}", "data.resolution=16")
    stream = BatchStream(build_source(cfg.data, cfg.model, seed=0), 2, seed=0, max_bad_fraction=1.0)
    ids = {record.id for _ in range(4) for record in finishes(stream.next_records)}
    assert len(ids) == 3 and stream.stats()["skipped_not_a_file"] == 1


def test_a_fifo_clip_is_skipped_by_the_probe_the_pyav_decoder_and_the_dali_reader(tmp_path):
    os.mkfifo(tmp_path / "x.webm")
    fifo = str(tmp_path / "x.webm")
    for call in (
        lambda: probe(fifo),
        lambda: dali._read_bytes(fifo),
        lambda: decode_pyav(
            ClipInfo(fifo, "vp9", 32, 24, np.arange(8) / 10, None, 0.1),
            ClipPlan((0, 1), (24, 32), 0, 0, (24, 32)),
        ),
    ):
        with pytest.raises(BadSample, match="named pipe") as caught:
            finishes(call)
        assert caught.value.kind == "skipped_not_a_file"
    write_clip(tmp_path / "a.webm")
    path = write_lines(tmp_path / "clips.jsonl", [pair("a.webm", "x.webm")])
    clips = VideoPairManifest(path, FrameSampling(4), size=(8, 8), backend="pyav")
    with pytest.raises(BadSample):
        finishes(lambda: clips[0])
    assert clips.stats()["skipped_not_a_file"] == 1


def test_vipo_data_stats_finishes_on_a_manifest_with_a_fifo_and_counts_it(tmp_path):
    os.mkfifo(tmp_path / "x.png")
    path = write_lines(tmp_path / "pairs.jsonl", [*good_pairs(tmp_path, 2), pair("x.png", "l0.png")])
    code, stdout, stderr = vipo("data", "stats", recipe(tmp_path, path), "-q", timeout=60)
    assert code == 0 and "Traceback" not in stderr, stderr
    assert "2 usable pairs of 3 rows; 1 with bad files" in stdout and "not_a_file 1" in stdout
    assert f"{tmp_path / 'x.png'} is a named pipe (FIFO)" in stdout


def test_fifo_shards_and_parquet_files_are_refused_naming_them(tmp_path):
    os.mkfifo(tmp_path / "x.tar")
    with pytest.raises(SourceError, match="x.tar is not a regular file"):
        finishes(lambda: ShardPairs(tmp_path, PairTransform(16)))
    os.mkfifo(tmp_path / "x.parquet")
    with pytest.raises(SourceError, match="x.parquet is not a regular file"):
        finishes(lambda: PickapicPairs(tmp_path, PairTransform(16)))


# ---------------------------------------------------------------------------------------------
# 4. Captions and prompts that are not strings


def jpeg(value):
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_pickapic(path, captions):
    """Pick-a-Pic rows, the first preferring image 0, the next image 1, ..., with these captions."""
    count = len(captions)
    table = pa.table(
        {
            "caption": captions,
            "jpg_0": [jpeg(200)] * count,
            "jpg_1": [jpeg(40)] * count,
            "label_0": [float(i % 2 == 0) for i in range(count)],
            "label_1": [float(i % 2 == 1) for i in range(count)],
            "image_0_uid": [f"a{i}" for i in range(count)],
            "image_1_uid": [f"b{i}" for i in range(count)],
            "has_label": [True] * count,
            "are_different": [True] * count,
        }
    )
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize(
    "captions, type_name", [([1, 2], "int64"), ([1.5, 2.5], "double"), ([b"a", b"b"], "binary")]
)
def test_a_pickapic_caption_column_that_is_not_text_is_one_line_naming_file_column_and_type(
    tmp_path, captions, type_name
):
    write_pickapic(tmp_path / "train.parquet", captions)
    with pytest.raises(SourceError) as caught:
        PickapicPairs(tmp_path / "train.parquet", PairTransform(16))
    assert str(caught.value).startswith(f"{tmp_path / 'train.parquet'}: column caption has type {type_name}")
    assert "expected string" in str(caught.value)


def test_vipo_data_stats_and_train_on_integer_captions_end_in_one_line(tmp_path):
    write_pickapic(tmp_path / "train.parquet", [1, 2])
    code, _, stderr = vipo(
        "data", "stats", "--source", "pickapic", "--path", tmp_path / "train.parquet", "-q"
    )
    assert_one_line_error(code, stderr, "train.parquet", "column caption has type int64")
    code, _, stderr = vipo("train", recipe(tmp_path, tmp_path / "train.parquet", "pickapic"), "-q")
    assert_one_line_error(code, stderr, "train.parquet", "column caption has type int64")


@pytest.mark.parametrize("prompt", [7, None, ["a"], {"text": "a"}])
def test_a_manifest_prompt_that_is_not_a_string_names_file_and_line(tmp_path, prompt):
    images = write_lines(tmp_path / "pairs.jsonl", [pair("w.png", "l.png"), pair("w.png", "l.png", prompt)])
    with pytest.raises(
        SourceError, match=rf"pairs\.jsonl:2: 'prompt' must be a string, got {type(prompt).__name__}"
    ):
        read_manifest(images)
    clips = write_lines(
        tmp_path / "clips.jsonl", [pair("w.webm", "l.webm"), pair("w.webm", "l.webm", prompt)]
    )
    with pytest.raises(
        SourceError, match=rf"clips\.jsonl:2: 'prompt' must be a string, got {type(prompt).__name__}"
    ):
        VideoPairManifest(clips, FrameSampling(1))


# ---------------------------------------------------------------------------------------------
# 5. A manifest whose files are all missing ends in one line


def test_vipo_train_on_a_manifest_of_missing_files_ends_in_one_line_naming_a_file(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [pair(f"w{i}.png", f"l{i}.png", f"p{i}") for i in range(4)])
    code, _, stderr = vipo("train", recipe(tmp_path, path), "-q")
    assert_one_line_error(
        code, stderr, "all 4 pairs tried are bad files", "image file not found: ", str(tmp_path)
    )


def test_vipo_data_stats_on_a_manifest_of_missing_files_reports_them_all(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [pair(f"w{i}.png", f"l{i}.png", f"p{i}") for i in range(4)])
    code, stdout, stderr = vipo("data", "stats", recipe(tmp_path, path), "-q")
    assert code == 0 and "Traceback" not in stderr, stderr
    assert "0 usable pairs of 4 rows; 4 with bad files" in stdout and "missing 4" in stdout


@pytest.mark.parametrize("overrides", [[], ["data.prefetch_batches=0"], ["data.buckets=[[16,16]]"]])
def test_a_data_set_of_only_bad_files_stops_with_a_run_error_naming_the_first(tmp_path, overrides):
    (tmp_path / "empty.png").write_bytes(b"")
    path = write_lines(tmp_path / "pairs.jsonl", [pair(f"w{i}.png", "empty.png", f"p{i}") for i in range(3)])
    cfg = config("data.source=manifest", f"data.path={path}", "data.resolution=16", *overrides)
    with pytest.raises(
        RunError, match=r"all 3 pairs tried are bad files \(skipped_missing=3\).*first: .*w\d\.png"
    ):
        stream = BatchStream(
            build_source(cfg.data, cfg.model, seed=0), 2, seed=0, prefetch_batches=cfg.data.prefetch_batches
        )
        stream.next_records()


def test_fewer_pairs_than_one_batch_is_a_run_error_not_a_traceback(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", good_pairs(tmp_path, 1))
    cfg = config("data.source=manifest", f"data.path={path}", "data.resolution=16")
    with pytest.raises(RunError, match=r"^data: .*\b1 pairs\b.*; lower train\.batch_pairs or add pairs$"):
        BatchStream(build_source(cfg.data, cfg.model, seed=0), 2, seed=0)


def write_shard(path, winner):
    """A tar shard of one pair whose winner image is the bytes `winner` (the loser is a real PNG)."""
    loser = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 50, np.uint8)).save(loser, format="PNG")
    with tarfile.open(path, "w") as tar:
        for name, data in (("0.txt", b"a fox"), ("0.winner.png", winner), ("0.loser.png", loser.getvalue())):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def test_tar_shards_without_one_usable_pair_stop_instead_of_spinning_forever(tmp_path):
    write_shard(tmp_path / "shard-0.tar", b"not a png")
    shards = ShardPairs(tmp_path, PairTransform(16))
    with pytest.raises(
        SourceError, match=r"no usable pair in the 1 shard\(s\) .*skipped_corrupt=1.*0\.winner"
    ):
        finishes(lambda: next(iter(shards)))
    cfg = config("data.source=shards", f"data.path={tmp_path}", "data.resolution=16")
    stream = BatchStream(build_source(cfg.data, cfg.model, seed=0), 1, seed=0, prefetch_batches=1)
    with pytest.raises(RunError, match="no usable pair"):
        finishes(stream.next_records)
    stream.close()


def test_a_rank_whose_shards_of_one_epoch_are_all_bad_waits_for_the_good_ones_of_a_later_epoch(tmp_path):
    good = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(good, format="PNG")
    write_shard(tmp_path / "shard-0.tar", b"not a png")
    write_shard(tmp_path / "shard-1.tar", good.getvalue())
    for rank in (0, 1):  # one of the two starts on the bad shard
        stream = ShardPairs(tmp_path, PairTransform(16), rank=rank, world_size=2)
        record = finishes(lambda stream=stream: next(iter(stream)))
        assert record.id == "shard-1/0"
    fixed = ShardPairs(tmp_path, PairTransform(16), rank=0, world_size=2, shuffle_shards=False)
    with pytest.raises(SourceError, match=r"no usable pair in the 1 shard\(s\)"):  # shard-0, every epoch
        finishes(lambda: next(iter(fixed)))


# ---------------------------------------------------------------------------------------------
# 6. Pair weights are finite float32 numbers >= 0


@pytest.mark.parametrize(
    "weight", ["1e300", "-1", "-0.5", "NaN", "Infinity", '"2"', "true", "null", "1" + "0" * 400]
)
def test_a_bad_pair_weight_is_refused_at_read_time_naming_file_and_line(tmp_path, weight):
    line = json.dumps(pair("w.png", "l.png", weight=0))[:-2] + weight + "}"  # raw JSON text: NaN, 1e300, ...
    path = write_lines(tmp_path / "pairs.jsonl", [pair("w.png", "l.png"), line])
    with pytest.raises(
        SourceError, match=r"pairs\.jsonl:2: 'weight' must be a finite number >= 0, got .*float32"
    ):
        read_manifest(path)


def test_weights_up_to_float32_max_are_kept_as_written(tmp_path):
    path = write_lines(
        tmp_path / "pairs.jsonl", [pair("w.png", "l.png", weight=w) for w in (0, 2, 0.25, 3.4e38)]
    )
    weights = [entry.weight for entry in read_manifest(path)]
    assert weights == [0.0, 2.0, 0.25, 3.4e38] and np.isfinite(np.float32(weights)).all()


# ---------------------------------------------------------------------------------------------
# 7. The sweep: more malformed manifests, files and clips


@pytest.mark.parametrize(
    "text, complaint",
    [
        ("", "no pairs (the manifest has no non-blank lines)"),
        ("\n  \n", "no pairs (the manifest has no non-blank lines)"),
        ("[1, 2]\n", "pairs.jsonl:1: expected a JSON object, got list"),
        ("3\n", "pairs.jsonl:1: expected a JSON object, got int"),
        ("null\n", "pairs.jsonl:1: expected a JSON object, got NoneType"),
        ("[" * 100_000 + "]" * 100_000 + "\n", "pairs.jsonl:1: not valid JSON (nested too deeply)"),
        (
            '{"prompt": "p", "winner": "w\\u0000.png", "loser": "l.png"}\n',
            "pairs.jsonl:1: winner path 'w\\x00.png' holds a NUL",
        ),
    ],
)
def test_a_malformed_manifest_is_one_source_error_naming_it(tmp_path, text, complaint):
    (tmp_path / "pairs.jsonl").write_text(text)
    with pytest.raises(SourceError) as caught:
        ManifestPairs(tmp_path / "pairs.jsonl", PairTransform(16))
    assert complaint in str(caught.value) and str(tmp_path / "pairs.jsonl") in str(caught.value)


def test_a_manifest_that_is_a_folder_is_a_source_error_and_a_byte_order_mark_is_fine(tmp_path):
    (tmp_path / "pairs.jsonl").mkdir()
    with pytest.raises(SourceError, match=r"cannot read manifest .*pairs\.jsonl: Is a directory"):
        ManifestPairs(tmp_path / "pairs.jsonl", PairTransform(16))
    lines = good_pairs(tmp_path, 1)
    (tmp_path / "bom.jsonl").write_text("\ufeff" + json.dumps(lines[0]) + "\n", encoding="utf-8")
    assert len(ManifestPairs(tmp_path / "bom.jsonl", PairTransform(16))) == 1


def truncated_jpeg():
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]  # header intact, pixels cut off


@pytest.mark.parametrize(
    "make, kind, reason",
    [
        (lambda p: p.write_bytes(b""), "skipped_corrupt", "cannot identify image file"),
        (lambda p: p.write_bytes(truncated_jpeg()), "skipped_corrupt", "image file is truncated"),
        (lambda p: p.mkdir(), "skipped_not_a_file", "is a folder, not a regular image file"),
        (lambda p: os.symlink(p.name, p), "skipped_corrupt", "Too many levels of symbolic links"),
    ],
)
def test_a_bad_image_file_is_a_counted_skip_of_its_kind(tmp_path, make, kind, reason):
    make(tmp_path / "bad.jpg")
    path = write_lines(tmp_path / "pairs.jsonl", [*good_pairs(tmp_path, 1), pair("w0.png", "bad.jpg")])
    data = ManifestPairs(path, PairTransform(16))
    with pytest.raises(BadSample, match=reason) as caught:
        data[1]
    assert caught.value.kind == kind and data.stats()[kind] == 1
    assert data[0].winner.shape == (16, 16, 3)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "cannot read the container"),
        (lambda p: write_clip(p, frames=0), "cannot read the container|no frames"),
        (lambda p: p.write_bytes(np.random.default_rng(0).bytes(3000)), "cannot read the container"),
    ],
)
def test_an_empty_frameless_or_garbage_clip_is_a_counted_corrupt_skip(tmp_path, make, reason):
    write_clip(tmp_path / "a.webm")
    make(tmp_path / "bad.webm")
    path = write_lines(tmp_path / "clips.jsonl", [pair("a.webm", "bad.webm")])
    clips = VideoPairManifest(path, FrameSampling(4), size=(8, 8), backend="pyav")
    with pytest.raises(BadSample, match=reason) as caught:
        clips[0]
    assert caught.value.kind == "skipped_corrupt" and clips.stats()["skipped_corrupt"] == 1
