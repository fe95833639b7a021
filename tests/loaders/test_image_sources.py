"""Image decoding, the pair transform, and the Pick-a-Pic, manifest and tar-shard sources."""

import gzip
import io
import itertools
import json
import pickle
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vipo.loaders.images import (
    BadSample,
    PairTransform,
    SkipBadSamples,
    SourceError,
    decode_image,
    image_size,
)
from vipo.loaders.manifest import ManifestPairs
from vipo.loaders.pickapic import FETCH_COLUMNS, INDEX_COLUMNS, PickapicPairs
from vipo.loaders.sampler import PairSampler
from vipo.loaders.shards import ShardPairs

# ---------------------------------------------------------------------------------------------
# Helpers: images with content that tells them apart, and that a flip or a crop changes.


def smooth_image(width, height, seed):
    """Gradients plus a seeded blob: smooth (so rescaled copies agree), asymmetric (so flips and
    crops show), different per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    cx, cy = rng.uniform(0.2, 0.8, 2)
    blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.02)
    tint = rng.uniform(0, 1, 3)
    rgb = np.stack([x * tint[0], y * tint[1], blob * (0.3 + tint[2])], axis=-1)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def encode(array, fmt="JPEG"):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def expected_pair(transform, winner_bytes, loser_bytes, key):
    return transform(decode_image(winner_bytes), decode_image(loser_bytes), key=key)


# ---------------------------------------------------------------------------------------------
# Decoding and the pair transform


def test_decode_turns_exif_rotated_images_upright_and_reports_the_turned_size():
    array = smooth_image(40, 20, seed=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", exif=exif)
    decoded = decode_image(buffer.getvalue())
    assert decoded.size == (20, 40) and image_size(buffer.getvalue()) == (20, 40)
    assert np.array_equal(np.asarray(decoded), np.rot90(array, k=-1))


def test_decode_puts_transparent_pixels_on_white_and_returns_rgb():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4, :, :3], rgba[:4, :, 3] = (10, 20, 30), 255
    decoded = np.asarray(decode_image(encode(rgba, "PNG")))
    assert decoded.shape == (8, 8, 3)
    assert (decoded[:4] == (10, 20, 30)).all() and (decoded[4:] == 255).all()


def test_corrupt_bytes_and_missing_files_raise_bad_sample_of_their_kind(tmp_path):
    good = encode(smooth_image(64, 64, seed=2))
    for data in (good[: len(good) // 2], b"not an image at all", b""):
        with pytest.raises(BadSample) as caught:
            decode_image(data, ref="pair-7:jpg_0")
        assert caught.value.kind == "skipped_corrupt" and "pair-7:jpg_0" in str(caught.value)
    with pytest.raises(BadSample) as caught:
        decode_image(tmp_path / "nope.png")
    assert caught.value.kind == "skipped_missing" and "nope.png" in str(caught.value)


def test_winner_and_loser_get_identical_crop_and_flip_decisions():
    transform = PairTransform((32, 24), random_crop=True, flip_prob=0.5, seed=3)
    image = Image.fromarray(smooth_image(80, 50, seed=3))
    outputs, flips = set(), set()
    for k in range(40):
        winner, loser = transform(image, image.copy(), key=f"pair-{k}")
        assert winner.shape == (24, 32, 3) and np.array_equal(winner, loser), f"pair-{k}"
        outputs.add(winner.tobytes())
        flips.add(transform.decisions(f"pair-{k}")[2])
    # The decisions do vary from pair to pair: one shared draw, not no draw.
    assert flips == {True, False} and len(outputs) > 20


def test_different_sized_winner_and_loser_get_the_same_relative_crop():
    transform = PairTransform(32, random_crop=True, flip_prob=0.5, seed=0)
    small = Image.fromarray(smooth_image(120, 80, seed=4))
    large = small.resize((240, 160), Image.Resampling.LANCZOS)
    for k in range(10):
        winner, loser = transform(small, large, key=f"k{k}")
        assert np.abs(winner.astype(int) - loser.astype(int)).mean() < 3, f"k{k}"
    other, _ = transform(small, large, key="k0", epoch=1)
    first, _ = transform(small, large, key="k0", epoch=0)
    assert transform.decisions("k0", 1) != transform.decisions("k0", 0)
    assert not np.array_equal(first, other)


def test_decisions_are_a_pure_function_of_seed_epoch_and_key():
    a, b = (
        PairTransform(16, random_crop=True, flip_prob=0.5, seed=9),
        PairTransform(16, random_crop=True, flip_prob=0.5, seed=9),
    )
    assert all(a.decisions(f"x{k}", 2) == b.decisions(f"x{k}", 2) for k in range(20))
    assert [a.decisions(f"x{k}")[:2] for k in range(5)] != [
        PairTransform(16, random_crop=True, seed=10).decisions(f"x{k}")[:2] for k in range(5)
    ]
    assert PairTransform(16).decisions("x") == (0.5, 0.5, False)


def test_cover_then_centre_crop_neither_pads_nor_distorts():
    array = smooth_image(200, 100, seed=5)
    winner, _ = PairTransform((100, 100))(Image.fromarray(array), Image.fromarray(array), key="c")
    # Scale 1 covers 100x100; the crop takes the middle 100 columns untouched.
    assert np.abs(winner.astype(int) - array[:, 50:150].astype(int)).max() <= 1


def test_transform_refuses_bad_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        PairTransform()
    with pytest.raises(ValueError, match="flip_prob"):
        PairTransform(8, flip_prob=2)


# ---------------------------------------------------------------------------------------------
# Pick-a-Pic parquet


def pickapic_rows(labels, size=(40, 32)):
    """One row per (label_0, label_1[, has_label, are_different]); images differ per row."""
    rows = []
    for i, spec in enumerate(labels):
        label_0, label_1, has_label, different = (*spec, True, True)[:4]
        rows.append(
            {
                "caption": f"prompt {i}",
                "jpg_0": encode(smooth_image(*size, seed=2 * i)),
                "jpg_1": encode(smooth_image(*size, seed=2 * i + 1)),
                "label_0": label_0,
                "label_1": label_1,
                "image_0_uid": f"u{i}a",
                "image_1_uid": f"u{i}b",
                "model_0": "sdxl",
                "model_1": "dreamlike",
                "best_image_uid": f"u{i}a" if label_0 == 1 else f"u{i}b",
                "are_different": different,
                "has_label": has_label,
                "ranking_id": i,
            }
        )
    return rows


SCHEMA = pa.schema(
    [
        ("caption", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("image_0_uid", pa.string()),
        ("image_1_uid", pa.string()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("best_image_uid", pa.string()),
        ("are_different", pa.bool_()),
        ("has_label", pa.bool_()),
        ("ranking_id", pa.int64()),
    ]
)


def write_pickapic(path, rows, row_group_size=None, drop=()):
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    table = table.drop_columns(list(drop))
    pq.write_table(table, path, row_group_size=row_group_size or len(rows))
    return path


def test_pickapic_winner_is_the_image_labelled_one(tmp_path):
    rows = pickapic_rows([(1.0, 0.0), (0.0, 1.0), (0.0, 1.0), (1.0, 0.0)])
    transform = PairTransform(24)
    data = PickapicPairs(write_pickapic(tmp_path / "train-0.parquet", rows), transform)
    assert len(data) == 4 and data.vocabulary() is None
    for i, row in enumerate(rows):
        record = data[i]
        won, lost = ("jpg_0", "jpg_1") if row["label_0"] == 1 else ("jpg_1", "jpg_0")
        winner, loser = expected_pair(transform, row[won], row[lost], record.id)
        assert record.id == f"pickapic-u{i}a-u{i}b" and record.prompt == f"prompt {i}"
        assert np.array_equal(record.winner, winner) and np.array_equal(record.loser, loser)
        assert not np.array_equal(record.winner, record.loser)
    assert data.stats()["skipped_ties"] == 0


def test_pickapic_works_with_the_pair_sampler(tmp_path):
    rows = pickapic_rows([(1.0, 0.0), (0.0, 1.0)] * 4)
    data = PickapicPairs(
        [write_pickapic(tmp_path / "a.parquet", rows[:4]), write_pickapic(tmp_path / "b.parquet", rows[4:])],
        PairTransform(16),
    )
    sampler = PairSampler(len(data), 3, seed=0)
    batch = [data[i] for i in sampler.next_batch()]
    assert np.stack([r.winner for r in batch]).shape == (3, 16, 16, 3)
    assert len({data[i].id for i in range(len(data))}) == 8


def test_pickapic_ties_are_skipped_and_counted_by_default(tmp_path):
    rows = pickapic_rows([(1.0, 0.0), (0.5, 0.5), (0.0, 1.0), (0.5, 0.5), (0.5, 0.5)])
    data = PickapicPairs(write_pickapic(tmp_path / "t.parquet", rows), PairTransform(16))
    assert len(data) == 2 and data.stats()["skipped_ties"] == 3
    assert [data[i].id for i in range(2)] == ["pickapic-u0a-u0b", "pickapic-u2a-u2b"]


def test_pickapic_keep_ties_yields_the_file_order_marked_tie(tmp_path):
    rows = pickapic_rows([(1.0, 0.0), (0.5, 0.5), (0.0, 1.0)])
    transform = PairTransform(16)
    data = PickapicPairs(write_pickapic(tmp_path / "t.parquet", rows), transform, keep_ties=True)
    assert len(data) == 3 and data.stats()["skipped_ties"] == 0
    tie = data[1]
    winner, loser = expected_pair(transform, rows[1]["jpg_0"], rows[1]["jpg_1"], tie.id)
    assert tie.category == "tie" and np.array_equal(tie.winner, winner) and np.array_equal(tie.loser, loser)
    assert data[0].category == data[2].category == ""


def test_pickapic_unlabeled_identical_and_malformed_rows_are_skipped_and_counted(tmp_path):
    rows = pickapic_rows(
        [
            (1.0, 0.0),
            (1.0, 0.0, False),
            (0.0, 1.0, True, False),
            (0.0, 0.0),
            (None, None),
            (0.0, 1.0),
            (None, None, False),
        ]
    )
    data = PickapicPairs(write_pickapic(tmp_path / "u.parquet", rows), PairTransform(16))
    stats = data.stats()
    assert len(data) == 2 and [data[i].id for i in range(2)] == ["pickapic-u0a-u0b", "pickapic-u5a-u5b"]
    assert (stats["skipped_unlabeled"], stats["skipped_identical"], stats["skipped_bad_label"]) == (2, 1, 2)
    with pytest.raises(SourceError, match="no usable Pick-a-Pic pairs .*'skipped_ties': 1"):
        PickapicPairs(
            write_pickapic(tmp_path / "only-tie.parquet", pickapic_rows([(0.5, 0.5)])), PairTransform(8)
        )


def test_pickapic_missing_column_error_names_the_file_the_column_and_the_columns_found(tmp_path):
    path = write_pickapic(
        tmp_path / "broken.parquet", pickapic_rows([(1.0, 0.0)]), drop=["jpg_1", "has_label"]
    )
    with pytest.raises(SourceError) as caught:
        PickapicPairs(path, PairTransform(16))
    message = str(caught.value)
    assert str(path) in message and "jpg_1" in message and "has_label" in message
    assert "columns found: caption, jpg_0, label_0" in message


def test_pickapic_reads_one_row_group_at_a_time_and_never_a_whole_table(tmp_path, monkeypatch):
    rows = pickapic_rows([(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)] * 4, size=(16, 16))
    path = write_pickapic(tmp_path / "groups.parquet", rows, row_group_size=3)
    assert pq.ParquetFile(path).num_row_groups == 4

    def forbidden(*args, **kwargs):
        raise AssertionError("a whole-table parquet read")

    for owner, name in (
        (pq, "read_table"),
        (pq.ParquetFile, "read"),
        (pq.ParquetFile, "iter_batches"),
        (pq.ParquetDataset, "read"),
    ):
        monkeypatch.setattr(owner, name, forbidden)
    reads = []
    original = pq.ParquetFile.read_row_group

    def spy(self, group, columns=None, **kwargs):
        reads.append((group, tuple(columns)))
        return original(self, group, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    data = PickapicPairs(path, PairTransform(8), cache_row_groups=1)
    assert reads == [(g, INDEX_COLUMNS) for g in range(4)]  # the index: label columns only
    assert len(data) == 8  # two kept pairs per row group of three
    reads.clear()
    data[0], data[1], data[2]  # rows 0, 1 of group 0, then group 1
    assert reads == [(0, FETCH_COLUMNS), (1, FETCH_COLUMNS)]
    data[7], data[3]
    assert [g for g, _ in reads[2:]] == [3, 1]


def test_pickapic_corrupt_jpeg_is_a_counted_skip_not_a_crash(tmp_path):
    rows = pickapic_rows([(1.0, 0.0), (0.0, 1.0), (1.0, 0.0)])
    rows[1]["jpg_1"] = rows[1]["jpg_1"][:200]  # the winner of row 1, truncated
    data = PickapicPairs(write_pickapic(tmp_path / "c.parquet", rows), PairTransform(16))
    with pytest.raises(BadSample, match="pickapic-u1a-u1b:jpg_1"):
        data[1]
    with pytest.raises(BadSample):
        data[1]
    assert data.stats()["skipped_corrupt"] == 1  # one bad pair, however often it is asked for
    robust = SkipBadSamples(data)
    assert [robust[i].id for i in range(3)] == ["pickapic-u0a-u0b", "pickapic-u2a-u2b", "pickapic-u2a-u2b"]
    assert robust.stats()["replaced_bad_indices"] == 1 and robust.stats()["skipped_corrupt"] == 1
    assert robust.image_sizes()[1] is None and robust.image_sizes()[0] == (40, 32)
    with pytest.raises(IndexError):
        robust[3]
    # Worker processes get a copy without the decoded row groups; it reads the same pairs.
    copy = pickle.loads(pickle.dumps(robust))
    assert copy.source._cache == {} and copy[2].id == robust[2].id and len(copy) == 3


# ---------------------------------------------------------------------------------------------
# JSONL manifest


def write_manifest(folder, lines):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_manifest_resolves_paths_relative_to_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "set"
    (folder / "img").mkdir(parents=True)
    images = {}
    for name, seed in (("a.png", 1), ("b.jpg", 2), ("c.png", 3)):
        images[name] = smooth_image(30, 20, seed)
        Image.fromarray(images[name]).save(folder / "img" / name)
    absolute = str(folder / "img" / "c.png")
    path = write_manifest(
        folder,
        [
            {"prompt": "first", "winner": "img/a.png", "loser": "img/b.jpg", "category": "style"},
            "",
            {"prompt": "second", "winner": absolute, "loser": "img/a.png", "id": "mine-2", "score": 0.3},
        ],
    )
    monkeypatch.chdir(tmp_path)  # neither the cwd nor the manifest's folder
    transform = PairTransform(16)
    data = ManifestPairs("set/pairs.jsonl", transform)
    assert len(data) == 2
    first, second = data[0], data[1]
    winner, loser = expected_pair(transform, folder / "img/a.png", folder / "img/b.jpg", first.id)
    assert np.array_equal(first.winner, winner) and np.array_equal(first.loser, loser)
    assert (first.prompt, first.category, second.id, second.category) == ("first", "style", "mine-2", "")
    assert first.id.startswith("manifest-") and ManifestPairs(path, transform)[0].id == first.id


def test_a_key_the_manifest_reader_does_not_read_is_a_warning_naming_it_once(tmp_path, caplog):
    pair = {"prompt": "ok", "winner": "w.png", "loser": "l.png"}
    lines = [
        pair,
        {**pair, "mask": "m1.png"},
        {**pair, "mask": "m2.png", "score": 0.5},
        {**pair, "mask": "m3.png"},
    ]
    path = write_manifest(tmp_path, lines)
    with caplog.at_level("WARNING", logger="vipo.loaders.images"):
        ManifestPairs(path, PairTransform(8))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings  # mask once (line 2), score once (line 3)
    assert f"{path}:2: key 'mask' is not read and is ignored" in warnings[0]
    assert "weight" in warnings[0] and f"{path}:3: key 'score'" in warnings[1]


@pytest.mark.parametrize(
    "bad_line, complaint",
    [
        ("{not json", "not valid JSON"),
        ('["a", "b"]', "expected a JSON object"),
        ('{"prompt": "x", "winner": "w.png"}', "missing key 'loser'"),
        ('{"prompt": 3, "winner": "w.png", "loser": "l.png"}', "'prompt' must be a string"),
    ],
)
def test_manifest_bad_line_error_names_the_file_and_line_number(tmp_path, bad_line, complaint):
    good = {"prompt": "ok", "winner": "w.png", "loser": "l.png"}
    path = write_manifest(tmp_path, [good, "", bad_line, good])
    with pytest.raises(SourceError, match=complaint) as caught:
        ManifestPairs(path, PairTransform(8))
    assert f"{path}:3:" in str(caught.value)


def test_manifest_missing_image_is_a_counted_skip_at_read_time_or_up_front(tmp_path):
    Image.fromarray(smooth_image(12, 12, 0)).save(tmp_path / "w.png")
    path = write_manifest(
        tmp_path,
        [
            {"prompt": "a", "winner": "w.png", "loser": "w.png"},
            {"prompt": "b", "winner": "w.png", "loser": "gone.png"},
        ],
    )
    lazy = ManifestPairs(path, PairTransform(8))
    assert len(lazy) == 2
    with pytest.raises(BadSample, match="gone.png") as caught:
        lazy[1]
    assert caught.value.kind == "skipped_missing" and lazy.stats()["skipped_missing"] == 1
    eager = ManifestPairs(path, PairTransform(8), check_files=True)
    assert len(eager) == 1 and eager.stats()["skipped_missing"] == 1 and eager[0].prompt == "a"


# ---------------------------------------------------------------------------------------------
# Tar shards


def add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder, num_shards, per_shard):
    """Shards of pairs with prompts alternating between .txt and .json; returns {id: winner bytes}."""
    folder.mkdir(parents=True, exist_ok=True)
    winners = {}
    for s in range(num_shards):
        with tarfile.open(folder / f"pairs-{s:04d}.tar", "w") as tar:
            for k in range(per_shard):
                key, seed = f"{k:06d}", 1000 * s + 2 * k
                if k % 2:
                    add_member(
                        tar, f"{key}.json", json.dumps({"prompt": f"p{s}-{k}", "category": "c"}).encode()
                    )
                else:
                    add_member(tar, f"{key}.txt", f"p{s}-{k}".encode())
                winners[f"pairs-{s:04d}/{key}"] = encode(smooth_image(20, 16, seed))
                add_member(tar, f"{key}.winner.jpg", winners[f"pairs-{s:04d}/{key}"])
                add_member(tar, f"{key}.loser.png", encode(smooth_image(20, 16, seed + 1), "PNG"))
    return winners


def test_shards_yield_every_pair_once_per_epoch_with_the_winner_image(tmp_path):
    winners = write_shards(tmp_path, 3, 4)
    transform = PairTransform(16)
    records = list(ShardPairs(tmp_path, transform, epochs=1))
    assert sorted(r.id for r in records) == sorted(winners)
    for record in records[:3]:
        shard, key = record.id.split("/")
        assert record.prompt == f"p{int(shard[-4:])}-{int(key)}"
        assert np.array_equal(
            record.winner,
            transform(decode_image(winners[record.id]), decode_image(winners[record.id]), key=record.id)[0],
        )


@pytest.mark.parametrize("cut", [0, 1, 4, 5, 9, 20, 23])
def test_shard_stream_resumed_from_its_state_continues_like_the_uninterrupted_stream(tmp_path, cut):
    write_shards(tmp_path, 4, 5)
    transform = PairTransform(12, random_crop=True, flip_prob=0.5)
    whole = list(itertools.islice(ShardPairs(tmp_path, transform, seed=7, epochs=2), 40))
    assert len(whole) == 40
    first = ShardPairs(tmp_path, transform, seed=7, epochs=2)
    stream = iter(first)
    head = [next(stream) for _ in range(cut)]
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint round trip
    second = ShardPairs(tmp_path, transform, seed=7, epochs=2)
    second.load_state_dict(state)
    tail = list(second)
    assert [r.id for r in head + tail] == [r.id for r in whole]
    assert all(np.array_equal(a.winner, b.winner) for a, b in zip(tail, whole[cut:], strict=True))


def test_shard_epochs_reshuffle_the_shard_order_deterministically(tmp_path):
    write_shards(tmp_path, 6, 1)
    stream = ShardPairs(tmp_path, PairTransform(8), seed=1)
    assert [p.name for p in stream.shards_for(0)] == [
        p.name for p in ShardPairs(tmp_path, PairTransform(8), seed=1).shards_for(0)
    ]
    assert any(stream.shards_for(0) != stream.shards_for(e) for e in range(1, 4))
    assert sorted(stream.shards_for(3)) == stream.shards


def test_shard_split_across_ranks_and_workers_is_disjoint_and_complete(tmp_path):
    winners = write_shards(tmp_path, 9, 2)
    streams = [
        ShardPairs(tmp_path, PairTransform(8), rank=r, world_size=2, worker=j, num_workers=2, epochs=1)
        for r in range(2)
        for j in range(2)
    ]
    taken = [[r.id for r in s] for s in streams]
    flat = [i for ids in taken for i in ids]
    assert len(flat) == len(set(flat)) == len(winners) and set(flat) == set(winners)
    assert all(ids for ids in taken)
    plain = ShardPairs(tmp_path, PairTransform(8), rank=1, world_size=3, shuffle_shards=False)
    assert [p.name for p in plain.shards_for(0)] == ["pairs-0001.tar", "pairs-0004.tar", "pairs-0007.tar"]
    with pytest.raises(ValueError, match="9 shards cannot feed 5 ranks x 2 workers"):
        ShardPairs(tmp_path, PairTransform(8), world_size=5, num_workers=2)
    with pytest.raises(ValueError, match="does not match"):
        streams[0].load_state_dict(streams[1].state_dict())


def test_corrupt_or_incomplete_shard_members_are_counted_skips(tmp_path):
    good = encode(smooth_image(16, 16, 1))
    with tarfile.open(tmp_path / "bad-0000.tar", "w") as tar:
        add_member(tar, "a.txt", b"fine")
        add_member(tar, "a.winner.jpg", good)
        add_member(tar, "a.loser.jpg", good)
        add_member(tar, "b.txt", b"truncated winner")
        add_member(tar, "b.winner.jpg", good[:150])
        add_member(tar, "b.loser.jpg", good)
        add_member(tar, "c.txt", b"no loser")
        add_member(tar, "c.winner.jpg", good)
        add_member(tar, "d.json", b"{broken")
        add_member(tar, "d.winner.jpg", good)
        add_member(tar, "d.loser.jpg", good)
        add_member(tar, "e.txt", b"also fine")
        add_member(tar, "e.winner.png", encode(smooth_image(16, 16, 2), "PNG"))
        add_member(tar, "e.loser.jpg", good)
    stream = ShardPairs(tmp_path, PairTransform(8), epochs=1)
    assert [r.prompt for r in stream] == ["fine", "also fine"]
    stats = stream.stats()
    assert (stats["skipped_corrupt"], stats["skipped_incomplete"]) == (2, 1)


def test_a_truncated_shard_is_counted_and_the_stream_goes_on(tmp_path):
    write_shards(tmp_path, 2, 3)
    shard = tmp_path / "pairs-0000.tar"
    with tarfile.open(shard) as tar:
        cut_inside = tar.getmember("000001.loser.png")  # the second sample's last member
    shard.write_bytes(shard.read_bytes()[: cut_inside.offset_data + cut_inside.size // 2])
    stream = ShardPairs(tmp_path, PairTransform(8), shuffle_shards=False, epochs=1)
    ids = [r.id for r in stream]
    assert ids == ["pairs-0000/000000"] + [f"pairs-0001/{k:06d}" for k in range(3)]
    assert stream.stats()["skipped_corrupt_shards"] == 1


def test_gzipped_shards_and_glob_patterns_read_like_plain_tar_folders(tmp_path):
    write_shards(tmp_path / "plain", 2, 3)
    (tmp_path / "gz").mkdir()
    for shard in (tmp_path / "plain").iterdir():
        (tmp_path / "gz" / (shard.name + ".gz")).write_bytes(gzip.compress(shard.read_bytes()))
    plain = [r.id for r in ShardPairs(tmp_path / "plain", PairTransform(8), epochs=1)]
    assert [r.id for r in ShardPairs(tmp_path / "gz", PairTransform(8), epochs=1)] == plain
    assert [
        r.id for r in ShardPairs(str(tmp_path / "plain" / "pairs-*.tar"), PairTransform(8), epochs=1)
    ] == plain
    with pytest.raises(SourceError, match="no tar shards"):
        ShardPairs(str(tmp_path / "plain" / "nothing-*.tar"), PairTransform(8))
