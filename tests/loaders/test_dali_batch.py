"""The DALI batch path (data.image_backend): image sources leave their pairs encoded with the
pair's decisions, one DALI run a micro-batch decodes, crops, resizes and flips them. Here DALI's
CPU device runs the graph the GPU runs with nvJPEG ("mixed"); the GPU test runs only where CUDA is.

Tolerance against PIL (measured on these smooth JPEGs at odd sizes, random crops and flips):
Lanczos mean |diff| 0.21, max 5 of 255; bicubic / bilinear mean 0.20 / 0.18, max 2. Both use
libjpeg-turbo on CPU; the difference is the resampling kernels' rounding and support at the
crop's edges. The tests allow mean 0.6 and max 12."""

import dataclasses
import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="nvidia.dali does not import on this machine")

from vipo.engine.config import load_config  # noqa: E402
from vipo.engine.data import BatchStream, build_source, image_decoder, to_pixels  # noqa: E402
from vipo.engine.errors import RunError  # noqa: E402
from vipo.loaders import dali  # noqa: E402
from vipo.loaders.images import EncodedImage, PairTransform  # noqa: E402
from vipo.loaders.records import PairRecord  # noqa: E402

MEAN_TOL, MAX_TOL = 0.6, 12


def smooth(width, height, seed):
    """A gradient with noise: JPEG-like content, different per seed."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 55, height)[:, None, None]
    image = ramp * rng.uniform(0.3, 1.0, 3) + rng.integers(0, 40, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def encode(array, fmt="JPEG", **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **({"quality": 92} if fmt == "JPEG" else {}) | kwargs)
    return buffer.getvalue()


def truncated(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


def close(got, want, what=""):
    got = got.cpu().numpy() if isinstance(got, torch.Tensor) else got
    assert got.shape == want.shape, what
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.mean() <= MEAN_TOL and diff.max() <= MAX_TOL, (what, diff.mean(), diff.max())


def pairs(transforms, count, sizes=((97, 71), (120, 83), (64, 64), (51, 90))):
    """The same `count` pairs through each transform: a list of records per transform."""
    out = [[] for _ in transforms]
    for k in range(count):
        w, h = sizes[k % len(sizes)]
        winner, loser = encode(smooth(w, h, 2 * k)), encode(smooth(h + 9, w, 2 * k + 1))
        for records, transform in zip(out, transforms, strict=True):
            a, b, _ = transform.pair(winner, loser, refs=(f"w{k}", f"l{k}"), key=f"p{k}")
            records.append(PairRecord(f"p{k}", f"prompt {k}", a, b))
    return out


@pytest.mark.parametrize("resample", ["lanczos", "bicubic", "bilinear"])
def test_a_dali_batch_gives_the_pil_pixels_of_every_pair(resample):
    kwargs = {"random_crop": True, "flip_prob": 0.5, "seed": 3, "resample": resample}
    pil, deferred = pairs(
        [PairTransform((40, 24), **kwargs), PairTransform((40, 24), decoder="cpu", **kwargs)], 6
    )
    assert all(isinstance(r.winner, EncodedImage) and r.winner.dali for r in deferred)
    flips = {r.winner.flip for r in deferred}
    assert flips == {True, False}  # both branches of the flip are compared
    decoded = dali.decode_pairs(deferred, "cpu", replace_pair=None)
    assert [r.id for r in decoded] == [r.id for r in pil]
    for got, want in zip(decoded, pil, strict=True):
        assert got.winner.dtype == torch.uint8 and got.winner.shape == (24, 40, 3)
        close(got.winner, want.winner, got.id)
        close(got.loser, want.loser, got.id)
    # One tensor for the batch: winners then losers, as to_pixels stacks them.
    pixels = to_pixels(decoded, torch.device("cpu"))
    reference = to_pixels(pil, torch.device("cpu"))
    assert pixels.shape == reference.shape == (12, 3, 24, 40)
    assert (pixels - reference).abs().mean() < MEAN_TOL / 127.5


def test_a_flip_is_the_mirror_image_of_no_flip():
    image = encode(smooth(70, 50, 1))
    boxes = {}
    for flip in (False, True):
        encoded = EncodedImage(image, "x", (70, 50), (3.5, 2.0, 66.0, 48.5), (33, 21), flip, "lanczos", True)
        boxes[flip] = dali.decode_encoded([encoded], "cpu")[0]
    assert torch.equal(boxes[True], boxes[False].flip(1))


def test_exif_rotated_jpegs_decode_upright_as_pil_does():
    array = smooth(60, 36, 4)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated = encode(array, exif=exif.tobytes())
    pil, deferred = pairs([PairTransform(24), PairTransform(24, decoder="cpu")], 1)
    for records, transform in ((pil, PairTransform(24)), (deferred, PairTransform(24, decoder="cpu"))):
        a, b, _ = transform.pair(rotated, rotated, refs=("r", "r"), key="r")
        records[0] = PairRecord("r", "", a, b)
    assert deferred[0].winner.size == (36, 60)  # the upright size
    (decoded,) = dali.decode_pairs(deferred, "cpu", None)
    close(decoded.winner, pil[0].winner)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda: encode(np.dstack([smooth(30, 20, 0), np.full((20, 30), 90, np.uint8)]), "PNG"), id="rgba"
        ),
        pytest.param(lambda: encode((smooth(30, 20, 0)[..., 0].astype(np.uint16) * 257), "PNG"), id="grey16"),
        pytest.param(
            lambda: (
                lambda p: (Image.fromarray(smooth(30, 20, 0)).convert("P").save(p, "PNG"), p.getvalue())[1]
            )(io.BytesIO()),
            id="palette",
        ),
    ],
)
def test_images_dali_would_decode_differently_go_through_pil_exactly(make):
    """Alpha (PIL puts it on white, DALI drops it), 16-bit grey, palettes: the batch decoder
    decodes these with PIL, so they equal the PIL path bit for bit, next to DALI-decoded JPEGs."""
    odd = make()
    (pil,), (deferred,) = pairs([PairTransform(16), PairTransform(16, decoder="cpu")], 1)
    records = {}
    for name, transform, base in (
        ("pil", PairTransform(16), pil),
        ("dali", PairTransform(16, decoder="cpu"), deferred),
    ):
        a, b, _ = transform.pair(odd, odd, refs=("odd", "odd"), key="odd")
        records[name] = [base, PairRecord("odd", "", a, b)]
    assert records["dali"][1].winner.dali is False and records["dali"][0].winner.dali is True
    decoded = dali.decode_pairs(records["dali"], "cpu", None)
    assert np.array_equal(decoded[1].winner.numpy(), records["pil"][1].winner)
    close(decoded[0].winner, records["pil"][0].winner)


def test_a_png_decodes_exactly_as_pil_where_no_resampling_happens():
    array = smooth(32, 24, 7)
    encoded = PairTransform((32, 24), decoder="cpu").pair(
        encode(array, "PNG"), encode(array, "PNG"), refs=("a", "b"), key="k"
    )[0]
    assert np.array_equal(dali.decode_encoded([encoded], "cpu")[0].numpy(), array)


def test_a_corrupt_image_in_a_batch_is_named_and_stood_in_for(caplog):
    pil, deferred = pairs([PairTransform(20), PairTransform(20, decoder="cpu")], 4)
    bad = deferred[1].loser
    deferred[1] = dataclasses.replace(deferred[1], loser=dataclasses.replace(bad, data=truncated(bad.data)))
    asked = []

    def stand_in(position, record, why):
        asked.append((position, record.id, why.ref, why.kind))
        return deferred[3]

    with caplog.at_level(logging.WARNING, "vipo.loaders.dali"):
        decoded = dali.decode_pairs(deferred, "cpu", stand_in)
    assert asked == [(1, "p1", "l1", "skipped_corrupt")]
    assert [r.id for r in decoded] == ["p0", "p3", "p2", "p3"]
    # The batch was decoded by PIL after DALI failed: exactly the PIL pixels.
    assert np.array_equal(decoded[0].winner.numpy(), pil[0].winner)
    assert any("DALI failed on a batch of images" in m for m in caplog.messages)
    # A stream's stand-in goes last, the order a stream that skipped the pair gives.
    streamed = dali.decode_pairs(deferred, "cpu", lambda position, record, why: deferred[3], in_place=False)
    assert [r.id for r in streamed] == ["p0", "p2", "p3", "p3"]
    # The latent cache drops it (None: no stand-in).
    dropped = dali.decode_pairs(deferred, "cpu", lambda position, record, why: None)
    assert [r.id for r in dropped] == ["p0", "p2", "p3"]


def test_a_batch_of_several_target_sizes_decodes_one_run_each():
    """A latent cache's shard follows the data order, not the buckets: several sizes a batch."""
    from vipo.loaders.buckets import Buckets

    buckets = Buckets([(32, 24), (24, 32), (28, 28)])
    pil, deferred = pairs([PairTransform(buckets=buckets), PairTransform(buckets=buckets, decoder="cpu")], 4)
    assert len({r.winner.target for r in deferred}) >= 2
    for got, want in zip(dali.decode_pairs(deferred, "cpu", None), pil, strict=True):
        close(got.winner, want.winner, got.id)


# -- the stream and the sources ----------------------------------------------------------------


def write_manifest(root, count, corrupt=()):
    lines = []
    for i in range(count):
        for role, seed in (("w", 2 * i), ("l", 2 * i + 1)):
            data = encode(smooth(37 + i, 29, seed))
            (root / f"{role}{i}.jpg").write_bytes(truncated(data) if (role == "w" and i in corrupt) else data)
        lines.append(
            json.dumps({"prompt": f"prompt {i}", "winner": f"w{i}.jpg", "loser": f"l{i}.jpg", "id": f"p{i}"})
        )
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pairs.jsonl"


def source(kind, path, backend, *overrides):
    cfg = load_config(
        None,
        [
            f"data.source={kind}",
            f"data.path={path}",
            "data.resolution=16",
            "data.random_crop=true",
            "data.hflip_prob=0.5",
            f"data.image_backend={backend}",
            *overrides,
        ],
    )
    return build_source(cfg.data, cfg.model, seed=5, batch_decode=True)


def same_batches(got, want):
    assert [[r.id for r in b] for b in got] == [[r.id for r in b] for b in want]
    for batch_got, batch_want in zip(got, want, strict=True):
        for a, b in zip(batch_got, batch_want, strict=True):
            close(a.winner, b.winner, a.id)
            close(a.loser, b.loser, a.id)


@pytest.mark.parametrize("mode", [{}, {"prefetch_batches": 2}, {"num_workers": 1, "prefetch_batches": 1}])
def test_a_manifest_streams_the_pil_batches_through_dali_with_corrupt_files_stood_in_for(tmp_path, mode):
    """The corrupt winners' headers read fine; DALI finds them, PIL names them, and the same
    stand-in as the PIL path's (the next good pair) takes their place; counted once; the
    position after each batch is the PIL stream's, and a resume continues it."""
    path = write_manifest(tmp_path, 7, corrupt={2, 5})
    want_stream = BatchStream(source("manifest", path, "pil"), 2, seed=5)
    want = [want_stream.next_records() for _ in range(8)]  # 3 batches an epoch: crosses epochs
    stream = BatchStream(source("manifest", path, "dali"), 2, seed=5, **mode)
    assert stream.decoder == "cpu"
    got = [stream.next_records() for _ in range(4)]
    state = stream.state_dict()
    got += [stream.next_records() for _ in range(4)]
    same_batches(got, want)
    assert all(isinstance(r.winner, torch.Tensor) for batch in got for r in batch)
    assert stream.stats()["skipped_corrupt"] == want_stream.stats()["skipped_corrupt"] == 2
    resumed = BatchStream(source("manifest", path, "dali"), 2, seed=5, **mode)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    same_batches([resumed.next_records() for _ in range(4)], want[4:])
    for s in (stream, resumed):
        s.close()


def test_pickapic_rows_decode_through_dali_like_pil(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "caption": f"prompt {i}",
            "jpg_0": encode(smooth(40, 30 + i, 2 * i)),
            "jpg_1": encode(smooth(44, 31, 2 * i + 1)),
            "label_0": float(i % 2),
            "label_1": float(1 - i % 2),
            "image_0_uid": f"u{i}a",
            "image_1_uid": f"u{i}b",
            "are_different": True,
            "has_label": True,
        }
        for i in range(6)
    ]
    rows[3]["jpg_1"] = truncated(rows[3]["jpg_1"])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-0.parquet")
    want = BatchStream(source("pickapic", tmp_path, "pil"), 3, seed=5)
    got = BatchStream(source("pickapic", tmp_path, "dali"), 3, seed=5, prefetch_batches=1)
    same_batches([got.next_records() for _ in range(4)], [want.next_records() for _ in range(4)])
    assert got.stats()["skipped_corrupt"] == want.stats()["skipped_corrupt"] == 1
    got.close()


def write_shards(folder, count, corrupt=()):
    folder.mkdir()
    with tarfile.open(folder / "pairs-0000.tar", "w") as tar:
        for k in range(count):
            members = {
                f"{k:04d}.txt": f"prompt {k}".encode(),
                f"{k:04d}.winner.jpg": encode(smooth(30, 26, 2 * k)),
                f"{k:04d}.loser.jpg": encode(smooth(28, 30, 2 * k + 1)),
            }
            if k in corrupt:
                members[f"{k:04d}.loser.jpg"] = truncated(members[f"{k:04d}.loser.jpg"])
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return folder


@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_shard_stream_skips_a_corrupt_pair_dali_finds_as_the_pil_stream_does(tmp_path, prefetch):
    """The stream's next pair comes in after the others; the position moves past it, so the
    batches and the resume point are the PIL stream's."""
    path = write_shards(tmp_path / "shards", 12, corrupt={1, 6})
    want_stream = BatchStream(source("shards", path, "pil"), 3, seed=5)
    want, want_states = [], []
    for _ in range(3):
        want.append(want_stream.next_records())
        want_states.append(want_stream.state_dict())
    stream = BatchStream(source("shards", path, "dali"), 3, seed=5, prefetch_batches=prefetch)
    got = [stream.next_records() for _ in range(2)]
    state = stream.state_dict()
    assert state == want_states[1]
    got.append(stream.next_records())
    same_batches(got, want)
    assert stream.stats()["skipped_corrupt"] == want_stream.stats()["skipped_corrupt"] == 2
    resumed = BatchStream(source("shards", path, "dali"), 3, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    same_batches([resumed.next_records()], want[2:])
    stream.close()


# -- choosing the decoder, and what runs on a GPU ------------------------------------------------


def test_auto_without_a_gpu_is_pil_and_dali_without_dali_is_a_one_line_error(monkeypatch):
    cfg = load_config(None, ["data.image_backend=auto"])
    assert image_decoder(cfg.data) == "pil"  # no CUDA here
    assert image_decoder(load_config(None, ["data.image_backend=dali"]).data) == "cpu"
    monkeypatch.setattr(dali, "cuda_available", lambda: True)
    assert image_decoder(cfg.data) == "mixed"
    monkeypatch.setattr(dali, "dali_available", lambda: False)
    assert image_decoder(cfg.data) == "pil"
    with pytest.raises(RunError, match=r"data.image_backend=dali: .*nvidia-dali"):
        image_decoder(load_config(None, ["data.image_backend=dali"]).data)


def test_clips_batch_where_nvdec_is_or_dali_is_asked_for(monkeypatch):
    from vipo.engine.data import clip_batches

    assert not clip_batches("auto") and clip_batches("dali") and not clip_batches("pyav")  # no NVDEC here
    monkeypatch.setattr(dali, "nvdec_available", lambda: True)
    assert clip_batches("auto") and not clip_batches("pyav")
    monkeypatch.setattr(dali, "dali_available", lambda: False)
    assert not clip_batches("auto") and not clip_batches("dali")  # the per-pair path says DALI is missing


def test_sources_outside_training_decode_with_pil_whatever_the_backend(tmp_path):
    path = write_manifest(tmp_path, 2)
    cfg = load_config(None, ["data.source=manifest", f"data.path={path}", "data.image_backend=dali"])
    assert isinstance(
        build_source(cfg.data, cfg.model, seed=0)[0].winner, np.ndarray
    )  # vipo data stats, eval
    assert isinstance(build_source(cfg.data, cfg.model, seed=0, batch_decode=True)[0].winner, EncodedImage)


def test_the_gpu_copy_goes_device_to_device_on_torchs_current_stream(monkeypatch):
    """Everything of the "mixed" output path but the copy itself: the output tensor is made on
    the current CUDA device, and DALI's buffer is copied into it ordered on torch's stream."""
    import nvidia.dali.plugin.pytorch as plugin

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert dali.torch_device("mixed") == torch.device("cuda", 3)
    assert dali.torch_device("cpu") == torch.device("cpu")
    calls = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", device))
    monkeypatch.setattr(
        plugin, "feed_ndarray", lambda batch, out, cuda_stream=None: calls.append(cuda_stream) or out
    )
    out = torch.empty(1)
    dali._copy_out("batch", out, "mixed")
    dali._copy_out("batch", out, "cpu")
    assert calls == [("stream of", out.device), None]


def test_the_pipeline_feeds_are_the_boxes_in_tensor_order():
    image = EncodedImage(b"\xff\xd8", "x", (70, 50), (3.5, 2.0, 66.0, 48.5), (33, 21), True, "lanczos", True)
    feeds = dali.pair_inputs([image])
    assert feeds["roi_start"][0].tolist() == [2.0, 3.5] and feeds["roi_end"][0].tolist() == [48.5, 66.0]
    assert feeds["size"][0].tolist() == [21, 33] and int(feeds["mirror"][0]) == 1


@pytest.mark.gpu
def test_nvjpeg_batches_land_on_the_gpu_close_to_pil():
    pil, deferred = pairs(
        [
            PairTransform((40, 24), random_crop=True, flip_prob=0.5),
            PairTransform((40, 24), random_crop=True, flip_prob=0.5, decoder="mixed"),
        ],
        4,
    )
    decoded = dali.decode_pairs(deferred, "mixed", None)
    assert all(r.winner.is_cuda for r in decoded)
    for got, want in zip(decoded, pil, strict=True):
        close(got.winner, want.winner, got.id)


# -- training and `vipo cache` on the batch decoder --------------------------------------------


def run_config(tmp_path, path, backend, *overrides):
    return load_config(
        None,
        [
            "data.source=manifest",
            f"data.path={path}",
            "data.resolution=16",
            "data.random_crop=true",
            "data.hflip_prob=0.5",
            f"data.image_backend={backend}",
            "train.batch_pairs=2",
            "loss.beta=500",
            f"train.output_dir={tmp_path / backend}",
            *overrides,
        ],
    )


def test_training_batches_come_from_dali_with_the_pil_pixels_and_weight_maps(tmp_path):
    path = write_manifest(tmp_path, 4, corrupt={1})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    np.save(tmp_path / "m0.npy", np.linspace(0, 1, 29 * 37, dtype=np.float32).reshape(29, 37))
    lines[0]["weight_map"] = "m0.npy"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    from vipo.engine.trainer import Trainer

    steps = {}
    for backend in ("pil", "dali"):
        with Trainer(run_config(tmp_path, path, backend), progress=False) as trainer:
            assert trainer.batches.decoder == (None if backend == "pil" else "cpu")
            batch = trainer.next_batch()
            latents, _ = trainer._probe()  # FSDP's shape probe decodes pair 0 the same way
            assert latents.shape[0] == 2 and torch.isfinite(latents).all()
            trainer.batches.load_state_dict(BatchStream(trainer.data, 2, trainer.cfg.train.seed).state_dict())
            steps[backend] = batch, [trainer.train_step() for _ in range(2)]
    (pil, pil_losses), (got, losses) = steps["pil"], steps["dali"]
    assert got.ids == pil.ids
    assert (got.pixels - pil.pixels).abs().mean() < MEAN_TOL / 127.5
    assert [m is None for m in got.weight_maps] == [m is None for m in pil.weight_maps]
    for a, b in zip(got.weight_maps, pil.weight_maps, strict=True):
        assert a is None or np.array_equal(a, b)  # maps are transformed on the CPU either way
    # The step's errors follow the pixels (beta=500 magnifies their differences in the loss).
    for step, pil_step in zip(losses, pil_losses, strict=True):
        for key in ("e_pol_w", "e_pol_l", "e_ref_w", "e_ref_l"):
            assert torch.allclose(step[key], pil_step[key], rtol=1e-2), key


def test_vipo_cache_encodes_dali_decoded_batches_like_pil_ones(tmp_path):
    from vipo.engine.data.cache import run_cache
    from vipo.loaders.cache import LatentCache

    path = write_manifest(tmp_path, 5, corrupt={3})
    caches = {}
    for backend in ("pil", "dali"):
        cfg = run_config(tmp_path, path, backend, f"data.cache={tmp_path / ('cache-' + backend)}")
        assert run_cache(cfg, pairs_per_shard=2, batch_pairs=2, dtype="float32", progress=False)["complete"]
        caches[backend] = LatentCache(tmp_path / ("cache-" + backend))
    # The corrupt pair is left out of both (before: SkipBadSamples' stand-in repeated an id).
    assert caches["dali"].ids == caches["pil"].ids == ["p0", "p1", "p2", "p4"]
    # Rows past the short shard are found where they are, and a rerun keeps every shard.
    assert [caches["pil"][i].id for i in range(4)] == caches["pil"].ids
    again = run_cache(cfg, pairs_per_shard=2, batch_pairs=2, dtype="float32", progress=False)
    assert again["written"] == [] and len(again["kept"]) == 3
    for i in range(4):
        a, b = caches["dali"][i], caches["pil"][i]
        for key in ("winner_mean", "loser_mean"):
            assert (getattr(a, key) - getattr(b, key)).abs().mean() < 2e-3, key


# -- clips: NVDEC's graph, a micro-batch a run ---------------------------------------------------


def write_clip_pairs(tmp_path, count, h264=()):
    from test_dali import H264, write_clip

    lines = []
    for i in range(count):
        write_clip(tmp_path / f"w{i}.webm", 12 + i)
        loser = f"l{i}.mp4" if i in h264 else f"l{i}.webm"
        write_clip(tmp_path / loser, 12, codec=H264 if i in h264 else "libvpx-vp9")
        lines.append(
            json.dumps({"prompt": f"clip {i}", "winner": f"w{i}.webm", "loser": loser, "id": f"c{i}"})
        )
    (tmp_path / "clips.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "clips.jsonl"


def clip_source(path, backend, batch):
    from vipo.loaders.video import FrameSampling
    from vipo.loaders.video_manifest import VideoPairManifest

    sampling = FrameSampling(4, stride=2, start="random")
    return VideoPairManifest(
        path, sampling, size=(16, 20), backend=backend, device="cpu", seed=3, batch=batch
    )


def test_a_batch_of_clips_decodes_in_one_dali_run_as_pair_by_pair_and_h264_through_pyav(tmp_path):
    path = write_clip_pairs(tmp_path, 3, h264={1})
    batched, per_pair, pyav = (
        clip_source(path, "dali", True),
        clip_source(path, "dali", False),
        clip_source(path, "pyav", False),
    )
    records = [batched[i] for i in range(3)]
    assert all(isinstance(r.winner, dali.EncodedClip) for r in records)
    assert records[1].loser.backend == "pyav" and "cannot decode h264" in records[1].loser.reason
    decoded = dali.decode_pairs(records, "cpu", None)
    for i, record in enumerate(decoded):
        assert record.winner.shape == (4, 16, 20, 3) and record.winner.dtype == torch.uint8
        want = per_pair[i]
        # The same DALI graph at another batch size, and PyAV for the H.264 clip: bit for bit.
        assert np.array_equal(record.winner.numpy(), want.winner) and np.array_equal(
            record.loser.numpy(), want.loser
        )
        close(record.winner, pyav[i].winner, record.id)


def test_a_clip_gone_before_its_batch_decodes_is_stood_in_for(tmp_path):
    path = write_clip_pairs(tmp_path, 3)
    source = clip_source(path, "dali", True)
    records = [source[i] for i in range(3)]
    (tmp_path / "l0.webm").unlink()
    asked = []
    decoded = dali.decode_pairs(
        records, "cpu", lambda at, record, bad: asked.append((at, bad.kind)) or records[2]
    )
    assert asked == [(0, "skipped_missing")] and [r.id for r in decoded] == ["c2", "c1", "c2"]


def test_a_video_stream_through_dali_batches_gives_the_pair_by_pair_batches(tmp_path):
    path = write_clip_pairs(tmp_path, 4)
    overrides = ["data.num_frames=4", "data.frame_stride=2", "data.resolution=16"]
    cfg = load_config(None, ["data.source=video", f"data.path={path}", "data.video_backend=dali", *overrides])
    want = BatchStream(build_source(cfg.data, cfg.model, seed=5), 2, seed=5)  # pair by pair
    got_source = source("video", path, "pil", "data.video_backend=dali", *overrides)
    assert got_source.batch_device == "cpu"
    stream = BatchStream(got_source, 2, seed=5, prefetch_batches=1)
    assert stream.decoder == "cpu"
    for _ in range(3):
        got, expected = stream.next_records(), want.next_records()
        assert [r.id for r in got] == [r.id for r in expected]
        for a, b in zip(got, expected, strict=True):
            assert np.array_equal(a.winner.numpy(), b.winner) and np.array_equal(a.loser.numpy(), b.loser)
    stream.close()
